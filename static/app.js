// sneakers23 in the browser: one EventSource for the whole page, one place
// (HANDLERS) that maps an event to a DOM change, and buying in two steps:
// a size button selects the size, the card's "Buy size 9 · $120.00"
// button buys it. The shopper's own pairs come from GET /api/orders.
'use strict';

const LEVEL_CLASS = 'size-container__entry--level-';
const LEVEL_WORDS = {
  high: 'plenty left', medium: 'selling fast', low: 'last pairs',
  out: 'sold out',
};
const PURCHASE_WORDS = {
  sold_out: 'just sold out. Try another size.',
  already_purchased: 'is not yours: one pair per shopper per drop, and ' +
    'you already have one.',
  not_released: 'is not on sale yet.',
  not_found: 'is not in the store.',
  paused: 'cannot be bought: sales are paused for a moment.',
};

// Server time minus browser time (ms): a countdown must flip at the
// store's moment even when this computer's clock is minutes off.
let clockOffset = 0;

function card(productId) {
  return document.querySelector(`.product[data-product-id="${productId}"]`);
}

function sizeButton(itemId) {
  return document.querySelector(`.size-container__entry[value="${itemId}"]`);
}

function sizeOf(button) {
  return button.textContent.trim();
}

function nameOf(product) {
  return product.querySelector('.product__name').textContent.trim();
}

// The one polite live region: purchase results and changes to the
// product the shopper is on, never every stock change in the store.
function announce(text) {
  const el = document.getElementById('announcer');
  // The same words twice must be heard twice: make the text differ.
  el.textContent = el.textContent === text ? `${text}\u00a0` : text;
}

// The product the shopper is on: the last card they focused or touched.
let currentProductId = null;
// Buying takes two steps: a size button selects (aria-pressed), the
// card's buy button confirms. One size is selected on the page at most.
let selected = null;

function noteCurrent(event) {
  const product = event.target.closest && event.target.closest('.product');
  if (product) currentProductId = product.dataset.productId;
}

function isCurrent(product) {
  return product.dataset.productId === currentProductId;
}

function setLevel(button, level) {
  const was = [...button.classList].find((c) => c.startsWith(LEVEL_CLASS));
  if (was) button.classList.remove(was);
  button.classList.add(LEVEL_CLASS + level);
  button.disabled = level === 'out';
  button.setAttribute('aria-label',
      `Size ${sizeOf(button)}, ${LEVEL_WORDS[level]}`);
  showSoldOut(button.closest('.product'));
  if (level === 'out' && selected === button) lostSelection(button);
}

// "Sold out" on a released card whose every size is out; a refusal
// said earlier on that card is stale then.
function showSoldOut(product) {
  const sizes = product.querySelectorAll('.size-container__entry');
  const out = sizes.length > 0 && [...sizes].every((b) => b.disabled);
  const was = product.classList.contains('product--sold-out');
  product.classList.toggle('product--sold-out', out);
  product.querySelector('.product__sold-out').textContent =
    out ? 'Sold out' : '';
  if (out && !was) {
    const status = product.querySelector('.product__status');
    if (status.classList.contains('product__status--error')) say(product, '');
    if (isCurrent(product)) announce(`${nameOf(product)} is sold out.`);
  }
}

function showSizes(productId, html) {
  const product = card(productId);
  if (!product) return;
  product.querySelector('.product__sizes').innerHTML = html;
  product.dataset.released = 'true';
  product.dataset.releaseAt = '';
  product.classList.remove('product--scheduled');
  product.classList.add('product--just-released');
  setTimeout(() => product.classList.remove('product--just-released'), 2000);
  showSoldOut(product);
  if (isCurrent(product)) {
    announce(`${nameOf(product)} is out now: pick your size.`);
  }
}

function setSchedule(productId, releaseAt) {
  const product = card(productId);
  if (!product || product.dataset.released === 'true') return;
  product.dataset.releaseAt = releaseAt || '';
  tick();
}

function twoDigits(n) {
  return String(n).padStart(2, '0');
}

function countdownText(releaseAt, now) {
  const moment = new Date(releaseAt);
  const local = moment.toLocaleString([], {
    weekday: 'short', hour: '2-digit', minute: '2-digit', second: '2-digit',
  });
  const left = Math.ceil((moment.getTime() - now) / 1000);
  if (left <= 0) return `Dropping now (${local})…`;
  const [h, m, s] = [Math.floor(left / 3600), Math.floor(left / 60) % 60,
    left % 60];
  const clock = h ? `${h}:${twoDigits(m)}:${twoDigits(s)}` :
    `${m}:${twoDigits(s)}`;
  return `Drops ${local} · in ${clock}`;
}

