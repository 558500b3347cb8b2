"""The HTTP API and page of one real node, as shoppers and operators use it."""

import contextlib
import http.client
import itertools
import json
import math
import re
import socket
import sqlite3
import time
import urllib.parse
from collections import Counter
from datetime import UTC, datetime, timedelta

import gevent
import pytest
from conftest import (
    TOKEN,
    admin_headers,
    buy_concurrently,
    call,
    db_rows,
    product_row,
    wait_until,
)

import sneakers23


def low_stock_item(node, product_id):
    """The in-stock item of a product with the fewest pairs."""
    product = next(p for p in node.products() if p['id'] == product_id)
    return min((i for i in product['items'] if i['count'] > 0),
               key=lambda i: i['count'])


def counts(node):
    return {i['id']: i['count'] for p in node.products() for i in p['items']}


def test_purchase_storm_sells_exactly_the_stock(node, db_url):
    node.release(1)
    item = low_stock_item(node, 1)
    stock = item['count']
    buyers = max(250, stock + 150)

    answers = buy_concurrently(node.url, [item['id']] * buyers)

    statuses = Counter(status for status, _, _ in answers)
    assert statuses == {201: stock, 409: buyers - stock}
    assert {body['error'] for status, _, body in answers
            if status == 409} == {'sold_out'}
    order_ids = sorted(body['order_id'] for status, _, body in answers
                       if status == 201)
    rows = db_rows(db_url, 'SELECT id FROM orders WHERE item_id = ?',
                   (item['id'],))
    assert sorted(r[0] for r in rows) == order_ids
    assert node.item(item['id'])['count'] == 0
    assert node.item(item['id'])['level'] == 'out'
    (count,), = db_rows(db_url, 'SELECT count FROM availability '
                                'WHERE item_id = ?', (item['id'],))
    assert count == 0


def test_restart_shows_the_same_counts(node):
    node.release(1)
    item = low_stock_item(node, 1)
    buy_concurrently(node.url, [item['id']] * 5)
    before = node.products()

    node.restart()

    assert node.products() == before
    assert node.item(item['id'])['count'] == item['count'] - 5


def test_one_pair_per_shopper_per_product(sqlite_node):
    node = sqlite_node
    node.release(1)
    first, second = [i for i in node.products()[0]['items']
                     if i['count'] > 1][:2]
    status, headers, body = node.post('/api/purchase',
                                      {'item_id': first['id']})
    assert status == 201
    assert set(body) == {'order_id', 'item_id', 'product_id'}
    cookie = headers['set-cookie']
    assert 'httponly' in cookie.lower()
    assert 'samesite=lax' in cookie.lower()
    shopper = cookie.split(';')[0]

    status, _, body = node.post('/api/purchase', {'item_id': second['id']},
                                headers={'Cookie': shopper})
    assert (status, body) == (409, {'error': 'already_purchased'})
    assert node.item(second['id'])['count'] == second['count']
    assert node.item(first['id'])['count'] == first['count'] - 1


def test_cookie_is_signed_not_trusted(sqlite_node):
    node = sqlite_node
    node.release(1)
    item = next(i for i in node.products()[0]['items'] if i['count'] > 2)
    _, headers, _ = node.post('/api/purchase', {'item_id': item['id']})
    name, value = headers['set-cookie'].split(';')[0].split('=', 1)
    shopper, _, mac = value.rpartition('.')
    assert shopper and len(mac) == 32
    forged = f'{name}=someone-else.{mac}'

    status, headers, _ = node.post('/api/purchase', {'item_id': item['id']},
                                   headers={'Cookie': forged})

    assert status == 201  # a forged cookie makes a new shopper
    assert 'set-cookie' in headers


def test_purchase_errors_of_state(sqlite_node):
    node = sqlite_node
    unreleased = node.products()[1]['items'][0]['id']
    assert node.post('/api/purchase', {'item_id': unreleased})[::2] == (
        403, {'error': 'not_released'})
    node.release(1)
    out = next(i for i in node.products()[0]['items'] if i['count'] == 0)
    assert node.post('/api/purchase', {'item_id': out['id']})[::2] == (
        409, {'error': 'sold_out'})


GOOD = {'Content-Type': 'application/json'}
AUTH = {**GOOD, **admin_headers()}

BAD_INPUTS = [
    # (name, method, path, headers, body bytes, status, error or None)
    ('malformed json', 'POST', '/api/purchase', GOOD, b'{"item_id": ',
     400, 'malformed JSON'),
    ('json array', 'POST', '/api/purchase', GOOD, b'[3]', 400, None),
    ('json string', 'POST', '/api/purchase', GOOD, b'"3"', 400, None),
    ('empty body', 'POST', '/api/purchase', GOOD, b'', 400, None),
    ('missing item_id', 'POST', '/api/purchase', GOOD, b'{}', 400, None),
    ('item_id string', 'POST', '/api/purchase', GOOD, b'{"item_id": "3"}',
     400, 'item_id must be an integer'),
    ('item_id float', 'POST', '/api/purchase', GOOD, b'{"item_id": 3.5}',
     400, None),
    ('item_id bool', 'POST', '/api/purchase', GOOD, b'{"item_id": true}',
     400, None),
    ('item_id null', 'POST', '/api/purchase', GOOD, b'{"item_id": null}',
     400, None),
    ('item_id NaN', 'POST', '/api/purchase', GOOD, b'{"item_id": NaN}',
     400, None),
    ('item_id negative', 'POST', '/api/purchase', GOOD,
     b'{"item_id": -3}', 400, None),
    ('item_id zero', 'POST', '/api/purchase', GOOD, b'{"item_id": 0}',
     400, None),
    ('item_id huge', 'POST', '/api/purchase', GOOD,
     b'{"item_id": 100000000000000000000000000000}', 400, None),
    ('item_id unknown', 'POST', '/api/purchase', GOOD,
     b'{"item_id": 987654}', 404, 'not_found'),
    ('not utf-8', 'POST', '/api/purchase', GOOD, b'\xff\xfe{', 400, None),
    ('text/plain', 'POST', '/api/purchase',
     {'Content-Type': 'text/plain'}, b'{"item_id": 3}', 415, None),
    ('form encoded', 'POST', '/api/purchase',
     {'Content-Type': 'application/x-www-form-urlencoded'}, b'item_id=3',
     415, None),
    ('no content type', 'POST', '/api/purchase', {}, b'{"item_id": 3}',
     415, None),
    ('too large', 'POST', '/api/purchase', GOOD,
     b'{"item_id": 3, "pad": "' + b'x' * 10000 + b'"}', 413, None),
    ('GET purchase', 'GET', '/api/purchase', {}, None, 405, None),
    ('release no token', 'POST', '/admin/api/products/2/release', GOOD,
     b'{}', 401, 'unauthorized'),
    ('release wrong token', 'POST', '/admin/api/products/2/release',
     {**GOOD, 'Authorization': 'Bearer nope'}, b'{}', 401, 'unauthorized'),
    ('release token prefix', 'POST', '/admin/api/products/2/release',
     {**GOOD, 'Authorization': f'Bearer {TOKEN[:-1]}'}, b'{}', 401, None),
    ('release basic auth', 'POST', '/admin/api/products/2/release',
     {**GOOD, 'Authorization': f'Basic {TOKEN}'}, b'{}', 401, None),
    ('release unknown', 'POST', '/admin/api/products/9999/release', AUTH,
     b'{}', 404, 'not_found'),
    ('release negative', 'POST', '/admin/api/products/-2/release', AUTH,
     b'{}', 404, None),
    ('release not a number', 'POST', '/admin/api/products/abc/release',
     AUTH, b'{}', 404, None),
    ('release dot-dot', 'POST', '/admin/api/products/../2/release', AUTH,
     b'{}', 404, None),
    ('restock no token', 'POST', '/admin/api/items/3/restock', GOOD,
     b'{"count": 5}', 401, None),
    ('restock zero', 'POST', '/admin/api/items/3/restock', AUTH,
     b'{"count": 0}', 400, None),
    ('restock negative', 'POST', '/admin/api/items/3/restock', AUTH,
     b'{"count": -5}', 400, None),
    ('restock string', 'POST', '/admin/api/items/3/restock', AUTH,
     b'{"count": "5"}', 400, None),
    ('restock huge', 'POST', '/admin/api/items/3/restock', AUTH,
     b'{"count": 99999999999}', 400, None),
    ('restock unknown item', 'POST', '/admin/api/items/99999/restock', AUTH,
     b'{"count": 5}', 404, None),
    ('static dot-dot', 'GET', '/static/../sneakers23.py', {}, None, 404,
     None),
    ('static encoded dot-dot', 'GET', '/static/%2e%2e/sneakers23.py', {},
     None, 404, None),
    ('static absolute', 'GET', '/static//etc/passwd', {}, None, 404, None),
    ('events bad filter', 'GET', '/events?products=1;DROP', {}, None, 400,
     None),
    ('unknown route', 'GET', '/admin/nothing-here', {}, None, 404, None),
]


