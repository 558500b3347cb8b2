"""Server-Sent Events: what a subscriber of `/events` sees.

Pure tests drive `format_event`, `level_of` and `EventHub` directly;
the rest talk to a real node process over HTTP.
"""

import json
import os
import re
import resource
import signal
import socket
import time
from types import SimpleNamespace

import bottle
import gevent
import pytest
from conftest import SSEClient, _process_state, call, wait_until

import sneakers23

LEVELS = ('out', 'low', 'medium', 'high')


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def parse_chunk(chunk):
    """A stream's bytes as (retry, [(id, name, data)]); strict format."""
    text = chunk.decode()
    assert text.endswith('\n\n'), text
    retry, events = None, []
    for block in text[:-2].split('\n\n'):
        lines = block.split('\n')
        if lines[0].startswith('retry: '):
            assert len(lines) == 1, block
            retry = int(lines[0][len('retry: '):])
            continue
        assert len(lines) == 3, block
        assert lines[0].startswith('id: '), block
        assert lines[1].startswith('event: '), block
        assert lines[2].startswith('data: '), block
        events.append((lines[0][4:], lines[1][7:], json.loads(lines[2][6:])))
    return retry, events


def fake_inventory():
    """Two products of four items at 0, 149, 150 and 500 pairs.

    Loaded the way `WritePath.load` does it, from `catalog_rows()`-shaped
    rows: a product row and (id, product_id, sku, size, count, version).
    """
    inventory = sneakers23.Inventory()
    rows, item_id = [], 0
    for product_id in (1, 2):
        row = SimpleNamespace(
            id=product_id, sku=f'P{product_id}', brand='B', name='N',
            color='c', price_cents=100, image='p.svg', position=product_id,
            released=product_id == 1, release_at=None)
        items = []
        for size, count in (('9', 0), ('10', 149), ('11', 150),
                            ('12', 500)):
            item_id += 1
            items.append((item_id, product_id, f'P{product_id}-{size}',
                          size, count, 1))
        rows.append((row, items))
    inventory.load(rows)
    return inventory


def snapshot_core(data):
    """A snapshot body without the optional `size_html` of products.

    The contract's snapshot entry is {product_id, released, items}; a
    released product may also carry its `size_html` (then it must have
    one size button per item, and only released products have it).
    """
    core = []
    for entry in data['products']:
        html = entry.get('size_html')
        if html is not None:
            assert entry['released'], entry
            assert html.count('size-container__entry ') == len(
                entry['items'])
        core.append({k: entry[k] for k in ('product_id', 'released',
                                           'items')})
    return {'products': core}


def first_chunk(hub, products=None, last_event_id=None):
    """The opening bytes of one stream."""
    return hub.opening(products, last_event_id)[1]


def publish_n(hub, n, product_id=1):
    """Publish `n` stock_change events; their ids."""
    ids = []
    for i in range(n):
        hub.publish('stock_change', product_id,
                    {'product_id': product_id, 'item_id': i,
                     'level': LEVELS[i % 4]})
        ids.append(hub.last_event_id)
    return ids


def streams(node):
    """How many SSE streams the node reports open."""
    status, _, health = node.get('/healthz')
    assert status == 200
    return health['streams']


def buy(node, item_id):
    """One purchase by a brand new shopper (no cookie): must succeed."""
    status, _, answer = node.post('/api/purchase', {'item_id': item_id})
    assert status == 201, answer
    return answer


def items_of(node, product_id):
    return next(p['items'] for p in node.products()
                if p['id'] == product_id)


def low_item(node, product_id, skip=()):
    """An item of the product with 1..149 pairs."""
    return next(i for i in items_of(node, product_id)
                if 0 < i['count'] < 150 and i['id'] not in skip)


def raise_to(node, item, target):
    """Restock `item` (a /api/products dict) up to exactly `target`."""
    answer = node.restock(item['id'], target - item['count'])
    assert answer['count'] == target, answer


def seq_of(event_id):
    epoch, _, seq = event_id.rpartition('-')
    assert epoch and seq.isdigit(), event_id
    return int(seq)


def raw_get(node, path, header=b''):
    """Status and head of the answer to a hand-written GET (raw bytes)."""
    with socket.create_connection(('127.0.0.1', node.port)) as sock:
        sock.settimeout(3)
        sock.sendall(b'GET ' + path.encode() + b' HTTP/1.1\r\nHost: x\r\n'
                     + header + b'\r\n')
        data = b''
        deadline = time.monotonic() + 3
        while b'\r\n\r\n' not in data or (
                data.startswith(b'HTTP/1.1 200') and b'event: ' not in data):
            if time.monotonic() > deadline:
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b' ', 2)[1]), data


def summary(events):
    """(event, product_id, item_id, level) of parsed SSE events."""
    return [(e['event'], e['data'].get('product_id'),
             e['data'].get('item_id'), e['data'].get('level'))
            for e in events]


def parsed(client):
    return [dict(e, data=json.loads(e['data'])) for e in client.events]


# ---------------------------------------------------------------------------
# Pure: encoding and levels
# ---------------------------------------------------------------------------