// Every scheduled card's countdown; the sizes come with `released`.
function tick() {
  const now = Date.now() + clockOffset;
  for (const product of document.querySelectorAll('.product')) {
    const countdown = product.querySelector('.countdown');
    if (!countdown) continue;
    const releaseAt = product.dataset.releaseAt;
    countdown.textContent = releaseAt ? countdownText(releaseAt, now) : '';
    product.classList.toggle('product--scheduled', Boolean(releaseAt));
  }
}

async function syncClock() {
  try {
    const sent = Date.now();
    const response = await fetch('/healthz', {cache: 'no-store'});
    const body = await response.json();
    const received = Date.now();
    clockOffset = Date.parse(body.now) + (received - sent) / 2 - received;
    tick();
  } catch (error) {
    // keep the browser's own clock
  }
}

function setPaused(paused) {
  const banner = document.getElementById('sales');
  const was = document.body.dataset.paused === 'true';
  document.body.dataset.paused = paused ? 'true' : 'false';
  if (paused) {
    banner.textContent = 'Sales paused: nothing can be bought right now. ' +
      'This page will say when sales resume.';
    banner.hidden = false;
  } else if (was) {
    banner.textContent = 'Sales are back on.';
    banner.hidden = false;
    setTimeout(() => {
      if (document.body.dataset.paused !== 'true') banner.hidden = true;
    }, 8000);
  }
}

function applySnapshot(snapshot) {
  if ('paused' in snapshot) setPaused(snapshot.paused);
  for (const product of snapshot.products) {
    const el = card(product.product_id);
    if (!el) continue;
    if (product.released && el.dataset.released !== 'true') {
      showSizes(product.product_id, product.size_html);
    } else if (!product.released) {
      setSchedule(product.product_id, product.release_at);
    }
    for (const item of product.items) {
      const button = sizeButton(item.id);
      if (button) setLevel(button, item.level);
    }
  }
}

const HANDLERS = {
  released: (data) => showSizes(data.product_id, data.size_html),
  stock_change: (data) => {
    const button = sizeButton(data.item_id);
    if (button) setLevel(button, data.level);
  },
  snapshot: applySnapshot,
  scheduled: (data) => setSchedule(data.product_id, data.release_at),
  sales: (data) => setPaused(data.paused),
};

function setConnection(state) {
  const el = document.getElementById('connection');
  el.dataset.state = state;
  el.textContent = {
    connecting: 'Connecting…',
    live: 'Live',
    offline: 'Offline — reconnecting…',
  }[state];
  document.body.classList.toggle('is-offline', state === 'offline');
}

let lastEventId = document.body.dataset.eventId || '';
let reopenDelay = 1000;

// The browser reconnects by itself (sending Last-Event-ID) after a network
// error; after an answer that is not a stream (a proxy's 502, say) it gives
// up, so then the page opens a new EventSource itself, backing off.
function connect() {
  const url = `/events?last_event_id=${encodeURIComponent(lastEventId)}`;
  const source = new EventSource(url);
  source.addEventListener('open', () => {
    reopenDelay = 1000;
    setConnection('live');
  });
  source.addEventListener('error', () => {
    setConnection('offline');
    if (source.readyState === EventSource.CLOSED) {
      setTimeout(connect, reopenDelay);
      reopenDelay = Math.min(reopenDelay * 2, 30000);
    }
  });
  for (const [name, handle] of Object.entries(HANDLERS)) {
    source.addEventListener(name, (event) => {
      lastEventId = event.lastEventId || lastEventId;
      setConnection('live');
      handle(JSON.parse(event.data));
    });
  }
}

function say(product, text, ok) {
  const status = product.querySelector('.product__status');
  status.textContent = text;
  status.classList.toggle('product__status--ok', Boolean(text) && ok);
  status.classList.toggle('product__status--error', Boolean(text) && !ok);
}

function purchaseMessage(size, status, body) {
  if (status === 201) {
    return [`Size ${size} is yours! Order #${body.order_id}.`, true];
  }
  const words = PURCHASE_WORDS[body && body.error];
  if (words) return [`Size ${size} ${words}`, false];
  return [`Size ${size} could not be bought right now. Try again.`, false];
}

function buyButton(product) {
  return product.querySelector('.product__buy');
}

function select(button) {
  const product = button.closest('.product');
  const own = ownOrder(product.dataset.productId);
  if (own) {
    say(product, `You already have size ${own.size} of this drop ` +
      `(order #${own.order_id}): one pair per shopper per drop.`, false);
    return;
  }
  if (selected !== button) unselect();
  selected = button;
  button.setAttribute('aria-pressed', 'true');
  const price = product.querySelector('.product__price').textContent.trim();
  const confirm = buyButton(product);
  confirm.textContent = `Buy size ${sizeOf(button)} · ${price}`;
  confirm.hidden = false;
  say(product, '');
}