def test_bad_input_answers_4xx_json_and_changes_nothing(node, db_url):
    node.release(1)
    before = node.products()
    for name, method, path, headers, body, status, error in BAD_INPUTS:
        got, got_headers, answer = call(node.url, method, path,
                                        headers=headers, raw=body)
        assert got == status, (name, got, answer)
        assert got_headers['content-type'].startswith('application/json')
        assert isinstance(answer, dict) and answer.get('error'), name
        if error:
            assert answer['error'] == error, (name, answer)
    assert node.products() == before
    assert db_rows(db_url, 'SELECT COUNT(*) FROM orders') == [(0,)]


def test_page_shows_the_catalogue(sqlite_node):
    node = sqlite_node
    node.release(1)
    status, headers, page = node.get('/')
    page = page.decode()
    assert status == 200
    assert headers['cache-control'] == 'no-store'
    assert headers['content-type'].startswith('text/html')
    products = node.products()
    ids = [int(i) for i in re.findall(r'data-product-id="(\d+)"', page)]
    assert ids == [p['id'] for p in products]
    assert page.count('Coming soon') == len(products) - 1
    for item in products[0]['items']:
        button = re.search(rf'<button[^>]*value="{item["id"]}"[^>]*>', page)
        assert f'size-container__entry--level-{item["level"]}' in button[0]
        assert ('disabled' in button[0]) == (item['level'] == 'out')
    assert '$120.00' in page and 'Hop Man 3' in page


def test_page_and_api_follow_a_sale(sqlite_node):
    node = sqlite_node
    node.release(1)
    item = low_stock_item(node, 1)
    buy_concurrently(node.url, [item['id']] * item['count'])
    page = node.get('/')[2].decode()
    button = re.search(rf'<button[^>]*value="{item["id"]}"[^>]*>', page)
    assert 'size-container__entry--level-out' in button[0]
    assert 'disabled' in button[0]
    assert node.item(item['id']) == {**item, 'count': 0, 'level': 'out'}


def test_api_products_shape(sqlite_node):
    products = sqlite_node.products()
    assert len(products) >= 8
    first = products[0]
    assert set(first) == {'id', 'sku', 'brand', 'name', 'color',
                          'price_cents', 'image', 'released', 'state',
                          'release_at', 'items'}
    assert (first['sku'], first['name'], first['brand'], first['color'],
            first['price_cents']) == ('SHU6000', 'Hop Man 3', 'Snks 23',
                                      'yellow/blue', 12000)
    assert [i['size'] for i in first['items']] == list(sneakers23.SIZES)
    assert set(first['items'][0]) == {'id', 'sku', 'size', 'count', 'level'}
    levels = {i['level'] for p in products for i in p['items']}
    assert levels == {'out', 'low', 'medium', 'high'}
    assert not any(p['released'] for p in products)
    assert {p['state'] for p in products} == {'coming_soon'}


def test_release_is_idempotent_and_restock_adds(sqlite_node):
    node = sqlite_node
    assert node.release(2)['changed'] is True
    assert node.release(2)['changed'] is False
    product = next(p for p in node.products() if p['id'] == 2)
    assert product['released'] and product['release_at'].endswith('Z')
    item = product['items'][0]
    answer = node.restock(item['id'], 600)
    assert answer['count'] == item['count'] + 600
    assert answer['level'] == sneakers23.level_of(item['count'] + 600)
    assert node.item(item['id'])['count'] == item['count'] + 600


def test_healthz(sqlite_node):
    status, _, health = sqlite_node.get('/healthz')
    assert status == 200
    assert {'node', 'db', 'peers', 'hub_lag_ms'} <= set(health)
    assert health['node'] == 'a'
    assert set(health['hub_lag_ms']) == {'latest', 'max_1s', 'max_10s'}
    assert set(health['loops'].values()) == {'running'}
    assert set(health['process']) == {'rss_bytes', 'open_fds', 'greenlets'}


def test_healthz_shows_a_stalled_hub(app_server):
    server = app_server()
    assert call(server.url, 'GET', '/healthz')[0] == 200  # probe asleep
    started = time.perf_counter()
    while time.perf_counter() - started < 0.3:
        pass  # CPU work that never yields: the hub cannot run
    stalled_ms = (time.perf_counter() - started) * 1000
    # The probe's timer was due within one interval of the stall's start,
    # so it wakes at least this late (whatever else the machine does).
    least = stalled_ms - sneakers23.LAG_PROBE_INTERVAL * 1000 - 1

    def worst_lag():
        lag = call(server.url, 'GET', '/healthz')[2]['hub_lag_ms']
        print(f'stalled {stalled_ms:.0f} ms, /healthz says {lag}')
        return lag['max_10s'] >= least
    wait_until(worst_lag, 5, f'/healthz showing a {least:.0f} ms lag')


