"""The OpenAPI document of the HTTP API (static/openapi.json), kept true.

Two halves. First the document against the code: its operations are the
app's routes, and every answer it lists for the write routes is what a
real server answers, provoked one by one. Then a property-based fuzz of
every operation with schemathesis against a real in-process node on a
fresh SQLite database, with the right admin token, wrong ones and none:
never a 5xx, every answer as documented, every 4xx JSON with an `error`,
and nothing changed by a rejected request (memory and database).

`SNEAKERS23_FUZZ_EXAMPLES=500` fuzzes deeper than `make test` does.
"""

import contextlib
import json
import os
import re
import socket
import sqlite3

import gevent
import hypothesis
import pytest
import requests
import schemathesis
from conftest import ROOT, TOKEN
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

import sneakers23

DOCUMENT_PATH = os.path.join(ROOT, 'static', 'openapi.json')
with open(DOCUMENT_PATH, encoding='utf-8') as f:
    DOCUMENT = json.load(f)

# Rejecting invalid input is the server's job: which statuses count.
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT, config=(
    schemathesis.Config.from_str("""
[checks.negative_data_rejection]
expected-statuses = [400, 401, 404, 413, 415, 429]
""")))
OPERATIONS = [(path, method.upper())
              for path, item in DOCUMENT['paths'].items()
              for method in item]
CHECKS = [st_checks.not_a_server_error,
          st_checks.status_code_conformance,
          st_checks.content_type_conformance,
          st_checks.response_headers_conformance,
          st_checks.response_schema_conformance]
DOCUMENTED = CHECKS[1:]  # a documented 503 is not a failure there

EXAMPLES = int(os.environ.get('SNEAKERS23_FUZZ_EXAMPLES', '40'))
FUZZ = hypothesis.settings(
    max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
    suppress_health_check=list(hypothesis.HealthCheck))
# An SSE stream never ends: read what arrives for this long, then hang up.
STREAM_READ = 0.1


def document_routes(document):
    """{(METHOD, path)} of the document's operations."""
    return {(method.upper(), path)
            for path, item in document['paths'].items() for method in item}


def app_routes(app):
    """{(METHOD, path)} of a Bottle app, with `<id:int>` as `{id}`."""
    return {(route.method, re.sub(r'<(\w+)(:[^>]*)?>', r'{\1}', route.rule))
            for route in app.routes}


class Client:
    """HTTP to one in-process node (conftest's `app_server`), and what a
    rejected request must leave as it was."""

    def __init__(self, server):
        self.server, self.node, self.url = server, server.node, server.url
        self.db_path = self.node.config.db_url.removeprefix('sqlite:///')
        self.session = requests.Session()

    def stop(self):
        self.session.close()
        self.server.stop()

    def request(self, method, path, token=None, **kw):
        headers = kw.pop('headers', {})
        if token is not None:
            headers['Authorization'] = f'Bearer {token}'
        return self.session.request(method, self.url + path,
                                    headers=headers, timeout=30, **kw)

    def products(self):
        return self.request('GET', '/api/products').json()

    def state(self):
        """Memory's revision and the database's orders, pairs, versions
        and released products."""
        uri = f'file:{self.db_path}?mode=ro'
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
            row = con.execute(
                'SELECT (SELECT count(*) FROM orders),'
                ' (SELECT sum(count) FROM availability),'
                ' (SELECT sum(version) FROM availability),'
                ' (SELECT count(*) FROM product WHERE released)'
            ).fetchone()
        names = ('orders', 'pairs', 'versions', 'released')
        return {'revision': self.node.inventory.revision,
                **dict(zip(names, row, strict=True))}


@pytest.fixture
def start_local(app_server):
    """`start_local(**config)`: a Client of a new in-process node."""
    clients = []

    def start(**config):
        clients.append(Client(app_server(**config)))
        return clients[-1]

    yield start
    for client in clients:
        client.session.close()


@pytest.fixture
def local(start_local):
    return start_local()