def test_format_event_exact_bytes():
    data = {'product_id': 1, 'item_id': 7, 'level': 'low'}
    assert sneakers23.format_event('stock_change', data, 'abc-42') == (
        b'id: abc-42\n'
        b'event: stock_change\n'
        b'data: {"product_id":1,"item_id":7,"level":"low"}\n'
        b'\n')


def test_format_event_keeps_multiline_html_on_one_data_line():
    html = '<div class="x">\n  <button value="1">9</button>\n</div>\n'
    data = {'product_id': 3, 'size_html': html, 'items': []}
    raw = sneakers23.format_event('released', data, 'e-1')
    text = raw.decode()
    assert text.endswith('\n\n') and text.count('\n\n') == 1
    lines = text[:-2].split('\n')
    assert lines[:2] == ['id: e-1', 'event: released']
    assert len(lines) == 3 and lines[2].startswith('data: ')
    assert json.loads(lines[2][len('data: '):]) == data
    assert ', ' not in lines[2] and '": ' not in lines[2]


@pytest.mark.parametrize('count, level', [
    (-1, 'out'), (0, 'out'), (1, 'low'), (149, 'low'), (150, 'medium'),
    (499, 'medium'), (500, 'high'), (10**6, 'high')])
def test_level_of_boundaries(count, level):
    assert sneakers23.level_of(count) == level


# ---------------------------------------------------------------------------
# Pure: the hub without HTTP
# ---------------------------------------------------------------------------

def test_inventory_changes_become_stock_change_only_on_level_change():
    inventory = fake_inventory()
    hub = sneakers23.EventHub(inventory, buffer_size=64)
    inventory.listen(hub.on_inventory)
    start = hub.last_event_id
    inventory.item_changed(2, 148, 2)   # 149 -> 148: low, no event
    inventory.item_changed(3, 149, 2)   # 150 -> 149: medium -> low
    inventory.item_changed(4, 499, 2)   # 500 -> 499: high -> medium
    inventory.item_changed(4, 498, 2)   # stale version: ignored
    inventory.item_changed(3, 150, 3)   # back to medium
    inventory.item_changed(2, 0, 3)     # sold out
    inventory.item_changed(1, 0, 2)     # still 0: `out` is always told
    _, events = parse_chunk(first_chunk(hub, None, start))
    assert [(name, d['item_id'], d['level']) for _, name, d in events] == [
        ('stock_change', 3, 'low'), ('stock_change', 4, 'medium'),
        ('stock_change', 3, 'medium'), ('stock_change', 2, 'out'),
        ('stock_change', 1, 'out')]
    assert all(d['product_id'] == 1 for _, _, d in events)


def test_release_becomes_released_event_with_size_html():
    inventory = fake_inventory()
    hub = sneakers23.EventHub(inventory, buffer_size=64)
    inventory.listen(hub.on_inventory)
    start = hub.last_event_id
    at = sneakers23.utcnow()
    inventory.product_released(2, at)
    inventory.product_released(2, at)   # already released: no event
    _, events = parse_chunk(first_chunk(hub, None, start))
    assert len(events) == 1
    _, name, data = events[0]
    assert name == 'released' and data['product_id'] == 2
    assert data['items'] == [
        {'id': 5, 'size': '9', 'level': 'out'},
        {'id': 6, 'size': '10', 'level': 'low'},
        {'id': 7, 'size': '11', 'level': 'medium'},
        {'id': 8, 'size': '12', 'level': 'high'}]
    assert data['size_html'].count('size-container__entry ') == 4


def test_stream_without_last_event_id_opens_with_retry_only():
    hub = sneakers23.EventHub(fake_inventory(), buffer_size=8)
    publish_n(hub, 3)
    for last_id in (None, ''):
        chunk = first_chunk(hub, None, last_id)
        assert chunk.startswith(b'retry: ')
        retry, events = parse_chunk(chunk)
        assert retry > 0 and events == []
    assert hub.open_streams == 0


def test_stream_replays_events_missed_after_a_known_id():
    hub = sneakers23.EventHub(fake_inventory(), buffer_size=8)
    ids = publish_n(hub, 4)
    chunk = first_chunk(hub, None, ids[0])
    retry, events = parse_chunk(chunk)
    assert retry > 0
    assert [e[0] for e in events] == ids[1:]
    assert [e[2]['item_id'] for e in events] == [1, 2, 3]
    expected = b''.join(
        sneakers23.format_event('stock_change', data, event_id)
        for event_id, _, data in events)
    assert chunk.endswith(expected)
    # up to date: nothing to replay
    assert parse_chunk(first_chunk(hub, None, ids[-1]))[1] == []


@pytest.mark.parametrize('last_id', [
    'zzz-5', 'garbage', '-', '{epoch}-', '{epoch}-x1', '{epoch}--1',
    '{epoch}-999', 'zzz-1-2', '{epoch}-\u00b2'])
