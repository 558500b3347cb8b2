<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>Sneakers23 — drop dashboard ({{node_name}})</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/vendor/uPlot-1.6.32.min.css">
<link rel="stylesheet" href="/static/admin.css">
</head>
<body data-signed-in="{{'true' if signed_in else 'false'}}" data-paused="false">
<header class="bar">
  <a class="brand" href="/">Sneakers<span>23</span></a>
  <h1>Drop dashboard <small>node {{node_name}}</small></h1>
  <div class="bar__right" data-when="signed-in">
    <span class="pill" id="connection" data-state="connecting">Connecting…</span>
    <button type="button" id="signout" class="quiet">Sign out</button>
  </div>
</header>

<main>
  <form id="signin" data-when="signed-out" class="signin">
    <h2>Sign in</h2>
    <p>The admin token is printed by <code>make run</code> and kept in
      <code>data/admin-token</code> (or set with <code>SNEAKERS23_ADMIN_TOKEN</code>).</p>
    <label for="token">Admin token</label>
    <input id="token" name="token" type="password" autocomplete="current-password" required>
    <button type="submit">Sign in</button>
    <p id="signin-error" class="error" role="alert"></p>
  </form>

  <div data-when="signed-in" class="dashboard">
    <section class="sales" aria-labelledby="sales-title">
      <h2 id="sales-title">Sales</h2>
      <p id="sales-state" class="sales-state">Sales on</p>
      <p id="totals" class="totals"></p>
      <button type="button" id="pause" class="danger">Pause all sales</button>
      <button type="button" id="resume" hidden>Resume sales</button>
      <p id="result" class="result" role="status" aria-live="polite"></p>
    </section>

    <section class="chart-box" aria-labelledby="chart-title">
      <h2 id="chart-title">Pairs sold per second <small>(last 5 minutes, whole store)</small></h2>
      <div id="chart" data-sold-total="0" data-points="0"></div>
    </section>

    <section aria-labelledby="nodes-title">
      <h2 id="nodes-title">Nodes</h2>
      <table class="nodes">
        <thead><tr><th scope="col">node</th><th scope="col">shoppers</th><th scope="col">watching</th><th scope="col">hub lag</th><th scope="col">database</th><th scope="col">peers (last heard)</th></tr></thead>
        <tbody id="nodes"></tbody>
      </table>
    </section>

    <section aria-labelledby="products-title">
      <h2 id="products-title">Products</h2>
      <div id="products" class="products"></div>
    </section>
  </div>
</main>

<dialog id="confirm">
  <form method="dialog">
    <p id="confirm-text"></p>
    <label id="confirm-count-label" for="confirm-count" hidden>Pairs to add
      <input id="confirm-count" type="number" min="1" max="1000000" step="1" value="10">
    </label>
    <div class="confirm__buttons">
      <button type="button" id="confirm-cancel" class="quiet">Cancel</button>
      <button type="submit" id="confirm-ok" value="ok">Confirm</button>
    </div>
  </form>
</dialog>

<script src="/static/vendor/uPlot-1.6.32.iife.min.js" defer></script>
<script src="/static/admin.js" defer></script>
</body>
</html>