def test_templates_escape_catalogue_text():
    row = product_row(brand='<b>Brand</b>',
                      name='<script>alert(1)</script>', color='"red"')
    product = sneakers23.ProductState(row, [])
    html = sneakers23.render('product_card', product=product,
                             price=sneakers23.price)
    assert '<script>' not in html and '&lt;script&gt;' in html
    assert '<b>' not in html


def test_reads_never_touch_the_database(app_server, monkeypatch):
    server = app_server()
    node, url = server.node, server.url

    def no_database(*args, **kwargs):
        raise AssertionError('a read went to the database')
    monkeypatch.setattr(node.database, 'execute_sql', no_database)
    monkeypatch.setattr(node.runner, 'run', no_database)

    status, _, page = call(url, 'GET', '/')
    assert status == 200 and b'data-product-id' in page
    status, _, products = call(url, 'GET', '/api/products')
    assert status == 200 and len(products) >= 8
    assert call(url, 'GET', '/healthz')[0] == 200


def test_sold_out_is_answered_from_memory(app_server, monkeypatch):
    server = app_server()
    node, url = server.node, server.url
    product = node.inventory.products[1]
    node.writes.release(1)
    out = next(i for i in product.items if i.count == 0)
    calls = []
    real_run = node.runner.run
    monkeypatch.setattr(node.runner, 'run',
                        lambda *a: calls.append(a) or real_run(*a))

    answers = [call(url, 'POST', '/api/purchase', {'item_id': out.id})
               for _ in range(3)]

    assert [a[0] for a in answers] == [409, 409, 409]
    assert answers[0][2] == {'error': 'sold_out'}
    assert calls == []


def test_a_failed_database_answers_503_and_sells_nothing(app_server,
                                                         monkeypatch):
    server = app_server()
    node, url = server.node, server.url
    node.writes.release(1)
    item = next(i for i in node.inventory.products[1].items if i.count > 0)
    before = item.count

    def broken(*args):
        raise sneakers23.OperationalError('disk I/O error')
    monkeypatch.setattr(node.runner, 'run', broken)
    status, headers, body = call(url, 'POST', '/api/purchase',
                                 {'item_id': item.id})

    assert (status, body) == (503, {'error': 'unavailable'})
    assert item.count == before
    monkeypatch.undo()
    rows = node.runner.run(lambda: list(
        sneakers23.Order.select().where(sneakers23.Order.item == item.id)))
    assert rows == []


def test_json_errors_for_every_api_failure(sqlite_node):
    status, headers, body = call(sqlite_node.url, 'DELETE', '/api/products')
    assert (status, body) == (405, {'error': 'method_not_allowed'})
    assert headers['content-type'] == 'application/json'


def test_admin_token_compared_whole(sqlite_node):
    node = sqlite_node
    for header in (f'Bearer {TOKEN}x', 'Bearer', '', f'bearer  {TOKEN} x'):
        status, _, _ = node.post('/admin/api/products/1/release', {},
                                 headers={'Authorization': header})
        assert status == 401, header
    assert not node.products()[0]['released']
    status, _, _ = node.post('/admin/api/products/1/release', {},
                             headers={'Authorization': f'bearer {TOKEN}'})
    assert status == 200


# ---------------------------------------------------------------------------
# Hostile clients (issue 9): every answer JSON, nothing changed
# ---------------------------------------------------------------------------

MAX_STOCK = 1_000_000_000   # pairs of one item at most (README, issue 9)
ITEM = 1                    # SHU6000 size 6: 120 pairs in the seed
ITEM_BODY = b'{"item_id":1}'


def raw_request(url, data, timeout=10):
    """Send `data` as it is; (status, headers, JSON or bytes) of the
    answer, or None when the server closed without answering."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port),
                                  timeout) as sock:
        sock.sendall(data)
        answer = http.client.HTTPResponse(sock)
        try:
            answer.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None
        body = answer.read()
        headers = {k.lower(): v for k, v in answer.getheaders()}
    if headers.get('content-type', '').startswith('application/json'):
        body = json.loads(body)
    return answer.status, headers, body


def post_raw(path, headers, body=b''):
    """A POST request's bytes, `Connection: close`, headers as given."""
    if isinstance(path, str):
        path = path.encode()
    lines = [b'POST ' + path + b' HTTP/1.1', b'Host: x',
             b'Connection: close', *headers]
    return b'\r\n'.join(lines) + b'\r\n\r\n' + body


def purchase_with_length(length, body=ITEM_BODY):
    return post_raw('/api/purchase', [b'Content-Type: application/json',
                                      b'Content-Length: ' + length], body)


def chunked_purchase(chunks):
    return post_raw('/api/purchase', [b'Content-Type: application/json',
                                      b'Transfer-Encoding: chunked'], chunks)


def get_raw(target):
    return (b'GET ' + target + b' HTTP/1.1\r\nHost: x\r\n'
            b'Connection: close\r\n\r\n')


def store_state(url, db_url):
    """What a change would show in: the API and the orders table."""
    return (call(url, 'GET', '/api/products')[2],
            db_rows(db_url, 'SELECT id, item_id FROM orders ORDER BY id'))


def released_store(app_server, db_url=None):
    """An in-process node with product 1 (item ITEM in stock) released."""
    server = app_server(db_url)
    status, _, _ = call(server.url, 'POST', '/admin/api/products/1/release',
                        {}, headers=admin_headers())
    assert status == 200
    return server


def json_error(answer, status, error=None):
    """A problem with `answer` (None when it is the JSON error wanted)."""
    if answer is None:
        return 'closed without an answer'
    got, headers, body = answer
    if got != status:
        return f'status {got}, not {status}: {body!r:.200}'
    if headers.get('content-type') != 'application/json':
        return f'not JSON: {headers.get("content-type")} {body!r}'
    if not (isinstance(body, dict) and body.get('error')):
        return f'no error key: {body!r}'
    if error and body['error'] != error:
        return f'error {body["error"]!r}, not {error!r}'
    return None


def report(problems):
    return '\n'.join(f'{case}: {problem}'
                     for case, problem in problems.items())