def test_stream_sends_snapshot_for_an_unusable_last_event_id(last_id):
    hub = sneakers23.EventHub(fake_inventory(), buffer_size=8)
    publish_n(hub, 3)
    chunk = first_chunk(hub, None, last_id.format(epoch=hub.epoch))
    retry, events = parse_chunk(chunk)
    assert retry > 0 and len(events) == 1
    event_id, name, data = events[0]
    assert (event_id, name) == (hub.last_event_id, 'snapshot')
    assert snapshot_core(data) == {'products': [
        {'product_id': 1, 'released': True, 'items': [
            {'id': 1, 'level': 'out'}, {'id': 2, 'level': 'low'},
            {'id': 3, 'level': 'medium'}, {'id': 4, 'level': 'high'}]},
        {'product_id': 2, 'released': False, 'items': [
            {'id': 5, 'level': 'out'}, {'id': 6, 'level': 'low'},
            {'id': 7, 'level': 'medium'}, {'id': 8, 'level': 'high'}]}]}


def test_stream_sends_snapshot_when_missed_events_left_the_ring():
    hub = sneakers23.EventHub(fake_inventory(), buffer_size=3)
    ids = publish_n(hub, 6)       # the ring keeps ids[3:]
    _, events = parse_chunk(first_chunk(hub, None, ids[2]))
    assert [e[0] for e in events] == ids[3:]
    for old in (ids[1], ids[0], f'{hub.epoch}-0'):
        _, events = parse_chunk(first_chunk(hub, None, old))
        assert [(e[0], e[1]) for e in events] == [
            (hub.last_event_id, 'snapshot')]


def test_stream_products_filter_applies_to_replay_and_snapshot():
    hub = sneakers23.EventHub(fake_inventory(), buffer_size=16)
    start = hub.last_event_id
    publish_n(hub, 2, product_id=1)
    two = publish_n(hub, 2, product_id=2)
    publish_n(hub, 1, product_id=1)
    _, events = parse_chunk(first_chunk(hub, {2}, start))
    assert [e[0] for e in events] == two
    assert {e[2]['product_id'] for e in events} == {2}
    _, events = parse_chunk(first_chunk(hub, {1, 2}, start))
    assert len(events) == 5
    _, events = parse_chunk(first_chunk(hub, {2}, 'zzz-5'))
    assert [e[1] for e in events] == ['snapshot']
    assert [p['product_id'] for p in events[0][2]['products']] == [2]


class InProcessServer:
    """A hub served by the node's own server class, in this process."""

    def __init__(self, hub, sndbuf=None):
        app = bottle.Bottle()
        app.node = SimpleNamespace(hub=hub)
        app.route('/events', 'GET', self._events)
        if sndbuf:
            self._old = sneakers23.SO_SNDBUF
            sneakers23.SO_SNDBUF = sndbuf
        try:
            self.server = sneakers23.make_server(app, '127.0.0.1', 0)
        finally:
            if sndbuf:
                sneakers23.SO_SNDBUF = self._old
        self.server.start()
        self.url = f'http://127.0.0.1:{self.server.server_port}'

    @staticmethod
    def _events():
        bottle.request.environ[sneakers23.STREAM_REQUEST] = (
            sneakers23.StreamRequest(None, None))
        return ''

    def stop(self):
        self.server.stop(timeout=1)


@pytest.fixture
def served_hub():
    """(hub, server): an EventHub on a fake inventory, really served."""
    hubs, servers = [], []

    def serve(buffer_size=8, sndbuf=None):
        hub = sneakers23.EventHub(fake_inventory(), buffer_size=buffer_size)
        hub.start()
        hubs.append(hub)
        servers.append(InProcessServer(hub, sndbuf))
        return hub, servers[-1]

    yield serve
    for server in servers:
        server.stop()
    for hub in hubs:
        hub.stop()


def test_stream_sends_keep_alive_comment_when_idle(monkeypatch,
                                                   served_hub):
    monkeypatch.setattr(sneakers23, 'SSE_KEEPALIVE', 0.05)
    hub, server = served_hub()
    client = SSEClient(server.url)
    try:
        wait_until(lambda: ': keep-alive' in client.raw, 2,
                   'a keep-alive comment')
        assert client.raw[0].startswith('retry: ')
        assert hub.open_streams == 1
    finally:
        client.close()
    wait_until(lambda: hub.open_streams == 0, 2, 'the stream removed')


def test_hub_cuts_off_a_real_socket_that_never_reads(monkeypatch,
                                                    served_hub):
    """Small buffers: a client that stops reading is cut off, alone."""
    monkeypatch.setattr(sneakers23, 'SSE_MAX_PENDING', 32 * 1024)
    hub, server = served_hub(buffer_size=32, sndbuf=4096)
    dead = socket.socket()
    dead.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    dead.connect(('127.0.0.1', server.server.server_port))
    dead.sendall(b'GET /events HTTP/1.1\r\nHost: x\r\n\r\n')
    reader = None
    try:
        wait_until(lambda: hub.open_streams == 1, 2, 'dead one open')
        reader = SSEClient(server.url)
        wait_until(lambda: hub.open_streams == 2, 2, 'reader open')
        padding = 'x' * 2000
        for n in range(1, 201):
            hub.publish('stock_change', 1, {'product_id': 1, 'item_id': n,
                                            'level': 'low', 'pad': padding})
            wait_until(lambda n=n: len(reader.events) == n, 1,
                       f'event {n} reached the reader')
        wait_until(lambda: hub.open_streams == 1, 4, 'dead one cut off')
        assert hub.cut_off == 1
        dead.settimeout(5)
        total = 0
        while chunk := dead.recv(65536):     # the server closed it
            total += len(chunk)
        assert total < 200 * 2000
        assert [seq_of(e['id']) for e in reader.events] == list(
            range(1, 201))
        # it comes back with its last id: too old now, so a snapshot
        _, events = parse_chunk(first_chunk(hub, None, f'{hub.epoch}-1'))
        assert [e[1] for e in events] == ['snapshot']
    finally:
        if reader:
            reader.close()
        dead.close()


