"""Fixtures: fresh databases, real node processes, small HTTP/SSE clients."""

from gevent import monkey

monkey.patch_all()

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import namedtuple

import gevent
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sneakers23

TOKEN = 'test-admin-token'
# A node without SNEAKERS23_ADMIN_TOKEN keeps the token it makes in this
# file, and the command line reads it from there: never the checkout's.
os.environ['SNEAKERS23_TOKEN_FILE'] = os.path.join(
    tempfile.mkdtemp(prefix='sneakers23-tests-'), 'admin-token')
PG_URL = os.environ.get('TEST_DATABASE_URL', '')
REQUIRE_PG = os.environ.get('SNEAKERS23_REQUIRE_POSTGRES') == '1'


# Ports Chromium refuses to load (net::ERR_UNSAFE_PORT); of its list,
# only this one lies in the range below.
CHROMIUM_UNSAFE_PORTS = {10080}


def free_port():
    """A TCP port nobody uses right now, below the kernel's ephemeral
    range: a port the kernel picked (bind to 0) may go to a client
    connection before the node binds it ("Address already in use").
    Never one Chromium refuses to open (a browser test failed so)."""
    while True:
        port = random.randrange(10_000, 32_000)
        if port in CHROMIUM_UNSAFE_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:
                continue
            return port


def reset_postgres(url):
    """Drop every sneakers23 table so the next node seeds afresh."""
    database = sneakers23.open_database(url)
    sneakers23.db.initialize(database)
    with database.connection_context():
        database.drop_tables(sneakers23.MODELS, safe=True, cascade=True)
    database.close_all()


def fresh_postgres():
    """The test PostgreSQL, emptied; skips (fails under CI) without it."""
    if not PG_URL:
        if REQUIRE_PG:
            pytest.fail('SNEAKERS23_REQUIRE_POSTGRES is set but '
                        'TEST_DATABASE_URL is not')
        pytest.skip('TEST_DATABASE_URL is not set')
    reset_postgres(PG_URL)
    return PG_URL


@pytest.fixture(params=['sqlite', 'postgres'])
def db_url(request, tmp_path):
    """A fresh, empty database: SQLite in tmp_path, or the test PostgreSQL."""
    if request.param == 'sqlite':
        return f'sqlite:///{tmp_path}/store.db'
    return fresh_postgres()


@pytest.fixture
def sqlite_url(tmp_path):
    return f'sqlite:///{tmp_path}/store.db'


def call(url, method, path, body=None, headers=None, raw=None):
    """One HTTP request: (status, headers dict, parsed JSON or bytes).

    Header names are lower case; `set-cookies` lists every Set-Cookie
    (`set-cookie` holds only the last one)."""
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
        got['set-cookies'] = answer.msg.get_all('Set-Cookie') or []
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

    def schedule(self, product_id, at):
        """Schedule (or with None, cancel) a product's release."""
        status, _, answer = self.post(
            f'/admin/api/products/{product_id}/schedule', {'at': at},
            headers=admin_headers())
        assert status == 200, answer
        return answer

    def set_paused(self, paused):
        """The kill switch, through this node."""
        status, _, answer = self.post('/admin/api/sales',
                                      {'paused': paused},
                                      headers=admin_headers())
        assert (status, answer) == (200, {'paused': paused})

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
        self.conn.connect()
        self.port = self.conn.sock.getsockname()[1]   # this end's port
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
    return _straight(db_url, sql, params, lambda cursor: cursor.fetchall())


def _straight(db_url, sql, params, then):
    """`then(cursor)` of one statement on its own connection (committed;
    `?` placeholders on either database)."""
    database = sneakers23.open_database(db_url)
    if db_url.startswith('postgres'):
        sql = sql.replace('?', '%s')
    try:
        with database.connection_context():
            return then(database.execute_sql(sql, params))
    finally:
        if hasattr(database, 'close_all'):
            database.close_all()