HTTP_LAYER = [
    # (name, raw request, status, error); a lenient parser would read the
    # Content-Length cases as the length of a good purchase body.
    ('Content-Length -1', purchase_with_length(b'-1'), 400, 'bad_request'),
    ('Content-Length abc', purchase_with_length(b'abc'), 400,
     'bad_request'),
    ('Content-Length 0x10', purchase_with_length(b'0x10',
                                                 ITEM_BODY + b'   '),
     400, 'bad_request'),
    ('Content-Length ²', purchase_with_length('²'.encode(), b'{}'), 400,
     'bad_request'),
    ('Content-Length 13, 13', purchase_with_length(b'13, 13'), 400,
     'bad_request'),
    ('Content-Length in Arabic-Indic digits',
     purchase_with_length('١٣'.encode()), 400, 'bad_request'),
    ('CR in the request line', get_raw(b'/api/products\rx'), 400,
     'bad_request'),
    ('URL of 10 KB', get_raw(b'/api/products?q=' + b'x' * 10_000), 414,
     'uri_too_long'),
    ('request line of 8 KB', get_raw(b'/?' + b'x' * 8192), 414,
     'uri_too_long'),
    ('chunk size zz', chunked_purchase(b'zz\r\n' + ITEM_BODY + b'\r\n'
                                       b'0\r\n\r\n'), 400, 'bad_request'),
    ('chunk size -d', chunked_purchase(b'-d\r\n' + ITEM_BODY + b'\r\n'
                                       b'0\r\n\r\n'), 400, 'bad_request'),
    # RFC 9112: a space before the colon and a folded line are 400s (a
    # proxy may read the field otherwise).
    ('space before the colon', purchase_with_length(b'13')
     .replace(b'Content-Length:', b'Content-Length :'), 400, 'bad_request'),
    ('folded header line', post_raw('/api/purchase', [
        b'Content-Type: application/json', b'Content-Length:', b' 13'],
        ITEM_BODY), 400, 'bad_request'),
    ('101 header fields', post_raw('/api/purchase', [
        b'Content-Type: application/json', b'Content-Length: 13',
        *[b"X-Pad: %d" % n for n in range(97)]], ITEM_BODY), 400,
     'bad_request'),
    ('CR inside a header value', post_raw('/api/purchase', [
        b'Content-Type: application/json', b'Content-Length: 13',
        b'X-Note: a\rb'], ITEM_BODY), 400, 'bad_request'),
    ('header line of 70 KB', post_raw('/api/purchase', [
        b'Content-Type: application/json', b'Content-Length: 13',
        b'X-Pad: ' + b'x' * 70_000], ITEM_BODY), 400, 'bad_request'),
]


def test_http_layer_answers_json_and_changes_nothing(app_server):
    server = released_store(app_server)
    db_url = server.node.config.db_url
    before = store_state(server.url, db_url)
    problems = {}
    for name, request, status, error in HTTP_LAYER:
        problem = json_error(raw_request(server.url, request), status, error)
        if problem:
            problems[name] = problem
    assert not problems, report(problems)
    assert store_state(server.url, db_url) == before


def test_lf_inside_the_request_line_is_refused(app_server):
    # Read as a line of its own, `GET /api/products` would be an HTTP/0.9
    # request, and the rest of the line the start of the next request.
    server = app_server()
    answer = raw_request(server.url, get_raw(b'/api/products\nx'))
    assert json_error(answer, 400, 'bad_request') is None, answer[:2]


SMUGGLED = b'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'
KEEP_ALIVE_POST = (b'POST /api/purchase HTTP/1.1\r\nHost: x\r\n'
                   b'Content-Type: application/json\r\n')
AMBIGUOUS_BODIES = [
    ('two Content-Lengths', b'Content-Length: 2\r\nContent-Length: 100'
     b'\r\n\r\n{}' + SMUGGLED),
    ('Content-Length beside chunked', b'Content-Length: 40\r\n'
     b'Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n' + SMUGGLED),
    ('Transfer-Encoding gzip', b'Transfer-Encoding: gzip\r\n\r\n'
     + SMUGGLED),
    ('bad chunk size', b'Transfer-Encoding: chunked\r\n\r\nzz\r\n'
     + SMUGGLED),
]


@pytest.mark.parametrize('name, rest', AMBIGUOUS_BODIES,
                         ids=[name for name, _ in AMBIGUOUS_BODIES])
def test_an_ambiguous_body_is_refused_and_nothing_follows(app_server, name,
                                                          rest):
    """Request smuggling: a proxy in front may see the bytes after such a
    body as part of it; the node must not run them as a request."""
    server = app_server()
    parts = urllib.parse.urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), 10) as sock:
        sock.sendall(KEEP_ALIVE_POST + rest)
        got = b''
        while chunk := sock.recv(65536):
            got += chunk
    statuses = re.findall(rb'HTTP/1\.1 (\d+)', got)
    assert statuses == [b'400'], got
    assert b'"error"' in got and b'application/json' in got


def test_an_unsatisfiable_range_is_416(app_server):
    server = app_server()
    answer = raw_request(server.url, b'GET /static/app.css HTTP/1.1\r\n'
                         b'Host: x\r\nRange: bytes=99999999-\r\n'
                         b'Connection: close\r\n\r\n')
    assert json_error(answer, 416, 'range_not_satisfiable') is None, answer


def test_a_long_url_under_the_limit_is_served(app_server):
    server = app_server()
    status, _, products = raw_request(
        server.url, get_raw(b'/api/products?q=' + b'x' * 7000))
    assert status == 200 and len(products) >= 8


NESTED = [
    b'[' * 1000,
    b'[' * 1000 + b']' * 1000,
    b'{"item_id": ' + b'[' * 1000 + b'1' + b']' * 1000 + b'}',
    b'{"count": ' + b'{"a": ' * 500 + b'1' + b'}' * 501,
]


def test_deeply_nested_json_is_refused(app_server):
    server = released_store(app_server)
    db_url = server.node.config.db_url
    before = store_state(server.url, db_url)
    problems = {}
    for path, headers in (('/api/purchase', GOOD),
                          (f'/admin/api/items/{ITEM}/restock', AUTH)):
        for body in NESTED:
            answer = call(server.url, 'POST', path, headers=headers,
                          raw=body)
            problem = json_error(answer, 400)
            if problem:
                problems[path, body[:12]] = problem
    assert not problems, report(problems)
    assert store_state(server.url, db_url) == before


@pytest.mark.parametrize('value', ['"\xe9.abc"', '"Ã©.abc"',
                                   '"\xff.\xfe"'],
                         ids=['latin-1', 'utf-8', 'not-text'])
def test_a_non_ascii_cookie_makes_a_new_shopper(app_server, value):
    server = released_store(app_server)
    cookie = {'Cookie': f's23_shopper={value}'}  # sent as latin-1 bytes

    status, headers, page = call(server.url, 'GET', '/', headers=cookie)
    assert status == 200 and b'data-product-id' in page
    assert headers['set-cookie'].startswith('s23_shopper=')

    status, headers, body = call(server.url, 'POST', '/api/purchase',
                                 {'item_id': ITEM}, headers=cookie)
    assert status == 201, body
    fresh = {'Cookie': headers['set-cookie'].split(';')[0]}
    assert call(server.url, 'POST', '/api/purchase', {'item_id': ITEM + 1},
                headers=fresh)[::2] == (409, {'error': 'already_purchased'})


@pytest.mark.parametrize('digit', ['%D9%A1', '%EF%BC%91', '%F0%9D%9F%8F'],
                         ids=['arabic-indic', 'fullwidth', 'math-bold'])
def test_ids_in_paths_are_ascii_digits(app_server, digit):
    server = app_server()
    db_url = server.node.config.db_url
    before = store_state(server.url, db_url)
    for path, body in ((f'/admin/api/items/{digit}/restock', {'count': 5}),
                       (f'/admin/api/products/{digit}/release', {})):
        answer = call(server.url, 'POST', path, body,
                      headers=admin_headers())
        assert json_error(answer, 404, 'not_found') is None, (path, answer)
    raw_path = urllib.parse.unquote_to_bytes(digit)
    answer = raw_request(server.url, post_raw(
        b'/admin/api/items/' + raw_path + b'/restock',
        [b'Content-Type: application/json', b'Content-Length: 12',
         f'Authorization: Bearer {TOKEN}'.encode()], b'{"count": 5}'))
    assert json_error(answer, 404) is None, answer
    assert store_state(server.url, db_url) == before