def test_hub_cuts_off_a_stream_that_stalls_with_little_pending(
        monkeypatch, served_hub):
    """Too few events to fill the pending bound: a client that takes no
    byte for SSE_STALL_TIMEOUT while bytes wait is cut off all the same;
    one that reads is left alone."""
    monkeypatch.setattr(sneakers23, 'SSE_STALL_TIMEOUT', 0.5)
    hub, server = served_hub(buffer_size=64, sndbuf=4096)
    dead = socket.socket()
    dead.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    dead.connect(('127.0.0.1', server.server.server_port))
    dead.sendall(b'GET /events HTTP/1.1\r\nHost: x\r\n\r\n')
    reader = None
    try:
        wait_until(lambda: hub.open_streams == 1, 2, 'dead one open')
        reader = SSEClient(server.url)
        wait_until(lambda: hub.open_streams == 2, 2, 'reader open')
        padding = 'x' * 2000
        for n in range(1, 21):   # ~40 KB: far below SSE_MAX_PENDING
            hub.publish('stock_change', 1, {'product_id': 1, 'item_id': n,
                                            'level': 'low', 'pad': padding})
        wait_until(lambda: len(reader.events) == 20, 2, 'reader has all')
        wait_until(lambda: any(pending_bytes(hub)), 2, 'bytes wait')
        assert hub.cut_off == 0

        def stall_cut():
            hub.cut_stalled()
            return hub.open_streams == 1
        wait_until(stall_cut, 5, 'the stalled stream cut off')
        assert hub.cut_off == 1
        assert len(reader.events) == 20 and not reader._reader.dead
    finally:
        if reader:
            reader.close()
        dead.close()


# ---------------------------------------------------------------------------
# A node in this process (app_server): big replays to clients that never read
# ---------------------------------------------------------------------------

def health_of(server):
    status, _, answer = call(server.url, 'GET', '/healthz')
    assert status == 200, answer
    return answer


def pending_bytes(hub):
    """The unsent bytes of every open stream."""
    return [len(stream.pending) for stream in list(hub._streams)]


def test_big_replays_to_clients_that_never_read_are_bounded(app_server):
    """Hundreds of clients ask for a replay of thousands of events and
    never read: each is a stream from its first byte (whether the node
    replays or sends a snapshot), holds at most SSE_MAX_PENDING (+ one
    event) unsent, and is cut off as the drop goes on; the node ends
    with no stream open."""
    server = app_server()
    hub = server.node.hub
    item = next(iter(server.node.inventory.items.values()))
    data = {'product_id': item.product_id, 'item_id': item.id,
            'level': 'medium'}

    def publish(n):
        for _ in range(n):
            hub.publish('stock_change', item.product_id, data)

    start = hub.last_event_id
    event_size = len(sneakers23.format_event('stock_change', data, start))
    missed = int(0.8 * sneakers23.SSE_MAX_PENDING / event_size)
    publish(missed)     # asked for: the node may answer with a snapshot
    cut_before = health_of(server)['sse_cut_off']
    worst = [0]

    def watch_pending():
        while True:
            worst[0] = max([worst[0], *pending_bytes(hub)])
            gevent.sleep(0.005)

    watcher = gevent.spawn(watch_pending)
    clients = []
    try:
        for _ in range(200):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.connect(('127.0.0.1', server.server.server_port))
            clients.append(sock)
            sock.sendall(b'GET /events HTTP/1.1\r\nHost: x\r\n'
                         b'Last-Event-ID: ' + start.encode() + b'\r\n\r\n')
        wait_until(lambda: health_of(server)['streams'] == len(clients),
                   10, f'{len(clients)} streams open, each asking for '
                   f'{missed} missed events', interval=0.05)

        def all_cut_off():
            publish(100)        # the drop goes on
            return health_of(server)['streams'] == 0
        wait_until(all_cut_off, 30, 'every client that never reads cut '
                   'off', interval=0.05)
        cut = health_of(server)['sse_cut_off'] - cut_before
    finally:
        watcher.kill()
        for sock in clients:
            sock.close()
    print(f'\n[sse] {len(clients)} clients asked for {missed} events '
          f'({missed * event_size} bytes); worst pending {worst[0]} bytes',
          flush=True)
    assert cut == len(clients)
    assert hub.open_streams == 0
    assert worst[0] <= sneakers23.SSE_MAX_PENDING + event_size


