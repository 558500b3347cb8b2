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

function sizesFromApi(product) {
  const buttons = product.items.map((item) => {
    const b = document.createElement('button');
    b.className = 'size-container__entry';
    b.value = item.id;
    b.textContent = item.size;
    setLevel(b, item.level);
    return b.outerHTML;
  });
  return '<div class="size-container">' +
    '<p class="size-container__title">Pick your size</p>' +
    `<div class="size-container__entries">${buttons.join('')}</div></div>`;
}

async function showReleasedFromApi(productIds) {
  const response = await fetch('/api/products', {cache: 'no-store'});
  if (!response.ok) return;
  for (const product of await response.json()) {
    if (productIds.has(product.id)) {
      showSizes(product.id, sizesFromApi(product));
    }
  }
}

function applySnapshot(snapshot) {
  const missing = new Set();
  for (const product of snapshot.products) {
    const el = card(product.product_id);
    if (!el) continue;
    if (product.released && el.dataset.released !== 'true') {
      missing.add(product.product_id);
    }
    for (const item of product.items) {
      const button = sizeButton(item.id);
      if (button) setLevel(button, item.level);
    }
  }
  if (missing.size) showReleasedFromApi(missing);
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

function connect() {
  const lastId = document.body.dataset.eventId || '';
  const url = `/events?last_event_id=${encodeURIComponent(lastId)}`;
  const source = new EventSource(url);
  source.addEventListener('open', () => setConnection('live'));
  source.addEventListener('error', () => setConnection('offline'));
  for (const [name, handle] of Object.entries(HANDLERS)) {
    source.addEventListener(name, (event) => {
      setConnection('live');
      handle(JSON.parse(event.data));
    });
  }
  return source;
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
    button.classList.remove('size-container__entry--busy');
  }
}

document.addEventListener('click', (event) => {
  const button = event.target.closest('.size-container__entry');
  if (button && !button.disabled) buy(button);
});

connect();