def buy(node, item_id, cookie=None):
    """One purchase as a new shopper (or as the shopper of `cookie`)."""
    headers = {'Cookie': cookie} if cookie else {}
    return call(node.url, 'POST', '/api/purchase', {'item_id': item_id},
                headers=headers)


def product_of(node, product_id):
    return next(p for p in node.products() if p['id'] == product_id)


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
# A cluster of real nodes sharing one database
# ---------------------------------------------------------------------------

NAMES = ('a', 'b', 'c')


def seed_database(url):
    """Create and seed the tables once, before any node starts."""
    database = sneakers23.open_database(url)
    sneakers23.db.initialize(database)
    try:
        with database.connection_context():
            assert sneakers23.seed(sneakers23.CATALOG_PATH) > 0
    finally:
        if hasattr(database, 'close_all'):
            database.close_all()


def health(node):
    status, _, answer = node.get('/healthz')
    assert status == 200, answer
    return answer


class Cluster:
    """Nodes (a, b and c unless `names` says) of one `peers.toml` on one
    database."""

    def __init__(self, tmp_path, db_url, public_keys=None, names=NAMES):
        self.tmp_path, self.db_url = tmp_path, db_url
        self.names = tuple(names)
        self.http = {name: free_port() for name in self.names}
        self.replication = {name: f'tcp://127.0.0.1:{free_port()}'
                            for name in self.names}
        self.public_keys = public_keys
        self.config = self.write_config(tmp_path / 'peers.toml',
                                        public_keys)
        self.nodes = {}
        self.processes = []     # everything started, stopped at the end

    def write_config(self, path, public_keys=None):
        lines = [f'database = {json.dumps(self.db_url)}', '']
        for name in self.names:
            lines += [f'[nodes.{name}]',
                      f'http = "127.0.0.1:{self.http[name]}"',
                      f'replication = "{self.replication[name]}"']
            if public_keys:
                lines.append(f'public_key = "{public_keys[name]}"')
            lines.append('')
        path.write_text('\n'.join(lines))
        return path

    def process(self, name, config=None, db_url=None, port=None, env=None):
        """A node process of this cluster (not started yet)."""
        node = NodeProcess(db_url or self.db_url,
                           port=port or self.http[name],
                           args=['--config', str(config or self.config),
                                 '--node', name], env=env)
        node.name = name
        self.processes.append(node)
        return node

    def start(self, env=None, wait=True):
        """Start every node at once; wait until every peer is heard."""
        env = env or {}
        self.nodes = {name: self.process(name, env=env.get(name))
                      for name in self.names}
        jobs = [gevent.spawn(node.start) for node in self.nodes.values()]
        gevent.joinall(jobs, raise_error=True)
        if wait:
            return self.wait_connected()
        return None

    def all_connected(self):
        for name, node in self.nodes.items():
            peers = health(node)['peers']
            if set(peers) != set(self.names) - {name} or any(
                    p['state'] != 'connected' for p in peers.values()):
                return False
        return True

    def wait_connected(self, timeout=6):
        began = time.monotonic()
        wait_until(self.all_connected, timeout,
                   'every node hears its peers', interval=0.05)
        return time.monotonic() - began

    def close(self):
        for node in self.processes:
            if node.proc and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)   # if paused
            node.stop()


# ---------------------------------------------------------------------------
# Pages in a real browser (headless Debian chromium, Playwright)
# ---------------------------------------------------------------------------

import re

from playwright.sync_api import expect, sync_playwright

CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu',
                 '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']
LIVE = 5_000          # ms: an event on an open stream reaches the page
LEVEL = 'size-container__entry--level-'
MARK = 'window.__sneakers23_no_reload'

LAPTOP = {'width': 1280, 'height': 800}