# ---------------------------------------------------------------------------
# Real server
# ---------------------------------------------------------------------------

def test_stream_headers_retry_and_event_ids(sqlite_node, sse):
    client = sse(sqlite_node.url)
    assert client.headers['content-type'].startswith('text/event-stream')
    assert client.headers['cache-control'] == 'no-cache'
    assert client.headers['x-accel-buffering'] == 'no'
    wait_until(lambda: client.raw, 2, 'the stream opened')
    assert client.raw[0].startswith('retry: ')
    assert int(client.raw[0][len('retry: '):]) > 0
    sqlite_node.release(1)
    item = low_item(sqlite_node, 1)
    raise_to(sqlite_node, item, 150)
    buy(sqlite_node, item['id'])
    client.wait_for('stock_change', 2, count=2)
    epoch = sqlite_node.get('/healthz')[2]['event_id'].rpartition('-')[0]
    assert len(client.events) == 3
    seqs = []
    for event in client.events:
        assert re.fullmatch(re.escape(epoch) + r'-\d+', event['id'])
        seqs.append(seq_of(event['id']))
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # every event block in the raw lines starts with its id line
    blocks = '\n'.join(client.raw).split('\n\n')
    for block in blocks:
        if 'event: ' in block:
            assert block.strip('\n').startswith('id: '), block


def test_release_sends_released_event(node, sse):
    client = sse(node.url)
    wait_until(lambda: client.raw, 2, 'the stream opened')
    started = time.monotonic()
    node.release(1)
    [event] = client.wait_for('released')
    print(f'\n[timing] release -> SSE: '
          f'{(time.monotonic() - started) * 1000:.0f} ms')
    data = event['data']
    assert set(data) == {'product_id', 'size_html', 'items'}
    assert data['product_id'] == 1
    items = items_of(node, 1)
    assert data['items'] == [
        {'id': i['id'], 'size': i['size'], 'level': i['level']}
        for i in items]
    buttons = re.findall(r'<button\b[^>]*>', data['size_html'])
    assert len(buttons) == len(items)
    assert data['size_html'].count('size-container__entry ') == len(items)
    for button, item in zip(buttons, items, strict=True):
        assert (f'class="size-container__entry size-container__entry'
                f'--level-{item["level"]}"') in button
        assert f'value="{item["id"]}"' in button
        assert ('disabled' in button) == (item['level'] == 'out')
    # releasing again is idempotent: no second event before the marker
    node.release(1)
    node.release(2)
    client.wait_for('released', where=lambda d: d['product_id'] == 2)
    assert [d['product_id'] for d in
            (e['data'] for e in client.named('released'))] == [1, 2]


def test_only_level_crossing_purchases_send_stock_change(node, sse):
    node.release(1)
    low = low_item(node, 1)
    medium = next(i for i in items_of(node, 1)
                  if 150 <= i['count'] < 499)
    high = next(i for i in items_of(node, 1) if i['count'] > 501)
    client = sse(node.url)
    wait_until(lambda: client.raw, 2, 'the stream opened')
    raise_to(node, low, 150)        # low -> medium
    raise_to(node, medium, 500)     # medium -> high
    buy(node, high['id'])           # still high: nothing
    buy(node, low['id'])            # 150 -> 149: medium -> low
    buy(node, low['id'])            # 149 -> 148: nothing
    buy(node, medium['id'])         # 500 -> 499: high -> medium
    node.release(2)                 # marker: everything before is in
    client.wait_for('released', where=lambda d: d['product_id'] == 2)
    assert summary(parsed(client)) == [
        ('stock_change', 1, low['id'], 'medium'),
        ('stock_change', 1, medium['id'], 'high'),
        ('stock_change', 1, low['id'], 'low'),
        ('stock_change', 1, medium['id'], 'medium'),
        ('released', 2, None, None)]
    assert node.item(low['id'])['level'] == 'low'
    assert node.item(medium['id'])['level'] == 'medium'


def test_selling_the_last_pair_sends_out(sqlite_node, sse):
    node = sqlite_node
    item = min((i for p in node.products() for i in p['items']
                if i['count'] > 0), key=lambda i: i['count'])
    product_id = next(p['id'] for p in node.products()
                      if item in p['items'])
    assert item['count'] <= 5, item
    node.release(product_id)
    client = sse(node.url)
    wait_until(lambda: client.raw, 2, 'the stream opened')
    for _ in range(item['count']):
        buy(node, item['id'])
    status, _, answer = node.post('/api/purchase', {'item_id': item['id']})
    assert (status, answer) == (409, {'error': 'sold_out'})
    marker = low_item(node, product_id, skip={item['id']})
    raise_to(node, marker, 150)
    client.wait_for('stock_change', where=lambda d: d['item_id'] ==
                    marker['id'])
    assert summary(parsed(client)) == [
        ('stock_change', product_id, item['id'], 'out'),
        ('stock_change', product_id, marker['id'], 'medium')]
    assert node.item(item['id'])['level'] == 'out'


