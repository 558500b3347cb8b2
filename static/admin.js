// The operator dashboard: sign in, then one EventSource (/admin/events)
// whose `overview` each second redraws products, sizes, nodes and the
// chart. Every action asks first, then shows what the node answered.
// Data from the store only ever goes into the page as text.
'use strict';

const WINDOW_S = 300;          // seconds of sales the chart shows
const STATE_WORDS = {
  released: 'released', scheduled: 'scheduled', coming_soon: 'coming soon',
  draw_open: 'draw open', drawn: 'drawn',
};
const ERROR_WORDS = {
  unauthorized: 'the session ended or the token changed: sign in again',
  already_released: 'it is already released',
  in_the_past: 'that moment has passed',
  too_many: 'that would be more pairs than the store can hold',
  cross_origin: 'refused: the request did not come from this page',
  unavailable: 'the database cannot be reached right now',
  not_found: 'it is not in the store',
  draw_exists: 'it is a draw already',
  draw: 'it is sold by a draw',
};

const $ = (selector, root = document) => root.querySelector(selector);
let source = null;
let chart = null;
let chartKey = '';
let clockOffset = 0;           // node time minus browser time, ms
let latest = null;             // the last overview
const sales = new Map();       // product id -> Map(second -> pairs)

// -- signing in and out ------------------------------------------------------

function setSignedIn(signedIn, message = '') {
  document.body.dataset.signedIn = String(signedIn);
  $('#signin-error').textContent = message;
  if (signedIn) {
    connect();
  } else {
    disconnect();
    $('#token').value = '';
  }
}

async function signIn(event) {
  event.preventDefault();
  const answer = await send('POST', '/admin/session',
                            {token: $('#token').value});
  if (answer.ok) return setSignedIn(true);
  $('#signin-error').textContent = answer.status === 401
    ? 'That is not the admin token.'
    : answer.status === 429
      ? `Too many wrong tokens from here: try again in ${answer.retryAfter || 'a few'} s.`
      : `Sign-in failed: ${answer.error}.`;
}

async function signOut() {
  await send('DELETE', '/admin/session');
  setSignedIn(false);
}

// -- the live stream ---------------------------------------------------------

function connect() {
  if (source) return;
  setConnection('connecting');
  source = new EventSource('/admin/events');
  source.addEventListener('open', () => setConnection('live'));
  source.addEventListener('history', (e) => onHistory(JSON.parse(e.data)));
  source.addEventListener('overview', (e) => onOverview(JSON.parse(e.data)));
  source.addEventListener('error', onStreamError);
}

function disconnect() {
  if (source) source.close();
  source = null;
}

async function onStreamError() {
  setConnection('offline');
  // EventSource retries by itself, but not after a 401: ask why it failed.
  try {
    const answer = await fetch('/admin/api/overview', {cache: 'no-store'});
    if (answer.status === 401) {
      setSignedIn(false, 'Your session ended: sign in again.');
    }
  } catch (error) {
    // the node is down: EventSource keeps trying
  }
}

function setConnection(state) {
  const pill = $('#connection');
  pill.dataset.state = state;
  pill.textContent = {connecting: 'Connecting…', live: 'Live',
                      offline: 'Offline: retrying…'}[state];
}

// -- what the stream says ----------------------------------------------------

function onHistory(history) {
  sales.clear();
  for (const [productId, points] of Object.entries(history.series)) {
    sales.set(productId, new Map(points));
  }
  drawChart(history.now);
}

function onOverview(view) {
  latest = view;
  clockOffset = view.at * 1000 - Date.now();
  const second = Math.floor(view.at);
  for (const [productId, rate] of Object.entries(view.sold_per_s)) {
    if (rate === null) continue;
    if (!sales.has(productId)) sales.set(productId, new Map());
    sales.get(productId).set(second, rate);
  }
  showSales(view.paused);
  showTotals(view);
  showNodes(view);
  showProducts(view);
  drawChart(second);
}

function showSales(paused) {
  document.body.dataset.paused = String(paused);
  $('#sales-state').textContent = paused ? 'Sales paused' : 'Sales on';
  $('#pause').hidden = paused;
  $('#resume').hidden = !paused;
}

function showTotals(view) {
  const nodes = Object.values(view.nodes);
  const shoppers = nodes.reduce((sum, node) => sum + node.streams, 0);
  const sold = view.products.reduce((sum, p) => sum + (p.sold || 0), 0);
  $('#totals').textContent = `${nodes.length} node${nodes.length === 1 ? '' : 's'} live · ` +
    `${shoppers} shopper page${shoppers === 1 ? '' : 's'} open · ${sold} pairs sold`;
}

function watchingOf(view, productId) {
  let total = 0;
  for (const node of Object.values(view.nodes)) {
    total += node.watching[String(productId)] || 0;
  }
  return total;
}

