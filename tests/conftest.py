"""Fixtures: fresh databases, real node processes, small HTTP/SSE clients."""

from gevent import monkey

monkey.patch_all()

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections import namedtuple

import gevent
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sneakers23

TOKEN = 'test-admin-token'
PG_URL = os.environ.get('TEST_DATABASE_URL', '')
REQUIRE_PG = os.environ.get('SNEAKERS23_REQUIRE_POSTGRES') == '1'


def free_port():
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def reset_postgres(url):
    """Drop every sneakers23 table so the next node seeds afresh."""
    database = sneakers23.open_database(url)
    sneakers23.db.initialize(database)
    with database.connection_context():
        database.drop_tables(sneakers23.MODELS, safe=True, cascade=True)
    database.close_all()


@pytest.fixture(params=['sqlite', 'postgres'])
def db_url(request, tmp_path):
    """A fresh, empty database: SQLite in tmp_path, or the test PostgreSQL."""
    if request.param == 'sqlite':
        return f'sqlite:///{tmp_path}/store.db'
    if not PG_URL:
        if REQUIRE_PG:
            pytest.fail('SNEAKERS23_REQUIRE_POSTGRES is set but '
                        'TEST_DATABASE_URL is not')
        pytest.skip('TEST_DATABASE_URL is not set')
    reset_postgres(PG_URL)
    return PG_URL


@pytest.fixture
def sqlite_url(tmp_path):
    return f'sqlite:///{tmp_path}/store.db'


def call(url, method, path, body=None, headers=None, raw=None):
    """One HTTP request: (status, headers dict, parsed JSON or bytes)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = dict(headers or {})
    if body is not None:
        raw = json.dumps(body).encode()
        headers.setdefault('Content-Type', 'application/json')
    try:
        conn.request(method, path, raw, headers)
        answer = conn.getresponse()
        data = answer.read()
        got = {k.lower(): v for k, v in answer.getheaders()}
    finally:
        conn.close()
    if got.get('content-type', '').startswith('application/json'):
        data = json.loads(data)
    return answer.status, got, data


def admin_headers(token=TOKEN):
    return {'Authorization': f'Bearer {token}'}


class NodeProcess:
    """A real `python sneakers23.py serve` process on a loopback port."""

    def __init__(self, db_url, port=None, args=(), env=None):
        self.db_url, self.port = db_url, port or free_port()
        self.args, self.extra_env = list(args), env or {}
        self.url = f'http://127.0.0.1:{self.port}'
        self.proc = None
        self.output = []

    def start(self, timeout=30):
        env = {**os.environ, 'SNEAKERS23_ADMIN_TOKEN': TOKEN,
               **self.extra_env}
        cmd = [sys.executable, os.path.join(ROOT, 'sneakers23.py'),
               'serve', '--db', self.db_url, '--port', str(self.port),
               *self.args]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        with gevent.Timeout(timeout, False):
            for line in self.proc.stdout:
                self.output.append(line)
                if 'serving on' in line:
                    gevent.spawn(self._drain)
                    return self
        self.stop()
        raise RuntimeError(f'node did not start: {"".join(self.output)}')

    def _drain(self):
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.send_signal(signal.SIGCONT)  # in case it was paused
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self):
        self.stop()
        return self.start()

    def get(self, path, **kw):
        return call(self.url, 'GET', path, **kw)

    def post(self, path, body=None, **kw):
        return call(self.url, 'POST', path, body=body, **kw)

    def products(self):
        return self.get('/api/products')[2]

    def release(self, product_id):
        status, _, answer = self.post(
            f'/admin/api/products/{product_id}/release', {},
            headers=admin_headers())
        assert status == 200, answer
        return answer

    def restock(self, item_id, count):
        status, _, answer = self.post(
            f'/admin/api/items/{item_id}/restock', {'count': count},
            headers=admin_headers())
        assert status == 200, answer
        return answer

    def item(self, item_id):
        for product in self.products():
            for item in product['items']:
                if item['id'] == item_id:
                    return item
        raise KeyError(item_id)


@pytest.fixture
def start_node():
    """Start real nodes; every one is stopped at the end of the test."""
    nodes = []

    def start(db_url, **kw):
        node = NodeProcess(db_url, **kw)
        nodes.append(node)
        return node.start()

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def node(start_node, db_url):
    """One real node on a fresh database (SQLite and PostgreSQL)."""
    return start_node(db_url)


@pytest.fixture
def sqlite_node(start_node, sqlite_url):
    """One real node on a fresh SQLite database."""
    return start_node(sqlite_url)


class SSEClient:
    """A real SSE client: reads `/events` on its own greenlet."""

    def __init__(self, url, path='/events', headers=None):
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                               timeout=60)
        self.conn.request('GET', path, headers=headers or {})
        self.response = self.conn.getresponse()
        self.headers = {k.lower(): v for k, v in
                        self.response.getheaders()}
        self.events = []
        self.raw = []
        self._reader = gevent.spawn(self._read)

    def _read(self):
        event = {}
        while True:
            line = self.response.readline()
            if not line:
                return
            line = line.decode().rstrip('\n')
            self.raw.append(line)
            if not line:
                if 'event' in event:
                    self.events.append(event)
                event = {}
            elif not line.startswith(':'):
                key, _, value = line.partition(': ')
                event[key] = value

    def named(self, name):
        """Every received event called `name`, with its data parsed."""
        return [dict(e, data=json.loads(e['data'])) for e in self.events
                if e.get('event') == name]

    def wait_for(self, name, timeout=5, count=1, where=lambda d: True):
        """Wait until `count` events `name` matching `where` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.named(name) if where(e['data'])]
            if len(found) >= count:
                return found
            gevent.sleep(0.01)
        raise AssertionError(f'no {count} {name!r} event(s) within '
                             f'{timeout}s; got {self.events}')

    def close(self):
        self._reader.kill()
        self.response.close()  # it holds the socket open too
        self.conn.close()