def test_products_filter_hides_other_products(sqlite_node, sse):
    node = sqlite_node
    only_two = sse(node.url, '/events?products=2')
    two_three = sse(node.url, '/events?products=3,2')
    everything = sse(node.url, '/events?products=')
    for client in (only_two, two_three, everything):
        wait_until(lambda c=client: c.raw, 2, 'the stream opened')
    node.release(1)
    raise_to(node, low_item(node, 1), 150)
    node.release(2)
    two = low_item(node, 2)
    raise_to(node, two, 150)
    node.release(3)
    everything.wait_for('released', where=lambda d: d['product_id'] == 3)
    two_three.wait_for('released', where=lambda d: d['product_id'] == 3)
    assert [s[:2] for s in summary(parsed(everything))] == [
        ('released', 1), ('stock_change', 1), ('released', 2),
        ('stock_change', 2), ('released', 3)]
    assert summary(parsed(only_two)) == [
        ('released', 2, None, None),
        ('stock_change', 2, two['id'], 'medium')]
    assert [s[:2] for s in summary(parsed(two_three))] == [
        ('released', 2), ('stock_change', 2), ('released', 3)]
    ids = [e['id'] for e in everything.events]
    assert [e['id'] for e in only_two.events] == ids[2:4]


@pytest.mark.parametrize('query, status, error', [
    ('abc', 400, None), ('1,abc', 400, None), ('1.5', 400, None),
    ('999', 404, 'not_found'), ('1,999', 404, 'not_found'),
    ('-1', 400, 'products must be a comma-separated list of ids'),
    ('%D9%A1', 400, 'products must be a comma-separated list of ids')])
def test_products_filter_errors_are_json(sqlite_node, query, status,
                                         error):
    got, headers, answer = sqlite_node.get(f'/events?products={query}')
    assert got == status
    assert headers['content-type'].startswith('application/json')
    assert isinstance(answer, dict) and isinstance(answer['error'], str)
    if error:
        assert answer['error'] == error
    assert streams(sqlite_node) == 0


def test_reconnect_with_last_event_id_replays_missed_events(sqlite_node,
                                                             sse):
    node = sqlite_node
    witness = sse(node.url)
    leaver = sse(node.url)
    for client in (witness, leaver):
        wait_until(lambda c=client: c.raw, 2, 'the stream opened')
    node.release(1)
    raise_to(node, low_item(node, 1), 150)
    leaver.wait_for('stock_change')
    last_seen = leaver.events[-1]['id']
    leaver.close()
    # missed while away
    node.release(2)
    raise_to(node, low_item(node, 2), 150)
    node.release(3)
    witness.wait_for('released', where=lambda d: d['product_id'] == 3)
    at = [e['id'] for e in witness.events].index(last_seen)
    missed = witness.events[at + 1:]
    assert len(missed) == 3
    by_header = sse(node.url, headers={'Last-Event-ID': last_seen})
    by_query = sse(node.url, f'/events?last_event_id={last_seen}')
    for client in (by_header, by_query):
        client.wait_for('released', where=lambda d: d['product_id'] == 3)
        assert client.raw[0].startswith('retry: ')
        assert client.events == missed
        assert client.named('snapshot') == []
    # and they stay live afterwards, with the next id
    raise_to(node, low_item(node, 3), 150)
    for client in (by_header, by_query):
        [event] = client.wait_for('stock_change',
                                  where=lambda d: d['product_id'] == 3)
        assert seq_of(event['id']) == seq_of(missed[-1]['id']) + 1


@pytest.mark.parametrize('raw_id', [b'\xb2', b'\xc2\xb2', b'zzz'])
def test_odd_bytes_in_last_event_id_get_a_snapshot(sqlite_node, raw_id):
    """No input may produce a 500: an unusable id means a snapshot."""
    epoch = sqlite_node.get('/healthz')[2]['event_id'].rpartition('-')[0]
    status, data = raw_get(sqlite_node, '/events',
                           b'Last-Event-ID: ' + epoch.encode() + b'-'
                           + raw_id + b'\r\n')
    assert status == 200, data
    assert b'event: snapshot' in data, data


def test_reconnect_with_unknown_id_gets_snapshot(sqlite_node, sse):
    node = sqlite_node
    node.release(1)
    item = low_item(node, 1)
    raise_to(node, item, 150)
    buy(node, item['id'])
    health = node.get('/healthz')[2]
    epoch = health['event_id'].rpartition('-')[0]
    products = node.products()
    expected = [{'product_id': p['id'], 'released': p['released'],
                 'items': [{'id': i['id'], 'level': i['level']}
                           for i in p['items']]} for p in products]
    for last_id in ('zzz-5', 'garbage', f'{epoch}-99999'):
        client = sse(node.url, headers={'Last-Event-ID': last_id})
        [event] = client.wait_for('snapshot', timeout=2)
        assert event['id'] == health['event_id']
        assert snapshot_core(event['data']) == {'products': expected}
        assert client.raw[0].startswith('retry: ')
    only_two = sse(node.url, '/events?products=2&last_event_id=zzz-5')
    [event] = only_two.wait_for('snapshot', timeout=2)
    assert snapshot_core(event['data']) == {'products': [expected[1]]}
    assert expected[1]['product_id'] == 2