@pytest.fixture(scope='module')
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f'{CHROMIUM} is missing (apt-get install chromium)')
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """`open_page(node, viewport=None, path='/', cookies=(), live=True,
    context=None, **options)`: a fresh browser context (a shopper, or with
    `cookies` an operator; `options` for the context, such as
    `reduced_motion`) on a page of the node, the store page unless `path`
    says; with `context`, another page of that context's shopper.

    Waits until the page says it is live (unless `live` is false) and
    marks the window, so a test can tell later that the page was never
    reloaded. Uncaught JavaScript errors fail the test.
    """
    contexts, errors = [], []

    def open_(node, viewport=None, path='/', cookies=(), live=True,
              context=None, **options):
        if context is None:
            context = browser.new_context(viewport=viewport or LAPTOP,
                                          **options)
            contexts.append(context)
        if cookies:
            context.add_cookies(list(cookies))
        page = context.new_page()
        page.on('pageerror', lambda error: errors.append(error))
        page.goto(node.url + path)
        if live:
            expect(page.locator('#connection')).to_have_attribute(
                'data-state', 'live', timeout=LIVE)
        page.evaluate(f'{MARK} = true')
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, f'JavaScript errors on the page: {errors}'


def card(page, product_id):
    return page.locator(f'.product[data-product-id="{product_id}"]')


def size_button(page, item_id):
    return page.locator(f'.size-container__entry[value="{item_id}"]')


def level_class(level):
    """Matches the button's class attribute when it shows `level`."""
    return re.compile(rf'(^|\s){re.escape(LEVEL + level)}(\s|$)')


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


# ---------------------------------------------------------------------------
# A private PostgreSQL cluster (for faults: SIGSTOP, SIGCONT)
# ---------------------------------------------------------------------------

import glob
import shutil
import tempfile


def find_initdb():
    """The newest PostgreSQL initdb on this machine, or None."""
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'),
                   key=lambda p: int(p.split('/')[-3]))
    return found[-1] if found else shutil.which('initdb')