def seeded_with(db_url, item_id, count):
    """Seed a fresh database, then give `item_id` exactly `count` pairs."""
    database = sneakers23.open_database(db_url)
    sneakers23.db.initialize(database)
    with database.connection_context():
        sneakers23.seed(sneakers23.CATALOG_PATH)
        with database.atomic():
            (sneakers23.Availability.update(count=count)
             .where(sneakers23.Availability.item == item_id).execute())
    if hasattr(database, 'close_all'):
        database.close_all()


def test_restock_past_the_most_an_item_holds_is_refused(app_server, db_url):
    seeded_with(db_url, ITEM, MAX_STOCK - 500_000)
    server = app_server(db_url)

    def restock(count):
        return call(server.url, 'POST', f'/admin/api/items/{ITEM}/restock',
                    {'count': count}, headers=admin_headers())

    def stock():
        api = [i['count'] for p in call(server.url, 'GET', '/api/products')[2]
               for i in p['items'] if i['id'] == ITEM]
        database = db_rows(db_url, 'SELECT count FROM availability '
                                   'WHERE item_id = ?', (ITEM,))
        return api, database

    answer = restock(1_000_000)
    assert json_error(answer, 409, 'too_many') is None, answer
    assert stock() == ([MAX_STOCK - 500_000], [(MAX_STOCK - 500_000,)])
    assert restock(500_000)[::2] == (200, {
        'item_id': ITEM, 'count': MAX_STOCK, 'level': 'high'})
    answer = restock(1)
    assert json_error(answer, 409, 'too_many') is None, answer
    assert stock() == ([MAX_STOCK], [(MAX_STOCK,)])


# ---------------------------------------------------------------------------
# Slow and greedy clients (issue 9)
# ---------------------------------------------------------------------------

def read_until_closed(sock):
    """Every byte the server sends until it closes the connection."""
    got = b''
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f'still open after {sock.gettimeout()} s '
                             f'(header timeout 1 s); got {got!r}') from None
    return got


def test_slow_headers_are_cut_off(start_node, sqlite_url):
    node = start_node(sqlite_url, env={'SNEAKERS23_HEADER_TIMEOUT': '1'})
    parts = urllib.parse.urlsplit(node.url)
    slow = socket.create_connection((parts.hostname, parts.port), 10)
    idle = socket.create_connection((parts.hostname, parts.port), 10)
    slow.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n')

    def drip():  # one byte of an endless header every 0.1 s
        try:
            for byte in itertools.cycle(b'X-Slow: yes\r\n'):
                slow.send(bytes([byte]))
                gevent.sleep(0.1)
        except OSError:
            return  # the server closed the connection
    dripping = gevent.spawn(drip)
    started = time.monotonic()
    try:
        answer = read_until_closed(slow)
        waited = time.monotonic() - started
        assert read_until_closed(idle) == b'', 'an idle connection answered'
    finally:
        dripping.kill()
        slow.close()
        idle.close()
    print(f'slow connection answered after {waited:.1f} s')
    if answer:  # the server may also just close it
        head, _, body = answer.partition(b'\r\n\r\n')
        assert head.startswith(b'HTTP/1.1 408 '), answer
        assert b'content-type: application/json' in head.lower()
        assert json.loads(body) == {'error': 'request_timeout'}
    assert node.get('/api/products')[0] == 200


def test_headers_arriving_within_the_timeout_are_served(start_node,
                                                        sqlite_url):
    node = start_node(sqlite_url, env={'SNEAKERS23_HEADER_TIMEOUT': '2'})
    parts = urllib.parse.urlsplit(node.url)
    with socket.create_connection((parts.hostname, parts.port), 10) as sock:
        sock.sendall(b'GET /api/products HTTP/1.1\r\nHost: x\r\n')
        gevent.sleep(0.3)  # a slow but honest client
        sock.sendall(b'Connection: close\r\n\r\n')
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 200 and json.loads(answer.read())


def limited_node(start_node, sqlite_url, *options):
    """A real node where loopback is not exempt from the per-IP limits."""
    node = start_node(sqlite_url, args=['--trusted-ips', '', *options])
    node.release(1)
    node.release(2)
    return node


def too_many_requests(answer):
    """A problem with a 429 answer, or None when it is right."""
    problem = json_error(answer, 429, 'too_many_requests')
    retry_after = answer and answer[1].get('retry-after', '')
    if not problem and not (retry_after.isdigit() and int(retry_after) > 0):
        problem = f'Retry-After {retry_after!r}'
    return problem


def orders_of(db_url, product_id):
    [[count]] = db_rows(db_url, 'SELECT COUNT(*) FROM orders '
                                'WHERE product_id = ?', (product_id,))
    return count


def test_one_ip_gets_n_pairs_of_a_product(start_node, sqlite_url):
    node = limited_node(start_node, sqlite_url, '--ip-pairs', '2',
                        '--ip-rate', '0')
    before = node.item(ITEM)['count']

    answers = buy_concurrently(node.url, [ITEM] * 20)  # no cookie: new
                                                       # shoppers each
    statuses = Counter(status for status, _, _ in answers)
    assert statuses == {201: 2, 429: 18}
    problems = {too_many_requests(a) for a in answers if a[0] == 429}
    assert problems == {None}
    assert node.item(ITEM)['count'] == before - 2
    assert orders_of(node.db_url, 1) == 2

    other_size = [i for i in node.products()[0]['items'] if i['count']][3]
    same_product = node.post('/api/purchase', {'item_id': other_size['id']})
    assert too_many_requests(same_product) is None
    forwarded = node.post('/api/purchase', {'item_id': ITEM},
                          headers={'X-Forwarded-For': '10.0.0.9'})
    assert too_many_requests(forwarded) is None  # no --proxies: ignored
    assert orders_of(node.db_url, 1) == 2
    second = node.products()[1]['items']
    in_stock = next(i for i in second if i['count'])
    assert node.post('/api/purchase', {'item_id': in_stock['id']})[0] == 201


def test_one_ip_gets_n_attempts_a_second(start_node, sqlite_url):
    node = limited_node(start_node, sqlite_url, '--ip-rate', '5',
                        '--ip-pairs', '0')
    item = max(node.products()[0]['items'], key=lambda i: i['count'])

    started = time.monotonic()
    answers = buy_concurrently(node.url, [item['id']] * 30)
    seconds = time.monotonic() - started

    served = sum(status == 201 for status, _, _ in answers)
    limited = [a for a in answers if a[0] == 429]
    print(f'{served} bought, {len(limited)} limited in {seconds:.2f} s')
    assert served + len(limited) == 30
    assert 1 <= served <= 5 * (math.ceil(seconds) + 1)
    assert {too_many_requests(a) for a in limited} == {None}
    assert orders_of(node.db_url, 1) == served
    assert node.item(item['id'])['count'] == item['count'] - served
    retry_after = int(limited[0][1]['retry-after'])
    wait_until(lambda: node.post('/api/purchase', {'item_id': item['id']}
                                 )[0] == 201, retry_after + 5,
               'a purchase after Retry-After', interval=0.5)