// Forget the selection; whether its buy button had the focus.
function unselect() {
  if (!selected) return false;
  const confirm = buyButton(selected.closest('.product'));
  const hadFocus = document.activeElement === confirm;
  selected.setAttribute('aria-pressed', 'false');
  confirm.hidden = true;
  confirm.textContent = '';
  selected = null;
  return hadFocus;
}

// The selected size sold out before the shopper confirmed.
function lostSelection(button) {
  const product = button.closest('.product');
  const hadFocus = unselect();
  const sizes = product.querySelectorAll('.size-container__entry');
  const next = [...sizes].some((b) => !b.disabled) ?
    'Pick another size.' : 'Every size is sold out now.';
  const text = `Size ${sizeOf(button)} sold out before you confirmed. ${next}`;
  say(product, text, false);
  announce(text);
  if (hadFocus) product.querySelector('.product__status').focus();
}

async function buy(confirm) {
  const product = confirm.closest('.product');
  const button = selected;
  if (!button || product.dataset.buying === 'true') return;  // one at a time
  product.dataset.buying = 'true';
  confirm.classList.add('product__buy--busy');
  let message, pair = null, retry = false;
  try {
    const response = await fetch('/api/purchase', {
      method: 'POST',
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({item_id: Number(button.value)}),
    });
    const body = await response.json().catch(() => null);
    message = purchaseMessage(sizeOf(button), response.status, body);
    if (response.status === 201) pair = body;
    retry = response.status === 503;  // paused, or the database: same size
  } catch (error) {
    message = ['Could not reach the store. Check your connection.', false];
    retry = true;
  } finally {
    delete product.dataset.buying;
    confirm.classList.remove('product__buy--busy');
  }
  const hadFocus = document.activeElement === confirm;
  if (!retry && selected === button) unselect();
  if (pair) gotPair(pair, sizeOf(button));
  if (hadFocus && confirm.hidden) {
    (button.disabled ? product.querySelector('.product__status') : button)
      .focus();
  }
  // A pair bought shows as "Yours" on the card: no second message there.
  say(product, ...(message[1] ? [''] : message));
  announce(message[0]);
}

// ---- the shopper's own pairs (GET /api/orders) ----

let orders = [];
let ordersAsked = 0;
// Other tabs of this browser hear of a purchase at once; a tab coming
// back to the front (focus, visibilitychange) asks the server again,
// which also covers a purchase made on another node or device.
const otherTabs = 'BroadcastChannel' in window ?
  new BroadcastChannel('sneakers23-orders') : null;

function ownOrder(productId) {
  return orders.find((o) => String(o.product_id) === String(productId));
}

async function loadOrders() {
  const asked = ++ordersAsked;
  try {
    const response = await fetch('/api/orders', {cache: 'no-store'});
    if (!response.ok) return;
    const body = await response.json();
    if (asked !== ordersAsked) return;  // a newer answer is on its way
    orders = body;
    showOrders();
  } catch (error) {
    // offline: keep what the page shows
  }
}

function gotPair(order, size) {
  orders = [...orders.filter((o) => o.order_id !== order.order_id),
    {...order, size}];
  showOrders();
  if (otherTabs) otherTabs.postMessage('orders');
  loadOrders();
}

function showOrders() {
  for (const product of document.querySelectorAll('.product')) {
    const own = ownOrder(product.dataset.productId);
    product.classList.toggle('product--yours', Boolean(own));
    product.querySelector('.product__yours').textContent = own ?
      `Yours: size ${own.size}, order #${own.order_id}` : '';
  }
  if (selected && ownOrder(selected.closest('.product').dataset.productId)) {
    unselect();
  }
  const shown = orders.filter((o) => card(o.product_id));
  document.querySelector('.your-pairs__list').replaceChildren(
    ...shown.map(pairEntry));
  document.getElementById('your-pairs').hidden = shown.length === 0;
}

function pairEntry(order) {
  const product = card(order.product_id);
  const link = document.createElement('a');
  link.href = `#${product.id}`;
  link.textContent = nameOf(product);
  const entry = document.createElement('li');
  entry.append(link, ` · size ${order.size} · order #${order.order_id}`);
  return entry;
}

document.addEventListener('click', (event) => {
  const size = event.target.closest('.size-container__entry');
  if (size && !size.disabled) select(size);
  const confirm = event.target.closest('.product__buy');
  if (confirm) buy(confirm);
});

document.addEventListener('keydown', (event) => {
  if (event.key !== 'Escape' || !selected) return;
  const button = selected;
  unselect();
  button.focus();
});

document.addEventListener('focusin', noteCurrent);
document.addEventListener('pointerdown', noteCurrent);
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible') loadOrders();
});
window.addEventListener('focus', () => loadOrders());
if (otherTabs) otherTabs.addEventListener('message', () => loadOrders());

connect();
loadOrders();
syncClock();
tick();
setInterval(tick, 250);