function showNodes(view) {
  const body = $('#nodes');
  const skus = new Map(view.products.map((p) => [String(p.id), p.sku]));
  const rows = Object.entries(view.nodes).map(([name, node]) => {
    const row = element('tr', 'node');
    row.dataset.node = name;
    const counts = Object.entries(node.watching);
    // A page without a filter watches every product: say it once.
    const everyone = node.streams > 0 && counts.length === skus.size &&
      counts.every(([, n]) => n === node.streams);
    const watching = everyone ? `every product: ${node.streams}`
      : counts.map(([id, n]) => `${skus.get(id) || id}: ${n}`).join(', ');
    const peers = Object.entries(node.peers).map(([peer, state]) => {
      const lag = (node.peer_lag_ms || {})[peer];
      return `${peer}: ${state}` + (lag == null ? '' : `, heard ${Math.round(lag)} ms ago`);
    }).join('; ');
    row.append(cell('th', 'name', name), cell('td', 'streams', node.streams),
               cell('td', 'watching', watching || '—'),
               cell('td', 'hub-lag', `${node.hub_lag_ms} ms`),
               cell('td', 'db', node.db), cell('td', 'peers', peers || '—'));
    row.cells[0].scope = 'row';
    row.querySelector('.db').dataset.state = node.db;
    return row;
  });
  body.replaceChildren(...rows);
}

function showProducts(view) {
  const box = $('#products');
  for (const product of view.products) {
    let article = $(`article.product[data-product-id="${product.id}"]`, box);
    if (!article) {
      article = productArticle(product);
      box.append(article);
    }
    updateProduct(article, product, view);
  }
}

function productArticle(product) {
  const article = element('article', 'product');
  article.dataset.productId = product.id;
  const head = element('header', 'product__head');
  const title = element('h3', 'product__name');
  title.append(text('span', 'sku', product.sku), ' ', product.name);
  head.append(title, text('span', 'state', ''), text('span', 'countdown', ''));
  const figures = element('dl', 'figures');
  for (const [label, cls] of [['sold', 'sold'], ['left', 'left'],
                               ['sales/s (10 s)', 'rate'], ['watching', 'watching']]) {
    const group = element('div');
    group.append(text('dt', '', label), text('dd', cls, '–'));
    figures.append(group);
  }
  const actions = element('div', 'actions');
  const at = element('input', 'schedule-at');
  at.type = 'datetime-local';
  at.setAttribute('aria-label', `Release ${product.sku} at (your local time; empty: in 60 s)`);
  const closes = element('input', 'draw-closes');
  closes.type = 'datetime-local';
  closes.setAttribute('aria-label', `${product.sku}'s draw closes at (your local time; empty: in 10 minutes)`);
  actions.append(button('release-now', 'Release now', () => releaseNow(product)),
                 at, button('schedule', 'Schedule', () => schedule(product, at)),
                 button('cancel-schedule', 'Cancel schedule', () => cancelSchedule(product)),
                 closes, button('draw', 'Draw', () => releaseAsDraw(product, at, closes)));
  article.append(head, figures, actions, sizesTable(product));
  return article;
}

function sizesTable(product) {
  const table = element('table', 'sizes');
  const headRow = element('tr');
  for (const label of ['size', 'pairs', 'level', '']) headRow.append(text('th', '', label));
  table.append(element('thead'), element('tbody'));
  table.tHead.append(headRow);
  for (const item of product.items) {
    const row = element('tr', 'size');
    row.dataset.itemId = item.id;
    row.append(text('td', 'size-name', item.size), text('td', 'count', ''),
               text('td', 'level', ''));
    const action = element('td');
    action.append(button('restock', 'Restock', () => restock(product, item)));
    action.firstChild.setAttribute('aria-label', `Restock size ${item.size} of ${product.sku}`);
    row.append(action);
    table.tBodies[0].append(row);
  }
  return table;
}

function updateProduct(article, product, view) {
  article.dataset.state = product.state;
  article.dataset.draw = product.draw ? drawLine(product.draw) : '';
  article.dataset.releaseAt = product.release_at || '';
  const state = $('.state', article);
  state.textContent = STATE_WORDS[product.state] || product.state;
  state.dataset.state = product.state;
  $('.sold', article).textContent = product.sold ?? '?';
  $('.left', article).textContent = product.left;
  const rate = product.sales_per_s;   // over the last 10 s
  $('.rate', article).textContent = rate == null ? '–' : rate.toFixed(1);
  $('.watching', article).textContent = watchingOf(view, product.id);
  const done = product.state === 'released' || Boolean(product.draw);
  $('.release-now', article).hidden = done;
  $('.schedule', article).hidden = done;
  $('.schedule-at', article).hidden = done;
  $('.cancel-schedule', article).hidden = product.state !== 'scheduled' || Boolean(product.draw);
  $('.draw', article).hidden = done;
  $('.draw-closes', article).hidden = done;
  for (const item of product.items) {
    const row = $(`tr.size[data-item-id="${item.id}"]`, article);
    if (!row) continue;
    $('.count', row).textContent = item.count;
    const level = $('.level', row);
    level.textContent = item.level;
    level.dataset.level = item.level;
  }
  countdown(article);
}