def test_forwarded_for_is_believed_only_from_proxies(start_node, sqlite_url):
    node = limited_node(start_node, sqlite_url, '--proxies', '127.0.0.1',
                        '--ip-pairs', '1', '--ip-rate', '0')

    def buy(forwarded_for):
        return node.post('/api/purchase', {'item_id': ITEM},
                         headers={'X-Forwarded-For': forwarded_for})

    assert buy('10.0.0.1')[0] == 201
    assert too_many_requests(buy('10.0.0.1')) is None
    assert too_many_requests(buy('10.0.0.1, 127.0.0.1')) is None
    assert buy('10.0.0.2')[0] == 201          # another client behind it
    assert buy('10.0.0.1, 10.0.0.3')[0] == 201  # the right-most decides
    assert too_many_requests(buy('10.0.0.3')) is None
    # X_Forwarded_For is not X-Forwarded-For (both are HTTP_X_FORWARDED_FOR
    # to WSGI): the proxy's own first pair, not 10.0.0.1's second.
    underscored = node.post('/api/purchase', {'item_id': ITEM},
                            headers={'X_Forwarded_For': '10.0.0.1'})
    assert underscored[0] == 201, underscored
    assert orders_of(node.db_url, 1) == 4


def test_wrong_admin_tokens_lock_out_the_ip(app_server):
    server = app_server()
    before = store_state(server.url, server.node.config.db_url)

    def release(token):
        return call(server.url, 'POST', '/admin/api/products/1/release', {},
                    headers=admin_headers(token))

    wrong = [release(f'guess-{n}') for n in range(11)]
    assert [status for status, _, _ in wrong] == [401] * 10 + [429]
    assert too_many_requests(wrong[-1]) is None
    assert too_many_requests(release(TOKEN)) is None
    restock = call(server.url, 'POST', f'/admin/api/items/{ITEM}/restock',
                   {'count': 5}, headers=admin_headers())
    assert too_many_requests(restock) is None
    assert store_state(server.url, server.node.config.db_url) == before


# ---------------------------------------------------------------------------
# /metrics (issue 10)
# ---------------------------------------------------------------------------

def scrape(url):
    """(every sample without labels by name, purchases by outcome)."""
    from prometheus_client.parser import text_string_to_metric_families
    status, headers, body = call(url, 'GET', '/metrics',
                                 headers=admin_headers())
    assert status == 200, body
    assert headers['content-type'].startswith('text/plain')
    samples = [sample for family in
               text_string_to_metric_families(body.decode())
               for sample in family.samples]
    return ({s.name: s for s in samples if not s.labels},
            {s.labels['outcome']: s.value for s in samples
             if s.name == 'sneakers23_purchases_total'})


def test_metrics_count_the_purchases_the_database_holds(app_server):
    server = released_store(app_server)
    db_url = server.node.config.db_url
    items = [i for i in call(server.url, 'GET', '/api/products')[2][0]
             ['items'] if 0 < i['count'] <= 60]
    item = items[0]
    answers = buy_concurrently(server.url, [item['id']] * (item['count'] + 7))
    statuses = [status for status, _, _ in answers]
    samples, outcomes = scrape(server.url)
    orders = db_rows(db_url, 'SELECT COUNT(*) FROM orders')[0][0]
    assert outcomes['201'] == statuses.count(201) == orders == item['count']
    assert outcomes['sold_out'] == statuses.count(409) == 7
    assert samples['sneakers23_batch_size_count'].value >= 1
    assert samples['sneakers23_paused'].value == 0
    assert call(server.url, 'GET', '/metrics')[0] == 401


# ---------------------------------------------------------------------------
# Drop day: scheduled releases and the kill switch (issue 10)
# ---------------------------------------------------------------------------

FAR = '2030-12-01T19:00:00+01:00'       # a moment well ahead, not in UTC
FAR_UTC = '2030-12-01T18:00:00Z'


def schedule(url, product_id, at, token=TOKEN):
    return call(url, 'POST', f'/admin/api/products/{product_id}/schedule',
                {'at': at}, headers=admin_headers(token))


def set_paused(url, paused):
    return call(url, 'POST', '/admin/api/sales', {'paused': paused},
                headers=admin_headers())


def whole_second_ahead(seconds):
    """(ISO UTC text with Z, epoch seconds): a whole second at least
    `seconds` from now."""
    moment = math.ceil(time.time() + seconds)
    text = datetime.fromtimestamp(moment, UTC).strftime(
        '%Y-%m-%dT%H:%M:%SZ')
    return text, moment