class PrivatePostgres:
    """A throwaway PostgreSQL cluster in a temporary folder.

    Run as the `postgres` OS user when we are root (initdb refuses root),
    trust authentication, TCP on 127.0.0.1 at a free port, its unix socket
    in the folder. `pause()` and `resume()` stop and continue every
    process of the cluster: a database that stops answering, not a dead
    one.
    """

    def __init__(self, initdb, prefix=(), host='127.0.0.1'):
        self.bin = os.path.dirname(initdb)
        # `prefix` runs it elsewhere (`ip netns exec NS`), listening on
        # `host` there; the test reaches it through its unix socket.
        self.prefix, self.host = list(prefix), host
        self.dir = tempfile.mkdtemp(prefix='sneakers23-pg-')
        self.data = os.path.join(self.dir, 'data')
        self.port = None
        self.url = None
        self.user = 'postgres' if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user)

    def _run(self, *args, check=True):
        cmd, user = [os.path.join(self.bin, args[0]), *args[1:]], self.user
        if self.prefix:   # root enters the namespace, then drops to user
            cmd = [*self.prefix, 'runuser', '-u', user, '--', *cmd]
            user = None
        return subprocess.run(cmd, user=user, cwd=self.dir, check=check,
                              capture_output=True, text=True, timeout=60)

    def start(self):
        self._run('initdb', '-D', self.data, '-U', 'postgres',
                  '--auth=trust', '--no-sync', '-E', 'UTF8')
        with open(os.path.join(self.data, 'pg_hba.conf'), 'a') as f:
            f.write('host all all samenet trust\n')  # the LAN's hosts
        self.port = free_port()
        options = (f'-p {self.port} -k {self.dir} '
                   f'-c listen_addresses={self.host} -c fsync=off '
                   '-c full_page_writes=off -c max_connections=50')
        done = self._run('pg_ctl', '-D', self.data, '-l',
                         os.path.join(self.dir, 'log'), '-o', options,
                         '-w', '-t', '30', 'start', check=False)
        if done.returncode != 0:
            raise RuntimeError(f'pg_ctl start failed: {done.stdout}'
                               f'{done.stderr}{self.log()}')
        self.url = f'postgresql://postgres@{self.host}:{self.port}/postgres'
        self.local_url = (f'postgresql://postgres@/postgres?host={self.dir}'
                          f'&port={self.port}')
        return self

    def log(self):
        try:
            with open(os.path.join(self.dir, 'log')) as f:
                return f.read()
        except OSError:
            return ''

    def postmaster_pid(self):
        with open(os.path.join(self.data, 'postmaster.pid')) as f:
            return int(f.readline())

    def pids(self):
        """The postmaster and every process under it."""
        found, todo = [], [self.postmaster_pid()]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for path in glob.glob(f'/proc/{pid}/task/*/children'):
                try:
                    with open(path) as f:
                        todo += [int(child) for child in f.read().split()]
                except OSError:
                    pass    # it just exited
        return found

    def _signal_all(self, sig):
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def pause(self):
        """SIGSTOP the whole cluster (the postmaster first: no new
        backend is forked meanwhile); back when every process stopped."""
        os.kill(self.postmaster_pid(), signal.SIGSTOP)

        def all_stopped():
            self._signal_all(signal.SIGSTOP)
            return all(_process_state(pid) in 'Tt' for pid in self.pids())
        wait_until(all_stopped, 5, 'every PostgreSQL process stopped')

    def resume(self):
        self._signal_all(signal.SIGCONT)

    def stop(self):
        try:
            self.resume()
        except OSError:
            pass    # never started, or already gone
        if os.path.exists(os.path.join(self.data, 'postmaster.pid')):
            self._run('pg_ctl', '-D', self.data, '-m', 'immediate', '-w',
                      'stop', check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def _process_state(pid):
    """The state letter of a process (R, S, T, ...); '' when gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rpartition(')')[2].split()[0]
    except (OSError, IndexError):
        return ''


@pytest.fixture
def private_pg():
    """A PostgreSQL cluster of this test alone (`.url`, `.pause()`,
    `.resume()`), stopped and deleted at the end."""
    initdb = find_initdb()
    if initdb is None:
        if REQUIRE_PG:
            pytest.fail('SNEAKERS23_REQUIRE_POSTGRES is set but initdb '
                        '(PostgreSQL server binaries) is not installed')
        pytest.skip('no initdb: PostgreSQL server binaries not installed')
    cluster = PrivatePostgres(initdb)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------
# Draws
# ---------------------------------------------------------------------------

def write_database(db_url, sql, params=()):
    """Run one write statement straight on the database (committed)."""
    _straight(db_url, sql, params, lambda cursor: None)


def close_draw_now(db_url, product_id):
    """The clock reaching a draw's close, without waiting for it: its
    `closes_at` moved to now in the database, its version bumped, so that
    every node reads it at its next look (every DRAW_TICK)."""
    now = sneakers23.utcnow()
    write_database(db_url, 'UPDATE draw SET closes_at = ?, '
                   'version = version + 1 WHERE product_id = ?',
                   (now if db_url.startswith('postgres') else str(now),
                    product_id))


def define_draw(url, product_id, closes='2099-01-01T00:00:00Z', at=None):
    """Release a product as a draw through the admin API of the node at
    `url`; the answer."""
    status, _, answer = call(url, 'POST',
                             f'/admin/api/products/{product_id}/draw',
                             {'closes': closes, 'at': at},
                             headers=admin_headers())
    assert status == 200, answer
    return answer


def enter(url, product_id, item_id, cookie=None):
    """One entry (as the shopper of `cookie`, else a new one): (status,
    answer, the shopper's cookie)."""
    headers = {'Cookie': cookie} if cookie else {}
    status, got, answer = call(url, 'POST',
                               f'/api/draws/{product_id}/entry',
                               {'item_id': item_id}, headers=headers)
    for set_cookie in got['set-cookies']:
        cookie = set_cookie.split(';')[0]
    return status, answer, cookie