// A draw's window and its entries so far (drawn: the draw is over).
function drawLine(draw) {
  const entries = Object.values(draw.entries).reduce((sum, n) => sum + n, 0);
  const closes = new Date(draw.closes_at).toLocaleTimeString();
  if (draw.state === 'scheduled') return `draw opens ${new Date(draw.opens_at).toLocaleTimeString()}, closes ${closes}`;
  if (draw.state === 'drawn') return `drawn at the close (${closes})`;
  return `closes ${closes} · ${entries} entr${entries === 1 ? 'y' : 'ies'}`;
}

function countdown(article) {
  const box = $('.countdown', article);
  if (article.dataset.draw) {
    box.textContent = article.dataset.draw;
    return;
  }
  if (article.dataset.state !== 'scheduled' || !article.dataset.releaseAt) {
    box.textContent = '';
    return;
  }
  const at = new Date(article.dataset.releaseAt);
  const left = Math.max(0, Math.ceil((at - (Date.now() + clockOffset)) / 1000));
  const [h, m, s] = [Math.floor(left / 3600), Math.floor(left / 60) % 60, left % 60];
  const pad = (n) => String(n).padStart(2, '0');
  box.textContent = `at ${at.toLocaleTimeString()} · in ${h ? `${h}:` : ''}${pad(m)}:${pad(s)}`;
}

// -- the chart (uPlot, static/vendor/) -------------------------------------

function drawChart(now) {
  const box = $('#chart');
  const end = Math.max(now, ...[...sales.values()].flatMap((m) => [...m.keys()]));
  const xs = [];
  for (let t = end - WINDOW_S + 1; t <= end; t += 1) xs.push(t);
  const products = latest ? latest.products : [];
  const names = new Map(products.map((p) => [String(p.id), p.sku]));
  const shown = [...sales.entries()]
    .filter(([, points]) => [...points].some(([t, n]) => t > end - WINDOW_S && n > 0))
    .map(([id]) => id).sort((a, b) => a - b);
  let total = 0;
  const ys = shown.map((id) => xs.map((t) => {
    const value = sales.get(id).get(t);
    total += value || 0;
    return value ?? null;
  }));
  for (const [id] of sales) {
    for (const t of sales.get(id).keys()) if (t <= end - WINDOW_S) sales.get(id).delete(t);
  }
  box.dataset.soldTotal = String(Math.round(total * 100) / 100);
  box.dataset.points = String(xs.length);
  const key = shown.map((id) => `${id}:${names.get(id) || ''}`).join(',');
  if (!window.uPlot) return;
  if (!chart || key !== chartKey) {
    if (chart) chart.destroy();
    chartKey = key;
    chart = new uPlot(chartOptions(box, shown, names), [xs, ...ys], box);
  } else {
    chart.setData([xs, ...ys]);
  }
}

const COLOURS = ['#ff4f1f', '#2563eb', '#15803d', '#9333ea', '#b45309',
                 '#0f766e', '#be185d', '#4b5563'];

function chartOptions(box, shown, names) {
  return {
    width: Math.max(300, box.clientWidth || 600),
    height: 220,
    scales: {y: {range: (u, min, max) => [0, Math.max(5, Math.ceil(max * 1.1))]}},
    axes: [{}, {label: 'pairs/s', size: 50}],
    series: [{}, ...shown.map((id, n) => ({
      label: names.get(id) || `product ${id}`,
      stroke: COLOURS[n % COLOURS.length],
      width: 2,
      spanGaps: true,
      points: {show: false},
    }))],
  };
}

// -- actions -----------------------------------------------------------------

async function releaseNow(product) {
  if (!await confirmed(`Release ${product.sku} ${product.name} now, on every node?`)) return;
  const answer = await send('POST', `/admin/api/products/${product.id}/release`);
  report(answer, () => `Released ${product.sku}.`);
}

async function schedule(product, input) {
  const at = input.value
    ? new Date(input.value)
    : new Date(Date.now() + clockOffset + 60_000);
  if (Number.isNaN(at.getTime())) return say('Pick a moment first.');
  if (!await confirmed(`Release ${product.sku} at ${at.toLocaleString()} (your time), on every node?`)) return;
  const answer = await send('POST', `/admin/api/products/${product.id}/schedule`,
                            {at: at.toISOString()});
  report(answer, () => `Scheduled ${product.sku} for ${at.toLocaleString()}.`);
}