def test_client_that_never_reads_does_not_slow_others(sqlite_node, sse):
    node = sqlite_node
    for product_id in (1, 2, 3, 4):
        node.release(product_id)
    dead = socket.socket()
    dead.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    dead.connect(('127.0.0.1', node.port))
    dead.sendall(b'GET /events HTTP/1.1\r\nHost: x\r\n\r\n')
    try:
        wait_until(lambda: streams(node) == 1, 2, 'dead stream open')
        client = sse(node.url)
        wait_until(lambda: streams(node) == 2, 2, 'live stream open')
        toggled = [i for p in (1, 2, 3, 4) for i in items_of(node, p)
                   if 0 < i['count'] < 150][:16]
        for item in toggled:
            raise_to(node, item, 150)
        client.wait_for('stock_change', count=len(toggled))
        before = len(client.events)
        rounds = 40

        def toggle(item_id):
            for _ in range(rounds):
                buy(node, item_id)          # 150 -> 149: low
                node.restock(item_id, 1)    # 149 -> 150: medium

        pool = [gevent.spawn(toggle, i['id']) for i in toggled]
        gevent.joinall(pool, raise_error=True)
        total = before + 2 * rounds * len(toggled)
        wait_until(lambda: len(client.events) >= total, 5,
                   'every event reached the reading client')
        assert len(client.events) == total
        burst = parsed(client)[before:]
        seqs = [seq_of(e['id']) for e in burst]
        assert seqs == list(range(seqs[0], seqs[0] + len(burst)))
        for item in toggled:
            levels = [e['data']['level'] for e in burst
                      if e['data']['item_id'] == item['id']]
            assert levels == ['low', 'medium'] * rounds
        # the dead one is still connected, and the next event still comes
        assert streams(node) == 2
        buy(node, toggled[0]['id'])
        wait_until(lambda: len(client.events) == total + 1, 5,
                   'the next event reached the reading client')
    finally:
        dead.close()


def test_disconnected_client_is_removed(sqlite_node, sse):
    node = sqlite_node
    node.release(1)
    assert streams(node) == 0
    stayer, leaver = sse(node.url), sse(node.url)
    wait_until(lambda: streams(node) == 2, 2, 'two streams open')
    leaver.close()
    item_id = low_item(node, 1)['id']

    def gone():
        # the server only notices on a write: make two events each time
        raise_to(node, node.item(item_id), 150)     # -> medium
        buy(node, item_id)                          # -> low
        return streams(node) == 1

    wait_until(gone, 5, 'the closed stream was dropped')
    assert stayer.named('stock_change')
    assert streams(node) == 1


def test_big_fan_outs_share_the_sends_with_a_thread(monkeypatch,
                                                     served_hub):
    """Above SSE_THREAD_FROM streams half the sends go to a native
    thread: every stream still gets every event once, in order."""
    monkeypatch.setattr(sneakers23, 'SSE_THREAD_FROM', 2)
    monkeypatch.setattr(sneakers23, 'SSE_FAN_OUT_SLICE', 2)
    hub, server = served_hub(buffer_size=64)
    clients = [SSEClient(server.url) for _ in range(7)]
    try:
        wait_until(lambda: hub.open_streams == 7, 2, 'seven streams open')
        ids = publish_n(hub, 10)
        clients[3].close()          # one leaves while events flow
        ids += publish_n(hub, 10)
        for n, client in enumerate(clients):
            if n == 3:
                continue
            wait_until(lambda c=client: len(c.events) == 20, 2,
                       f'client {n} got all 20 events')
            assert [e['id'] for e in client.events] == ids
        wait_until(lambda: hub.open_streams == 6, 2, 'the leaver removed')
    finally:
        for client in clients:
            client.close()


def test_rendering_again_compiles_no_new_template():
    """Bottle caches a compiled template per lookup list: rendering the
    same partials many times, with other allocations in between, must not
    grow that cache (the soak's leak, +4.6 MB a minute)."""
    inventory = fake_inventory()
    product = inventory.products[2]
    sneakers23.size_html(product)
    cached = len(bottle.TEMPLATES)
    for n in range(2000):
        ballast = [[n] * 8 for _ in range(20)]  # ids of freed lists reused
        sneakers23.size_html(product)
        del ballast
    assert len(bottle.TEMPLATES) == cached


# ---------------------------------------------------------------------------
# The fan-out worker: the process that writes the shoppers' streams
# ---------------------------------------------------------------------------

def fan_out(node):
    return health_of(node)['fan_out']


def parent_of(pid):
    with open(f'/proc/{pid}/stat') as f:
        return int(f.read().rpartition(')')[2].split()[1])


def holders(server_port, client_port):
    """Pids of the processes holding the server's end of the loopback
    TCP connection from `client_port` to `server_port`."""
    inodes = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if (int(local.rsplit(':', 1)[1], 16) == server_port
                        and int(remote.rsplit(':', 1)[1], 16) == client_port):
                    inodes.add(f'socket:[{fields[9]}]')
    found = set()
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            fds = os.listdir(f'/proc/{pid}/fd')
            if any(os.readlink(f'/proc/{pid}/fd/{fd}') in inodes
                   for fd in fds):
                found.add(int(pid))
        except OSError:
            continue
    return found