@pytest.fixture
def sse():
    """Open SSE clients; all closed at the end of the test."""
    clients = []

    def open_client(url, path='/events', headers=None):
        client = SSEClient(url, path, headers)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


def db_rows(db_url, sql, params=()):
    """Rows of one query, straight from the database (the truth)."""
    database = sneakers23.open_database(db_url)
    if db_url.startswith('postgres'):
        sql = sql.replace('?', '%s')
    try:
        with database.connection_context():
            return database.execute_sql(sql, params).fetchall()
    finally:
        if hasattr(database, 'close_all'):
            database.close_all()


def buy_concurrently(url, item_ids, cookies=None):
    """POST one purchase per entry of item_ids at once; the answers."""
    def buy(item_id, cookie):
        headers = {'Cookie': cookie} if cookie else {}
        return call(url, 'POST', '/api/purchase', {'item_id': item_id},
                    headers=headers)
    cookies = cookies or [None] * len(item_ids)
    jobs = [gevent.spawn(buy, i, c) for i, c in zip(item_ids, cookies,
                                                     strict=True)]
    gevent.joinall(jobs, raise_error=True)
    return [job.value for job in jobs]


def wait_until(check, timeout=5.0, message='condition', interval=0.01):
    """Poll `check()` until it is truthy; its value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'{message}: not true within {timeout}s')
        gevent.sleep(interval)


# ---------------------------------------------------------------------------
# Rows and in-process nodes
# ---------------------------------------------------------------------------

ProductRow = namedtuple('ProductRow', [
    f.name for f in sneakers23.Product._meta.sorted_fields])


def product_row(id=1, **overrides):
    """A product row as `catalog_rows()` gives it; any field overridable."""
    fields = dict(id=id, sku=f'P{id}', brand='B', name=f'Shoe {id}',
                  color='c', price_cents=100, image='x.svg', position=id,
                  released=False, release_at=None)
    return ProductRow(**{**fields, **overrides})


def item_row(id, product_id, count, size='9', version=1):
    """An item row as `catalog_rows()` gives it."""
    return (id, product_id, f'P{product_id}-{id}', size, count, version)


class AppServer:
    """A node and its server in this process: `.url`, `.node`, `.app`."""

    def __init__(self, config):
        self.app = sneakers23.create_app(config)
        self.node = self.app.node
        self.server = sneakers23.make_server(self.app, '127.0.0.1', 0)
        try:
            self.node.start()
        except BaseException:
            self.server.close()
            raise
        self.server.start()
        self.url = f'http://127.0.0.1:{self.server.server_port}'

    def stop(self):
        self.server.stop(timeout=1)
        self.node.stop()


@pytest.fixture
def app_server(tmp_path):
    """`app_server(db_url=None, **config)`: a node served in this process.

    On a fresh SQLite database in tmp_path unless `db_url` is given; a
    port the kernel picks; every one stopped at the end of the test.
    """
    servers = []

    def start(db_url=None, **config):
        db_url = db_url or f'sqlite:///{tmp_path}/app{len(servers)}.db'
        config = sneakers23.Config(**{'node': 't', 'db_url': db_url,
                                      'port': 0, 'admin_token': TOKEN,
                                      **config})
        servers.append(AppServer(config))
        return servers[-1]

    yield start
    for server in reversed(servers):
        server.stop()