# ---------------------------------------------------------------------------
# The document against the code
# ---------------------------------------------------------------------------

def test_the_document_is_openapi_3():
    assert DOCUMENT['openapi'].startswith('3.')
    SCHEMA.validate()


def test_every_route_is_documented_and_every_operation_exists(local):
    assert document_routes(DOCUMENT) == app_routes(local.server.app)


def test_the_node_serves_the_document(local):
    answer = local.request('GET', '/api/openapi.json')
    assert answer.status_code == 200
    assert answer.headers['Content-Type'].startswith('application/json')
    assert answer.json() == DOCUMENT


def documented_answers(path, method):
    """{(status, error code or None)}: every answer the document lists
    for one operation, one per example of an error body."""
    operation = DOCUMENT['paths'][path][method.lower()]
    answers = set()
    for status, response in operation['responses'].items():
        response = resolve(response)
        media = response.get('content', {}).get('application/json', {})
        codes = [example['value'].get('error')
                 for example in media.get('examples', {}).values()]
        answers.update((int(status), code) for code in codes or [None])
    return answers


def resolve(item):
    while '$ref' in item:
        node = DOCUMENT
        for part in item['$ref'].lstrip('#/').split('/'):
            node = node[part]
        item = node
    return item


def conforms(path, method, answer):
    """Fail unless `answer` is as the document describes it."""
    names = re.findall(r'\{(\w+)\}', path)
    case = SCHEMA[path][method].Case(
        path_parameters=dict.fromkeys(names, 1))
    case.validate_response(answer, checks=DOCUMENTED)


class Answers:
    """Answers got, by (path, METHOD) and (status, error code)."""

    def __init__(self):
        self.got = {}

    def add(self, path, method, answer):
        conforms(path, method, answer)
        code = answer.json()['error'] if answer.status_code >= 400 else None
        self.got.setdefault((path, method), set()).add(
            (answer.status_code, code))
        return answer


PURCHASE = ('/api/purchase', 'POST')
RELEASE = ('/admin/api/products/{product_id}/release', 'POST')
RESTOCK = ('/admin/api/items/{item_id}/restock', 'POST')


def buy(local, item_id, cookies=None, **kw):
    return local.request('POST', '/api/purchase', json={'item_id': item_id},
                         cookies=cookies or {}, **kw)


def release(local, product_id, token=TOKEN):
    return local.request(
        'POST', f'/admin/api/products/{product_id}/release', token=token)


def restock(local, item_id, count, token=TOKEN, **kw):
    return local.request('POST', f'/admin/api/items/{item_id}/restock',
                         token=token, json={'count': count}, **kw)


def post_raw(local, path, data, content_type='application/json'):
    return local.request('POST', path, token=TOKEN, data=data,
                         headers={'Content-Type': content_type})


def items_of(local, product_id):
    return next(p['items'] for p in local.products()
                if p['id'] == product_id)


@contextlib.contextmanager
def database_locked(db_path):
    """Another connection's transaction holds SQLite's write lock."""
    con = sqlite3.connect(db_path, isolation_level=None)
    try:
        con.execute('BEGIN IMMEDIATE')
        yield
        con.execute('ROLLBACK')
    finally:
        con.close()


