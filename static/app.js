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
// An open draw counts down to its close.
function tick() {
  const now = Date.now() + clockOffset;
  for (const panel of document.querySelectorAll('.draw')) {
    panel.querySelector('.draw__closes').textContent = closesText(panel, now);
  }
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

function closesText(panel, now) {
  const moment = new Date(panel.dataset.closesAt);
  const local = moment.toLocaleString([], {
    weekday: 'short', hour: '2-digit', minute: '2-digit', second: '2-digit',
  });
  if (panel.dataset.drawState === 'drawn') return `Closed ${local}`;
  const left = Math.ceil((moment.getTime() - now) / 1000);
  if (left <= 0) return `Closed ${local}: drawing…`;
  const [m, s] = [Math.floor(left / 60), left % 60];
  return `Closes ${local} · in ${m}:${twoDigits(s)}`;
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
    if (product.draw) applyDraw(product.draw);
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
  draw: applyDraw,
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
  showEntries();
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

// ---- draws (POST/DELETE /api/draws/<id>/entry, GET /api/entries) ----

const DRAW_WORDS = {
  draw_closed: 'The draw is closed: entries are no longer taken.',
  too_many_requests: 'Too many entries from your network: try later.',
  sold_out: 'That size has no pairs in this draw.',
  not_found: 'This draw is not in the store.',
};
let entries = [];

function ownEntry(productId) {
  return entries.find((e) => String(e.product_id) === String(productId));
}

async function loadEntries() {
  try {
    const response = await fetch('/api/entries', {cache: 'no-store'});
    if (!response.ok) return;
    entries = await response.json();
    showEntries();
  } catch (error) {
    // offline: keep what the page shows
  }
}

function showEntries() {
  for (const panel of document.querySelectorAll('.draw')) {
    showEntry(panel.closest('.product'));
  }
}

// "Entered: size 9 · entry #12", the pressed size, the withdraw button,
// and once drawn the shopper's own result.
function showEntry(product) {
  const panel = product.querySelector('.draw');
  if (!panel) return;
  const own = ownEntry(product.dataset.productId);
  for (const button of panel.querySelectorAll('.draw__size')) {
    const mine = Boolean(own) && button.value === String(own.item_id);
    button.setAttribute('aria-pressed', String(mine));
  }
  panel.querySelector('.draw__mine').textContent = own ?
    `Entered: size ${own.size} · entry #${own.entry_id}` : '';
  panel.querySelector('.draw__withdraw').hidden =
    !own || panel.dataset.drawState !== 'open';
  panel.querySelector('.draw__result').textContent = drawResult(product, own);
}

function drawResult(product, own) {
  const panel = product.querySelector('.draw');
  if (panel.dataset.drawState !== 'drawn' || !own) return '';
  const winners = panel.dataset.winners.split(',').map(Number);
  if (!winners.includes(own.entry_id)) return 'Not this time';
  const order = ownOrder(product.dataset.productId);
  return `You won size ${own.size} — order #${order ? order.order_id : '…'}`;
}

function applyDraw(data) {
  const product = card(data.product_id);
  if (!product) return;
  if (data.draw_html) {
    product.querySelector('.product__sizes').innerHTML = data.draw_html;
    product.dataset.releaseAt = '';
    product.dataset.draw = data.state;
    product.classList.remove('product--scheduled');
  }
  const panel = product.querySelector('.draw');
  if (!panel) return;
  for (const [itemId, n] of Object.entries(data.entries)) {
    const count = panel.querySelector(`.draw__count[data-item-id="${itemId}"]`);
    if (count) count.textContent = n;
  }
  showEntry(product);
  tick();
  if (data.state === 'drawn') {
    loadOrders();
    const result = panel.querySelector('.draw__result').textContent;
    if (result && isCurrent(product)) announce(result);
  }
}

async function sendEntry(product, method, itemId) {
  const options = {method, headers: {'Content-Type': 'application/json'}};
  if (itemId) options.body = JSON.stringify({item_id: Number(itemId)});
  try {
    const response = await fetch(
        `/api/draws/${product.dataset.productId}/entry`, options);
    return [response.ok, await response.json().catch(() => null)];
  } catch (error) {
    return [false, {error: 'offline'}];
  }
}

function drawRefusal(product, body) {
  const words = DRAW_WORDS[body && body.error] ||
    'Could not reach the store. Try again.';
  say(product, words, false);
  announce(words);
}

async function enterDraw(button) {
  const product = button.closest('.product');
  const size = button.querySelector('.draw__size-name').textContent.trim();
  const [ok, body] = await sendEntry(product, 'POST', button.value);
  if (!ok) return drawRefusal(product, body);
  entries = [...entries.filter((e) => e.product_id !== body.product_id),
    {...body, size}];
  showEntry(product);
  say(product, '');
  announce(`Entered the draw: size ${size}.`);
}

async function withdrawEntry(button) {
  const product = button.closest('.product');
  const [ok, body] = await sendEntry(product, 'DELETE');
  if (!ok) return drawRefusal(product, body);
  entries = entries.filter(
      (e) => String(e.product_id) !== product.dataset.productId);
  showEntry(product);
  say(product, 'Your entry is withdrawn.', true);
  announce('Your entry is withdrawn.');
}

document.addEventListener('click', (event) => {
  const entry = event.target.closest('.draw__size');
  if (entry && !entry.disabled) enterDraw(entry);
  const withdraw = event.target.closest('.draw__withdraw');
  if (withdraw) withdrawEntry(withdraw);
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
loadEntries();
syncClock();
tick();
setInterval(tick, 250);