def as_utc(value):
    """A release_at as the database holds it, as naive UTC datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.rstrip('Z'))
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def product_of(url, product_id):
    return next(p for p in call(url, 'GET', '/api/products')[2]
                if p['id'] == product_id)


def in_stock(url, product_id):
    return next(i for i in product_of(url, product_id)['items']
                if i['count'] > 0)


def reconnect_snapshot(sse, url):
    """The snapshot a browser gets when it comes back with an event id
    this node cannot resume from (say, from before a restart)."""
    client = sse(url, headers={'Last-Event-ID': 'gone-1'})
    [event] = client.wait_for('snapshot')
    return event


def test_schedule_answers_and_its_refusals(app_server):
    server = app_server()
    url, db_url = server.url, server.node.config.db_url
    item = in_stock(url, 2)

    assert schedule(url, 2, FAR)[::2] == (200, {
        'product_id': 2, 'release_at': FAR_UTC, 'scheduled': True})
    product = product_of(url, 2)
    assert (product['state'], product['released'], product['release_at']) \
        == ('scheduled', False, FAR_UTC)
    assert call(url, 'POST', '/api/purchase', {'item_id': item['id']})[
        ::2] == (403, {'error': 'not_released'})
    [(released, release_at)] = db_rows(
        db_url, 'SELECT released, release_at FROM product WHERE id = ?',
        (2,))
    assert not released and as_utc(release_at) == datetime(2030, 12, 1, 18)

    assert schedule(url, 2, None)[::2] == (200, {
        'product_id': 2, 'release_at': None, 'scheduled': False})
    product = product_of(url, 2)
    assert (product['state'], product['release_at']) == ('coming_soon',
                                                         None)
    assert db_rows(db_url, 'SELECT release_at FROM product WHERE id = ?',
                   (2,)) == [(None,)]

    call(url, 'POST', '/admin/api/products/1/release', {},
         headers=admin_headers())
    assert product_of(url, 1)['state'] == 'released'
    before = store_state(url, db_url)
    refusals = {
        'released already': (schedule(url, 1, FAR), 409,
                             'already_released'),
        'in the past': (schedule(url, 2, '2020-01-01T00:00:00Z'), 409,
                        'in_the_past'),
        'no zone': (schedule(url, 2, '2030-12-01T18:00:00'), 400, None),
        'a number': (schedule(url, 2, 1922378400), 400, None),
        'garbage': (schedule(url, 2, 'next friday'), 400, None),
        'unknown product': (schedule(url, 9999, FAR), 404, None),
        'no token': (call(url, 'POST', '/admin/api/products/2/schedule',
                          {'at': FAR}), 401, 'unauthorized'),
    }
    problems = {name: json_error(answer, status, error)
                for name, (answer, status, error) in refusals.items()}
    assert not any(problems.values()), report(problems)
    assert store_state(url, db_url) == before
    assert product_of(url, 2)['state'] == 'coming_soon'


def test_a_scheduled_product_is_released_at_its_moment(app_server, sse):
    server = app_server()
    url, db_url = server.url, server.node.config.db_url
    first = reconnect_snapshot(sse, url)
    client = sse(url)
    wait_until(lambda: client.raw, 5, 'the stream opened')
    assert first['data']['paused'] is False
    assert {p['release_at'] for p in first['data']['products']} == {None}

    at, moment = whole_second_ahead(1.5)
    assert schedule(url, 2, at)[::2] == (200, {
        'product_id': 2, 'release_at': at, 'scheduled': True})
    assert schedule(url, 3, FAR)[0] == 200
    assert schedule(url, 3, None)[0] == 200
    client.wait_for('scheduled', count=3)
    assert [e['data'] for e in client.named('scheduled')] == [
        {'product_id': 2, 'release_at': at},
        {'product_id': 3, 'release_at': FAR_UTC},
        {'product_id': 3, 'release_at': None}]
    entries = {p['product_id']: p for p in
               reconnect_snapshot(sse, url)['data']['products']}
    assert entries[2]['release_at'] == at
    assert entries[3]['release_at'] is None and not entries[2]['released']

    [event] = client.wait_for('released', timeout=5,
                              where=lambda d: d['product_id'] == 2)
    lateness = time.time() - moment
    print(f'\n[timing] scheduled release seen {lateness * 1000:.0f} ms '
          'after its moment', flush=True)
    assert lateness < 1.0
    product = product_of(url, 2)
    assert (product['state'], product['released'], product['release_at']) \
        == ('released', True, at)
    status, _, answer = call(url, 'POST', '/api/purchase',
                             {'item_id': in_stock(url, 2)['id']})
    assert status == 201, answer
    [(released, release_at)] = db_rows(
        db_url, 'SELECT released, release_at FROM product WHERE id = ?',
        (2,))
    assert released and as_utc(release_at) == datetime.fromtimestamp(
        moment, UTC).replace(tzinfo=None)
    assert not product_of(url, 3)['released']


def test_pause_refuses_purchases_and_resume_sells_again(app_server, db_url,
                                                        sse):
    server = released_store(app_server, db_url)
    url = server.url
    item = in_stock(url, 1)
    client = sse(url)
    assert call(url, 'GET', '/healthz')[2]['paused'] is False

    assert set_paused(url, True)[::2] == (200, {'paused': True})
    status, headers, body = call(url, 'POST', '/api/purchase',
                                 {'item_id': item['id']})
    assert (status, body) == (503, {'error': 'paused'})
    assert int(headers['retry-after']) >= 1
    assert call(url, 'GET', '/healthz')[2]['paused'] is True
    assert db_rows(db_url, 'SELECT COUNT(*) FROM orders') == [(0,)]
    assert in_stock(url, 1) == item
    client.wait_for('sales', where=lambda d: d == {'paused': True})
    assert reconnect_snapshot(sse, url)['data']['paused'] is True

    refusals = {
        'a string': (set_paused(url, 'yes'), 400, None),
        'null': (set_paused(url, None), 400, None),
        'no key': (call(url, 'POST', '/admin/api/sales', {},
                        headers=admin_headers()), 400, None),
        'no token': (call(url, 'POST', '/admin/api/sales',
                          {'paused': False}), 401, 'unauthorized'),
    }
    problems = {name: json_error(answer, status, error)
                for name, (answer, status, error) in refusals.items()}
    assert not any(problems.values()), report(problems)
    assert call(url, 'GET', '/healthz')[2]['paused'] is True

    assert set_paused(url, False)[::2] == (200, {'paused': False})
    status, _, answer = call(url, 'POST', '/api/purchase',
                             {'item_id': item['id']})
    assert status == 201, answer
    assert call(url, 'GET', '/healthz')[2]['paused'] is False
    client.wait_for('sales', where=lambda d: d == {'paused': False})
    assert [e['data'] for e in client.named('sales')] == [
        {'paused': True}, {'paused': False}]
    assert db_rows(db_url, 'SELECT COUNT(*) FROM orders') == [(1,)]


# ---------------------------------------------------------------------------
# Drop day: the operator's overview (issue 10)
# ---------------------------------------------------------------------------

def overview(url, token=TOKEN):
    return call(url, 'GET', '/admin/api/overview',
                headers=admin_headers(token))


def test_overview_shows_sales_stock_and_who_watches(app_server, sse):
    """Three pairs of product 1 sold; one stream on product 1, one on
    every product: the overview shows both, per product and per node."""
    server = released_store(app_server)
    url, db_url = server.url, server.node.config.db_url
    shown = call(url, 'GET', '/api/products')[2]
    item = max(shown[0]['items'], key=lambda i: i['count'])
    assert item['count'] >= 3
    for _ in range(3):      # three new shoppers
        status, _, answer = call(url, 'POST', '/api/purchase',
                                 {'item_id': item['id']})
        assert status == 201, answer

    status, headers, body = overview(url)
    assert status == 200, body
    assert headers['content-type'] == 'application/json'
    assert body['paused'] is False
    assert [p['id'] for p in body['products']] == [p['id'] for p in shown]
    left = {p['id']: sum(i['count'] for i in p['items']) for p in shown}
    sold = dict(db_rows(db_url, 'SELECT product_id, COUNT(*) FROM orders '
                                'GROUP BY product_id'))
    assert sold == {1: 3}
    for product, was in zip(body['products'], shown, strict=True):
        pid = product['id']
        assert product['sku'] == was['sku']
        assert product['state'] == ('released' if pid == 1
                                    else 'coming_soon'), product
        assert product['release_at'] == was['release_at'], product
        assert (product['release_at'] is None) == (pid != 1), product
        assert product['sold'] == sold.get(pid, 0), product
        assert product['left'] == left[pid] - sold.get(pid, 0), product
        assert isinstance(product['sales_per_s'], int | float)
        if pid != 1:
            assert product['sales_per_s'] == 0, product
    first = body['products'][0]
    assert first['sales_per_s'] == pytest.approx(0.3), first
    assert set(body['nodes']) == {'t'}
    node = body['nodes']['t']
    assert {'streams', 'watching', 'hub_lag_ms', 'peers', 'db'} <= set(node)
    assert node['streams'] == 0
    assert not any(node['watching'].values()), node

    one = sse(url, '/events?products=1')
    every = sse(url)
    for client in (one, every):
        wait_until(lambda client=client: client.raw, 5, 'the stream opened')
    wanted = {str(p['id']): 1 for p in shown} | {'1': 2}

    def watched():
        node = overview(url)[2]['nodes']['t']
        return node if node['streams'] == 2 else None
    node = wait_until(watched, 5, 'the overview counts both streams')
    assert {k: v for k, v in node['watching'].items() if v} == wanted
    assert node['watching']['2'] == 1

    problems = {
        'no token': json_error(call(url, 'GET', '/admin/api/overview'),
                               401, 'unauthorized'),
        'wrong token': json_error(overview(url, 'wrong'), 401,
                                  'unauthorized'),
    }
    assert not any(problems.values()), report(problems)


def test_a_schedule_cancelled_elsewhere_is_not_released(app_server):
    """Memory still holds a moment the database no longer has (another
    node cancelled it, its message lost): at the moment nothing is
    released, and memory learns the truth."""
    server = app_server()
    moment = datetime.now(UTC) + timedelta(seconds=1.5)
    at = moment.isoformat().replace('+00:00', 'Z')
    status, _, answer = call(server.url, 'POST',
                             '/admin/api/products/3/schedule', {'at': at},
                             headers=admin_headers())
    assert status == 200, answer
    db_url = server.node.config.db_url
    db_path = db_url[len('sqlite:///'):]
    with contextlib.closing(sqlite3.connect(db_path)) as con, con:
        con.execute('UPDATE product SET release_at = NULL WHERE id = 3')

    def state_of_3():
        product = call(server.url, 'GET', '/api/products')[2][2]
        return product['state'], product['released']
    wait_until(lambda: state_of_3() == ('coming_soon', False), 6,
               'memory learns the schedule was cancelled')
    assert db_rows(db_url, 'SELECT released, release_at FROM product '
                           'WHERE id = 3') == [(0, None)]


# ---------------------------------------------------------------------------
# A shopper's orders (GET /api/orders)
# ---------------------------------------------------------------------------

def shopper_cookie(headers):
    """The `name=value` of a Set-Cookie answer, for the next request."""
    return headers['set-cookie'].split(';')[0]


def orders_of_shopper(url, cookie=None):
    status, headers, body = call(url, 'GET', '/api/orders',
                                 headers={'Cookie': cookie} if cookie
                                 else {})
    assert status == 200, body
    assert headers['cache-control'] == 'no-store'
    assert 'set-cookie' not in headers  # asking makes no shopper
    return body


def test_orders_are_the_shoppers_own_from_the_database(node, db_url):
    node.release(1)
    node.release(2)
    one, two = (low_stock_item(node, p) for p in (1, 2))
    status, headers, first = node.post('/api/purchase',
                                       {'item_id': one['id']})
    assert status == 201
    me = shopper_cookie(headers)
    status, _, second = node.post('/api/purchase', {'item_id': two['id']},
                                  headers={'Cookie': me})
    assert status == 201
    status, headers, other = node.post('/api/purchase',
                                       {'item_id': one['id']})
    assert status == 201
    someone = shopper_cookie(headers)

    mine = orders_of_shopper(node.url, me)

    assert [(o['order_id'], o['product_id'], o['item_id'], o['size'])
            for o in mine] == [
        (first['order_id'], 1, one['id'], one['size']),
        (second['order_id'], 2, two['id'], two['size'])]
    rows = dict(db_rows(db_url, 'SELECT id, created_at FROM orders'))
    for order in mine:
        moment = datetime.fromisoformat(order['created_at'])
        assert order['created_at'].endswith('Z')
        assert moment.tzinfo == UTC
        stored = rows[order['order_id']]
        if isinstance(stored, str):     # SQLite keeps text
            stored = datetime.fromisoformat(stored)
        assert moment.replace(tzinfo=None) == stored
    assert [o['order_id'] for o in orders_of_shopper(node.url, someone)] \
        == [other['order_id']]


def test_orders_without_a_shopper_are_none(sqlite_node):
    node = sqlite_node
    node.release(1)
    status, headers, _ = node.post(
        '/api/purchase', {'item_id': low_stock_item(node, 1)['id']})
    assert status == 201
    name, value = shopper_cookie(headers).split('=', 1)
    shopper, _, mac = value.rpartition('.')
    assert orders_of_shopper(node.url) == []
    for cookie in (f'{name}=someone-else.{mac}', f'{name}={shopper}.',
                   f'{name}={shopper}', f'{name}="\xe9.abc"'):
        assert orders_of_shopper(node.url, cookie) == [], cookie
    assert len(orders_of_shopper(node.url, f'{name}={value}')) == 1


def test_orders_answer_503_when_the_database_fails(app_server, monkeypatch):
    server = app_server()
    server.node.writes.release(1)
    item = next(i for i in server.node.inventory.products[1].items
                if i.count > 0)
    status, headers, _ = call(server.url, 'POST', '/api/purchase',
                              {'item_id': item.id})
    assert status == 201
    cookie = shopper_cookie(headers)

    def broken(*args):
        raise sneakers23.OperationalError('disk I/O error')
    monkeypatch.setattr(server.node.runner, 'read', broken)
    status, headers, body = call(server.url, 'GET', '/api/orders',
                                 headers={'Cookie': cookie})
    assert (status, body) == (503, {'error': 'unavailable'})
    assert headers['retry-after'] == '1'
    monkeypatch.undo()
    assert len(orders_of_shopper(server.url, cookie)) == 1


def test_orders_are_rate_limited_per_ip_unless_trusted(app_server):
    """Each lookup with a valid cookie is a database read: 10 a second per
    IP, then 429 with Retry-After; a trusted IP is not limited."""
    server = app_server(trusted_ips=())
    status, headers, _ = call(server.url, 'GET', '/')
    cookie = shopper_cookie(headers)
    answers = [call(server.url, 'GET', '/api/orders',
                    headers={'Cookie': cookie})
               for _ in range(sneakers23.ORDER_LOOKUPS + 5)]
    statuses = [status for status, _, _ in answers]
    assert 429 in statuses, statuses
    refused = next(a for a in answers if a[0] == 429)
    assert refused[2] == {'error': 'too_many_requests'}
    assert int(refused[1]['retry-after']) >= 1
    assert statuses[:sneakers23.ORDER_LOOKUPS] == \
        [200] * sneakers23.ORDER_LOOKUPS
    trusted = app_server()   # loopback is trusted by default
    status, headers, _ = call(trusted.url, 'GET', '/')
    cookie = shopper_cookie(headers)
    assert {call(trusted.url, 'GET', '/api/orders',
                 headers={'Cookie': cookie})[0]
            for _ in range(sneakers23.ORDER_LOOKUPS + 5)} == {200}