def test_every_answer_of_the_write_routes_is_what_the_server_answers(
        start_local, monkeypatch):
    """Provoke each answer the document lists for purchase, release and
    restock on real nodes, and check it is exactly as documented."""
    got = Answers()
    local = start_local()
    one, two = items_of(local, 1), items_of(local, 2)
    in_stock = [i['id'] for i in one if i['count'] > 0]
    sold_out = next(i['id'] for i in one if i['count'] == 0)

    got.add(*RELEASE, release(local, 1))
    sold = got.add(*PURCHASE, buy(local, in_stock[0]))
    assert sold.status_code == 201
    got.add(*PURCHASE, buy(local, in_stock[1], sold.cookies))
    got.add(*PURCHASE, buy(local, sold_out))
    got.add(*PURCHASE, buy(local, two[0]['id']))
    got.add(*PURCHASE, buy(local, 10**9))
    for route, path in ((PURCHASE, '/api/purchase'),
                        (RESTOCK, f'/admin/api/items/{in_stock[0]}/restock')):
        got.add(*route, post_raw(local, path, b'{'))
        got.add(*route, post_raw(local, path, b' ' * 5000))
        got.add(*route, post_raw(local, path, b'{}', 'text/plain'))
    got.add(*RESTOCK, restock(local, in_stock[0], 10))
    got.add(*RESTOCK, restock(local, 10**9, 10))
    got.add(*RESTOCK, restock(local, in_stock[0], 10, token=None))
    got.add(*RELEASE, release(local, 10**9))
    got.add(*RELEASE, release(local, 2, token=None))
    # A product sold by a draw is never released first come, first served.
    assert local.request('POST', '/admin/api/products/4/draw', token=TOKEN,
                         json={'closes': '2099-01-01T00:00:00Z'}
                         ).status_code == 200
    got.add(*RELEASE, release(local, 4))

    # The kill switch: a purchase while sales are paused sells nothing.
    before = local.state()
    assert local.request('POST', '/admin/api/sales', token=TOKEN,
                         json={'paused': True}).status_code == 200
    got.add(*PURCHASE, buy(local, in_stock[2]))
    assert local.request('POST', '/admin/api/sales', token=TOKEN,
                         json={'paused': False}).status_code == 200
    after = local.state()
    assert {k: v for k, v in after.items() if k != 'revision'} == {
        k: v for k, v in before.items() if k != 'revision'}  # no sale

    # A database that does not answer: 503 for all three, nothing done.
    before = local.state()
    with database_locked(local.db_path), monkeypatch.context() as patch:
        patch.setattr(sneakers23, 'DB_DEADLINE', 0.5)  # given up sooner
        jobs = [gevent.spawn(buy, local, in_stock[2]),
                gevent.spawn(restock, local, in_stock[2], 10),
                gevent.spawn(release, local, 3)]
        gevent.joinall(jobs, raise_error=True)
    for route, job in zip((PURCHASE, RESTOCK, RELEASE), jobs, strict=True):
        got.add(*route, job.value)
    assert restock(local, in_stock[3], 1).status_code == 200  # it is back
    after = local.state()
    assert after['orders'] == before['orders']
    assert after['pairs'] == before['pairs'] + 1
    assert after['released'] == before['released']

    # An item near the ceiling (in the database): more would not fit.
    with contextlib.closing(sqlite3.connect(local.db_path)) as con, con:
        con.execute('UPDATE availability SET count = ? WHERE item_id = ?',
                    (sneakers23.MAX_STOCK - 10, in_stock[0]))
    before = local.state()
    got.add(*RESTOCK, restock(local, in_stock[0], 11))
    assert local.state() == before

    # A dashboard session's write from another origin changes nothing.
    signed_in = local.request('POST', '/admin/session',
                              json={'token': TOKEN})
    assert signed_in.status_code == 200
    before = local.state()
    foreign = {'Origin': 'http://localhost:1'}
    got.add(*RELEASE, local.request(
        'POST', '/admin/api/products/3/release', headers=foreign))
    got.add(*RESTOCK, restock(local, in_stock[0], 5, token=None,
                              headers=foreign))
    assert local.state() == before
    local.session.cookies.clear()

    # Wrong admin tokens from one IP lock its admin requests out.
    for _ in range(sneakers23.ADMIN_FAILURES + 1):
        release(local, 1, token='wrong')
    got.add(*RELEASE, release(local, 1))
    got.add(*RESTOCK, restock(local, in_stock[0], 1))

    # Per-IP limits: test_purchase_beyond_the_ip_limits_is_as_documented.
    documented = {route: documented_answers(*route)
                  for route in (PURCHASE, RELEASE, RESTOCK)}
    documented[PURCHASE].remove((429, 'too_many_requests'))
    for route, answers in documented.items():
        missing, extra = answers - got.got[route], got.got[route] - answers
        assert not missing and not extra, \
            f'{route}: never answered {missing}, undocumented {extra}'