def test_streams_are_written_by_the_nodes_fan_out_worker(sqlite_node, sse):
    """After its opening a stream belongs to the node's fan-out worker, a
    child process the first stream starts: it holds the socket, counts
    it for /healthz, and writes it every event."""
    node = sqlite_node
    node.release(1)
    assert fan_out(node)['pid'] is None   # nobody watches yet
    client = sse(node.url, '/events?products=1')
    wait_until(lambda: streams(node) == 1, 5, 'the worker counts it')
    worker = fan_out(node)
    assert worker['process'] == 'worker' and worker['restarts'] == 0
    assert parent_of(worker['pid']) == node.proc.pid
    assert worker['rss_bytes'] > 0
    assert holders(node.port, client.port) == {worker['pid']}
    item = low_item(node, 1)
    raise_to(node, item, 150)
    buy(node, item['id'])
    levels = [e['data']['level'] for e in
              client.wait_for('stock_change', count=2)]
    assert levels == ['medium', 'low']


def test_a_killed_fan_out_worker_is_replaced_and_shoppers_resume(
        sqlite_node, sse):
    """kill -9 of the worker ends its streams; the node starts another,
    and a shopper who comes back with Last-Event-ID gets what happened
    meanwhile from the node's ring, then the next events from the new
    worker, in order."""
    node = sqlite_node
    node.release(1)
    first = sse(node.url, '/events?products=1')
    wait_until(lambda: streams(node) == 1, 5, 'the worker counts it')
    item = low_item(node, 1)
    raise_to(node, item, 150)
    seen = first.wait_for('stock_change')[-1]['id']
    old = fan_out(node)['pid']
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: first._reader.dead, 5, 'the stream ended with it')
    buy(node, item['id'])                                   # -> low
    wait_until(lambda: fan_out(node)['pid'] not in (None, old), 10,
               'a new worker')
    back = sse(node.url, '/events?products=1',
               headers={'Last-Event-ID': seen})
    back.wait_for('stock_change')
    raise_to(node, node.item(item['id']), 150)              # -> medium
    events = back.wait_for('stock_change', count=2)
    assert [e['data']['level'] for e in events] == ['low', 'medium']
    assert [seq_of(e['id']) for e in events] == [
        seq_of(seen) + 1, seq_of(seen) + 2]
    wait_until(lambda: streams(node) == 1, 5, 'the new worker counts it')
    health = health_of(node)
    assert health['ok'] and health['fan_out']['restarts'] == 1
    assert 'the fan-out worker' in ''.join(node.output)


@pytest.mark.parametrize('how', [signal.SIGTERM, signal.SIGKILL])
def test_the_fan_out_worker_ends_with_its_node(start_node, sqlite_url, sse,
                                               how):
    """Stopped or killed, a node leaves no worker behind, and the
    worker's shoppers see their streams end (they reconnect)."""
    node = start_node(sqlite_url)
    client = sse(node.url)
    wait_until(lambda: streams(node) == 1, 5, 'the worker counts it')
    pid = fan_out(node)['pid']
    node.stop(how)
    wait_until(lambda: _process_state(pid) in ('', 'Z'), 5,
               'the worker is gone')
    wait_until(lambda: client._reader.dead, 5, 'the stream ended')


def test_a_worker_out_of_file_descriptors_keeps_streams_paired(sqlite_node,
                                                                sse):
    """Past the worker's file limit a stream handed over is closed (its
    shopper reconnects later); the streams before and after it keep
    their own filters and cursors: nobody gets another's events."""
    node = sqlite_node
    node.release(1)
    node.release(2)
    ones = [sse(node.url, '/events?products=1')]   # starts the worker
    wait_until(lambda: streams(node) == 1, 5, 'the worker counts it')
    pid = fan_out(node)['pid']
    room = len(os.listdir(f'/proc/{pid}/fd')) + 8
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (room, room))
    ones += [sse(node.url, '/events?products=1') for _ in range(12)]

    def settled():
        closed = sum(c._reader.dead for c in ones)
        return closed and closed + streams(node) == len(ones)
    wait_until(settled, 5, 'streams kept or closed for want of files')
    kept = [c for c in ones if not c._reader.dead]
    assert len(kept) >= 2
    kept.pop().close()
    wait_until(lambda: streams(node) == len(kept), 5, 'one left')
    two = sse(node.url, '/events?products=2')
    wait_until(lambda: streams(node) == len(kept) + 1, 5,
               'the newcomer kept in the room the leaver made')
    for product_id in (1, 2):
        raise_to(node, low_item(node, product_id), 150)
    for client in kept:
        events = client.wait_for('stock_change')
        assert [e['data']['product_id'] for e in events] == [1]
    events = two.wait_for('stock_change')
    assert [e['data']['product_id'] for e in events] == [2]
    assert 'out of file descriptors' in ''.join(node.output)
