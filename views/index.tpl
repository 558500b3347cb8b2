<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sneakers23 — live drops</title>
<link rel="stylesheet" href="/static/app.css">
</head>
<body data-event-id="{{event_id}}" data-paused="{{'true' if paused else 'false'}}">
<header class="site-header">
  <a class="brand" href="/">Sneakers<span>23</span></a>
  <p class="tagline">Limited drops. Live stock.</p>
  <div class="connection" id="connection" data-state="connecting" role="status" aria-live="polite">Connecting…</div>
</header>
<p class="sales-banner" id="sales" role="status" aria-live="polite"{{!'' if paused else ' hidden'}}>{{'Sales paused: nothing can be bought right now. This page will say when sales resume.' if paused else ''}}</p>
<p class="visually-hidden" id="announcer" role="status" aria-live="polite"></p>
<main class="catalog">
  <h1 class="visually-hidden">Live drops</h1>
  <section class="your-pairs" id="your-pairs" aria-labelledby="your-pairs-title" hidden>
    <h2 class="your-pairs__title" id="your-pairs-title">Your pairs</h2>
    <ul class="your-pairs__list"></ul>
  </section>
  <p class="legend">
    <span class="legend__title">Stock:</span>
    <span class="legend__level"><span class="legend__mark legend__mark--high" aria-hidden="true">9</span> Plenty left</span>
    <span class="legend__level"><span class="legend__mark legend__mark--medium" aria-hidden="true">9</span> Selling fast</span>
    <span class="legend__level"><span class="legend__mark legend__mark--low" aria-hidden="true">9</span> Last pairs</span>
    <span class="legend__level"><span class="legend__mark legend__mark--out" aria-hidden="true">9</span> Sold out</span>
  </p>
  <ul class="product-grid">
  % for product in products:
    % include('product_card', product=product, price=price, iso=iso)
  % end
  </ul>
</main>
<footer class="site-footer">
  <p>One pair per shopper per drop. Stock levels update live: plenty left, selling fast, last pairs, sold out.</p>
</footer>
<script src="/static/app.js" defer></script>
</body>
</html>