def test_purchase_beyond_the_ip_limits_is_as_documented(start_local):
    """Loopback not trusted, one pair per product per IP."""
    got = Answers()
    local = start_local(trusted_ips=(), ip_pairs=1)
    item_ids = [i['id'] for i in items_of(local, 1) if i['count'] > 0]
    release(local, 1)
    got.add(*PURCHASE, buy(local, item_ids[0]))
    got.add(*PURCHASE, buy(local, item_ids[1]))
    assert got.got[PURCHASE] == {(201, None), (429, 'too_many_requests')}


def test_the_read_routes_answer_as_documented(local):
    for path, operation in (('/', '/'), ('/api/products', '/api/products'),
                            ('/healthz', '/healthz'),
                            ('/static/app.css', '/static/{path}'),
                            ('/api/openapi.json', '/api/openapi.json')):
        answer = local.request('GET', path)
        assert answer.status_code == 200, path
        conforms(operation, 'GET', answer)
    page = requests.get(local.url + '/', timeout=30)  # a new shopper
    assert page.headers['Cache-Control'] == 'no-store'
    assert page.cookies.get(sneakers23.SHOPPER_COOKIE)
    for query, status in (('?products=x', 400), ('?products=999', 404)):
        answer = local.request('GET', '/events' + query)
        assert answer.status_code == status
        conforms('/events', 'GET', answer)
    stream = local.session.get(local.url + '/events?products=1',
                               stream=True, timeout=30)
    with contextlib.closing(stream):
        assert stream.status_code == 200
        assert stream.headers['Content-Type'] == 'text/event-stream'
        assert stream.headers['Cache-Control'] == 'no-cache'
        assert stream.headers['X-Accel-Buffering'] == 'no'
    answer = local.request('GET', '/static/no-such-file.css')
    assert answer.status_code == 404
    assert answer.json() == {'error': 'not_found'}


def test_a_dead_loop_makes_healthz_503_as_documented(local):
    local.node.loops()['lag-probe'].greenlet.kill()
    answer = local.request('GET', '/healthz')
    assert answer.status_code == 503
    conforms('/healthz', 'GET', answer)


def raw_exchange(local, data, timeout=10):
    """Send raw bytes; the status and body of the answer."""
    with socket.create_connection(
            ('127.0.0.1', local.server.server.server_port),
            timeout) as sock:
        sock.sendall(data)
        answer = b''
        while chunk := sock.recv(65536):
            answer += chunk
            head, _, body = answer.partition(b'\r\n\r\n')
            length = re.search(rb'(?i)content-length: *(\d+)', head)
            if length and len(body) >= int(length.group(1)):
                break
    status = int(answer.split(b' ', 2)[1])
    head, _, body = answer.partition(b'\r\n\r\n')
    assert re.search(rb'(?i)content-type: *application/json', head), head
    return status, json.loads(body)


def test_the_answers_of_every_route_are_as_documented(
        start_local, monkeypatch):
    """`x-every-route`: answers any request can get, before or after the
    app sees it."""
    monkeypatch.setattr(sneakers23, 'HEADER_TIMEOUT', 0.5)
    local = start_local()
    every = {int(status): body
             for status, body in DOCUMENT['x-every-route'].items()}
    sent = {
        404: b'GET /no/such/path HTTP/1.1\r\nHost: x\r\n\r\n',
        405: b'DELETE /api/products HTTP/1.1\r\nHost: x\r\n\r\n',
        400: (b'POST /api/purchase HTTP/1.1\r\nHost: x\r\n'
              b'Content-Type: application/json\r\n'
              b'Content-Length: abc\r\n\r\n'),
        414: b'GET /?' + b'a' * 10_000 + b' HTTP/1.1\r\nHost: x\r\n\r\n',
        408: b'GET / HTTP/1.1\r\nHost: x\r\n',  # and no end of headers
    }
    assert set(sent) == set(every)
    for status, data in sent.items():
        assert raw_exchange(local, data) == (status, every[status]), status


