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
};

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
  product.classList.add('product--just-released');
  setTimeout(() => product.classList.remove('product--just-released'), 2000);
}

function applySnapshot(snapshot) {
  for (const product of snapshot.products) {
    const el = card(product.product_id);
    if (!el) continue;
    if (product.released && el.dataset.released !== 'true') {
      showSizes(product.product_id, product.size_html);
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
