// sneakers23 in the browser: one EventSource for the whole page, one place
// (HANDLERS) that maps an event to a DOM change, and the purchase buttons.
'use strict';

const LEVEL_CLASS = 'size-container__entry--level-';
const LEVEL_WORDS = {
  high: 'plenty left', medium: 'selling fast', low: 'almost gone',
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

function setLevel(button, level) {
  for (const cls of [...button.classList]) {
    if (cls.startsWith(LEVEL_CLASS)) button.classList.remove(cls);
  }
  button.classList.add(LEVEL_CLASS + level);
  button.disabled = level === 'out';
  button.title = `Size ${button.textContent.trim()}: ${LEVEL_WORDS[level]}`;
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
  status.classList.toggle('product__status--ok', ok);
  status.classList.toggle('product__status--error', !ok);
}

function purchaseMessage(size, status, body) {
  if (status === 201) {
    return [`Size ${size} is yours! Order #${body.order_id}.`, true];
  }
  const words = PURCHASE_WORDS[body && body.error];
  if (words) return [`Size ${size} ${words}`, false];
  return [`Size ${size} could not be bought right now. Try again.`, false];
}

async function buy(button) {
  const product = button.closest('.product');
  const size = button.textContent.trim();
  if (product.dataset.buying === 'true') return;  // one purchase at a time
  product.dataset.buying = 'true';
  button.classList.add('size-container__entry--busy');
  try {
    const response = await fetch('/api/purchase', {
      method: 'POST',
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({item_id: Number(button.value)}),
    });
    const body = await response.json().catch(() => null);
    say(product, ...purchaseMessage(size, response.status, body));
  } catch (error) {
    say(product, 'Could not reach the store. Check your connection.', false);
  } finally {
    delete product.dataset.buying;
    button.classList.remove('size-container__entry--busy');
  }
}

document.addEventListener('click', (event) => {
  const button = event.target.closest('.size-container__entry');
  if (button && !button.disabled) buy(button);
});

connect();
syncClock();
tick();
setInterval(tick, 250);