async function releaseAsDraw(product, atInput, closesInput) {
  const now = Date.now() + clockOffset;
  const at = atInput.value ? new Date(atInput.value) : null;
  const closes = closesInput.value
    ? new Date(closesInput.value)
    : new Date((at ? at.getTime() : now) + 600_000);
  if (Number.isNaN(closes.getTime())) return say('Pick when the draw closes first.');
  const opens = at ? `from ${at.toLocaleString()}` : 'from now';
  if (!await confirmed(`Release ${product.sku} as a draw ${opens} until ${closes.toLocaleString()} (your time)? Shoppers enter; the winners are drawn at the close.`)) return;
  const answer = await send('POST', `/admin/api/products/${product.id}/draw`,
                            {closes: closes.toISOString(), at: at && at.toISOString()});
  report(answer, (body) => `${product.sku} is a draw until ${new Date(body.closes_at).toLocaleString()}; commitment ${body.commitment.slice(0, 16)}…`);
}

async function cancelSchedule(product) {
  if (!await confirmed(`Cancel the scheduled release of ${product.sku}?`)) return;
  const answer = await send('POST', `/admin/api/products/${product.id}/schedule`,
                            {at: null});
  report(answer, () => `${product.sku} is no longer scheduled.`);
}

async function restock(product, item) {
  const count = await confirmed(`Add pairs of ${product.sku} size ${item.size} (${item.sku})?`, true);
  if (!count) return;
  const answer = await send('POST', `/admin/api/items/${item.id}/restock`, {count});
  report(answer, (body) => `Restocked ${item.sku}: ${count} pairs added, ${body.count} now.`);
}

async function setPaused(paused) {
  const question = paused
    ? 'Pause all sales on every node? Purchases will be refused until you resume.'
    : 'Resume sales on every node?';
  if (!await confirmed(question)) return;
  const answer = await send('POST', '/admin/api/sales', {paused});
  report(answer, () => (paused ? 'Sales paused on every node.' : 'Sales resumed.'));
}

function confirmed(question, askCount = false) {
  const dialog = $('#confirm');
  $('#confirm-text').textContent = question;
  $('#confirm-count-label').hidden = !askCount;
  const count = $('#confirm-count');
  count.value = '10';
  dialog.returnValue = '';
  dialog.showModal();
  (askCount ? count : $('#confirm-ok')).focus();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      if (dialog.returnValue !== 'ok') return resolve(false);
      if (!askCount) return resolve(true);
      const n = Number(count.value);
      if (!Number.isInteger(n) || n < 1) {
        say('Restock needs a whole number of pairs, 1 or more.');
        return resolve(false);
      }
      return resolve(n);
    }, {once: true});
  });
}

function report(answer, success) {
  if (answer.ok) return say(success(answer.body));
  if (answer.status === 401) setSignedIn(false, 'Your session ended: sign in again.');
  say(`Not done: ${ERROR_WORDS[answer.error] || answer.error}.`, true);
}

function say(message, failed = false) {
  const result = $('#result');
  result.textContent = message;
  result.dataset.outcome = failed ? 'failed' : 'done';
}

async function send(method, path, body) {
  const options = {method, headers: {}, cache: 'no-store'};
  if (body !== undefined) {
    options.headers['Content-Type'] = 'application/json';
    options.body = JSON.stringify(body);
  }
  try {
    const answer = await fetch(path, options);
    const data = await answer.json().catch(() => ({}));
    return {ok: answer.ok, status: answer.status, body: data,
            error: data.error || `HTTP ${answer.status}`,
            retryAfter: answer.headers.get('Retry-After')};
  } catch (error) {
    return {ok: false, status: 0, body: {}, error: 'the node cannot be reached'};
  }
}

// -- small DOM helpers -------------------------------------------------------

function element(tag, cls) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  return node;
}

function text(tag, cls, value) {
  const node = element(tag, cls);
  node.textContent = value;
  return node;
}

function cell(tag, cls, value) {
  return text(tag, cls, String(value));
}

function button(cls, label, onClick) {
  const node = text('button', cls, label);
  node.type = 'button';
  node.addEventListener('click', onClick);
  return node;
}

// -- start -------------------------------------------------------------------

$('#signin').addEventListener('submit', signIn);
$('#signout').addEventListener('click', signOut);
$('#pause').addEventListener('click', () => setPaused(true));
$('#resume').addEventListener('click', () => setPaused(false));
$('#confirm-cancel').addEventListener('click', () => $('#confirm').close('cancel'));
setInterval(() => {
  for (const article of document.querySelectorAll('article.product')) countdown(article);
}, 250);
if (document.body.dataset.signedIn === 'true') connect();