# ---------------------------------------------------------------------------
# The fuzz
# ---------------------------------------------------------------------------

def secured(path, method):
    return bool(DOCUMENT['paths'][path][method.lower()].get('security'))


def has_input(path, method):
    operation = DOCUMENT['paths'][path][method.lower()]
    return bool(operation.get('parameters') or operation.get('requestBody'))


def clients(path, method):
    """Who sends the fuzz: with the admin token, a wrong one or none;
    for purchases, from a trusted IP (no limits) or not."""
    if secured(path, method):
        return ('right token', 'wrong token', 'no token')
    if path == '/api/purchase':
        return ('trusted ip', 'untrusted ip')
    return ('anyone',)


FUZZED = [pytest.param(path, method, who, id=f'{method} {path} {who}')
          for path, method in OPERATIONS for who in clients(path, method)]

LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xff,
                       exclude_characters='\x7f')
# Beyond the schema: what hostile clients send to a JSON route.
DEPTHS = st.one_of(st.sampled_from([10, 100, 1000, 4000]),
                   st.integers(1, 4000))
BODIES = st.one_of(
    st.binary(max_size=64),
    DEPTHS.map(lambda n: b'[' * n),
    DEPTHS.map(lambda n: b'{"count": ' * (n // 10)),
    st.integers(4000, 4200).map(lambda n: b' ' * n + b'{}'),
)
# The shopper cookie is `ID.SIGNATURE`: forged, broken, non-ASCII.
COOKIES = st.one_of(
    st.text(LATIN1),
    st.builds('{}.{}'.format, st.text(LATIN1, min_size=1), st.text(LATIN1)),
    st.builds('"{}.{}"'.format, st.text(LATIN1, min_size=1),
              st.text(LATIN1)))
CONTENT_TYPES = st.sampled_from([
    '', 'text/plain', 'application/jsonx', 'application/json; charset=x',
    'multipart/form-data', 'APPLICATION/JSON'])


def mutation(path, method):
    """How to bend a generated request: (kind, value) or None."""
    operation = DOCUMENT['paths'][path][method.lower()]
    kinds = [st.none()] * 3
    if operation.get('requestBody'):
        kinds += [st.tuples(st.just('body'), BODIES),
                  st.tuples(st.just('content-type'), CONTENT_TYPES)]
    if any(p['in'] == 'cookie' for p in operation.get('parameters', [])):
        kinds.append(st.tuples(st.just('cookie'), COOKIES))
    return st.one_of(kinds)


def authorization(who):
    if who == 'right token':
        return st.just(f'Bearer {TOKEN}')
    if who != 'wrong token':
        return st.none()
    return st.text(LATIN1, max_size=40).map(
        lambda text: text.strip() and f'Bearer {text}' or 'Bearer x'
    ).filter(lambda value: value != f'Bearer {TOKEN}')


# Ids the seed catalogue has (and a few past it), so the fuzz reaches
# more than 404: 8 products of 13 items each.
IDS = {'product_id': st.integers(1, 10), 'item_id': st.integers(1, 110)}


def known_ids(operation, path, headers):
    """Strategies of cases whose ids are the catalogue's."""
    found = []
    for name in set(re.findall(r'\{(\w+)\}', path)) & set(IDS):
        found.append(IDS[name].flatmap(lambda i, name=name: (
            operation.as_strategy(path_parameters={name: i},
                                  headers=headers))))
    if path == '/api/purchase':
        found.append(IDS['item_id'].flatmap(lambda i: (
            operation.as_strategy(body={'item_id': i}))))
    if path == '/events':
        found.append(st.lists(IDS['product_id'], max_size=3).flatmap(
            lambda ids: operation.as_strategy(
                query={'products': ','.join(map(str, ids))})))
    return found


def call_stream(case, local, headers):
    """Call an operation whose answer may never end: wait for the answer
    as long as for any, read a stream for STREAM_READ, then hang up."""
    kwargs = case.as_transport_kwargs(base_url=local.url, headers=headers)
    answer = local.session.request(**kwargs, stream=True, timeout=30)
    if answer.headers.get('Content-Type') == 'text/event-stream':
        got = b''
        with gevent.Timeout(STREAM_READ, False):
            while chunk := answer.raw.read1(65536):
                got += chunk
        answer._content = got[:got.rfind(b'\n\n') + 2]  # whole events
        answer.close()
    return schemathesis.Response.from_any(answer)


def sent(request):
    """What went on the wire, for a reproducer."""
    body = request.body
    if isinstance(body, bytes) and len(body) > 200:
        body = body[:200] + b'...(%d bytes)' % len(body)
    return (f'{request.method} {request.url}\n'
            f'headers: {dict(request.headers)}\nbody: {body!r}')


@pytest.mark.parametrize('path, method, who', FUZZED)
def test_fuzz(start_local, path, method, who):
    """Never a 5xx; every answer as documented; a 4xx is JSON with an
    `error` and changes nothing."""
    limited = {'trusted_ips': (), 'ip_pairs': 1, 'ip_rate': 50}
    local = start_local(**(limited if who == 'untrusted ip' else {}))
    release(local, 1)  # sales to make: 201, sold_out, already_purchased
    operation = SCHEMA[path][method]
    # The right token is not the fuzzer's to break: a fixed header.
    fixed = {}
    if who == 'right token':
        fixed = {'Authorization': f'Bearer {TOKEN}'}
    cases = [operation.as_strategy(GenerationMode.POSITIVE, headers=fixed)]
    if has_input(path, method):
        cases.append(operation.as_strategy(GenerationMode.NEGATIVE,
                                           headers=fixed))
    cases += known_ids(operation, path, fixed)
    endless = DOCUMENT['paths'][path][method.lower()].get('x-endless')
    seen = {}

    @FUZZ
    @hypothesis.given(case=st.one_of(cases), bend=mutation(path, method),
                      auth=authorization(who))
    def fuzz(case, bend, auth):
        case.headers = dict(case.headers or {})
        case.headers.pop('Authorization', None)
        headers = {'Authorization': auth} if auth else {}
        extra = {}
        if bend and bend[0] == 'body':
            extra['data'] = bend[1]
            headers['Content-Type'] = 'application/json'
        elif bend and bend[0] == 'content-type':
            headers['Content-Type'] = bend[1]
        elif bend and bend[0] == 'cookie':
            case.cookies = {}
            headers['Cookie'] = f'{sneakers23.SHOPPER_COOKIE}={bend[1]}'
        before = local.state()
        if endless:
            answer = call_stream(case, local, headers)
        else:
            answer = case.call(base_url=local.url, session=local.session,
                               headers=headers, timeout=30, **extra)
        status = answer.status_code
        seen[status] = seen.get(status, 0) + 1
        checks = CHECKS
        if not bend and case.meta.generation.mode.is_negative:
            checks = [*CHECKS, st_checks.negative_data_rejection]
        try:
            case.validate_response(answer, checks=checks, headers=headers)
            if 400 <= status < 500:
                assert answer.headers.get('content-type', [''])[0] \
                    .startswith('application/json'), answer.headers
                body = json.loads(answer.content)
                assert isinstance(body, dict) and body.get('error'), body
                assert local.state() == before, \
                    'a rejected request changed the store'
        except (Exception, BaseExceptionGroup) as e:  # cookies shown
            raise AssertionError(f'{e}\nSent:\n{sent(answer.request)}') \
                from None

    fuzz()
    print(f'{method} {path}, {who}: answers {seen}')
