"""Smoke test of the one-file build (`make binary` -> dist/sneakers23).

    .venv/bin/python packaging/smoke.py [path/to/sneakers23]

Copies the binary into an empty temporary folder and runs it there with a
clean environment (HOME in the temporary folder, PATH=/usr/bin:/bin, no
virtualenv, no PYTHONPATH): a node that seeds its own database in the
per-user data folder, the page, the API, a purchase, every subcommand, a
two-node CURVE cluster sharing one SQLite file, and, when TEST_DATABASE_URL
is set, a node on PostgreSQL (its own `sneakers23_smoke` database, never
the tests' one). Exits 1 with one clear line on the first failure; every
process it started is stopped on the way out.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BINARY = os.path.join(ROOT, 'dist', 'sneakers23')
TOKEN = 'smoke-admin-token'
START_TIMEOUT = 30.0
PEER_TIMEOUT = 15.0
EVENT_TIMEOUT = 5.0
SMOKE_DB = 'sneakers23_smoke'


class SmokeError(Exception): pass


def check(condition, message):
    """Fail the smoke test with `message` unless `condition` holds."""
    if not condition:
        raise SmokeError(message)


def free_port():
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def port_is_free(port):
    with socket.socket() as sock:
        try:
            sock.bind(('127.0.0.1', port))
        except OSError:
            return False
        return True


def request(port, method, path, body=None, headers=None):
    """(status, body bytes) of one HTTP request to a node on loopback."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers = {'Content-Type': 'application/json', **(headers or {})}
        conn.request(method, path, data, headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def get_json(port, path):
    status, body = request(port, 'GET', path)
    check(status == 200, f'GET {path} on :{port} answered {status}')
    return json.loads(body)


class Binary:
    """The binary copied into an empty folder, run with a clean env."""

    def __init__(self, source, tmp):
        self.folder = os.path.join(tmp, 'run')
        self.home = os.path.join(tmp, 'home')
        os.makedirs(self.folder)
        os.makedirs(self.home)
        self.path = os.path.join(self.folder, 'sneakers23')
        shutil.copy2(source, self.path)
        self.logs = tmp
        self.nodes = []

    def env(self, **extra):
        """The clean environment: HOME and PATH only, plus `extra`."""
        return {'HOME': self.home, 'PATH': '/usr/bin:/bin', **extra}

    def run(self, *args, expect=0, timeout=30, **env):
        """Run a subcommand to its end; (stdout, stderr)."""
        done = subprocess.run([self.path, *args], cwd=self.folder,
                              env=self.env(**env), capture_output=True,
                              text=True, timeout=timeout)
        check(done.returncode == expect,
              f'`sneakers23 {" ".join(args)}` exited {done.returncode}, '
              f'not {expect}: {done.stderr.strip()[-300:]}')
        return done.stdout, done.stderr

    def spawn(self, name, *args, **env):
        """Start a long-running subcommand; its output goes to a log."""
        log = open(os.path.join(self.logs, f'{name}.log'), 'w+')
        proc = subprocess.Popen([self.path, *args], cwd=self.folder,
                                env=self.env(**env), stdout=log,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log, proc.name = log, name
        self.nodes.append(proc)
        return proc

    def serve(self, name, port, *args, **env):
        """Start a node; (process, seconds from exec to /healthz 200)."""
        started = time.monotonic()
        proc = self.spawn(name, *args, **env)
        deadline = started + START_TIMEOUT
        while time.monotonic() < deadline:
            check(proc.poll() is None, f'node {name} exited '
                  f'{proc.returncode}: {tail(proc)}')
            try:
                if request(port, 'GET', '/healthz')[0] == 200:
                    return proc, time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.01)
        raise SmokeError(f'node {name}: no /healthz 200 on :{port} after '
                         f'{START_TIMEOUT:.0f} s: {tail(proc)}')

    def stop(self, proc, sig=signal.SIGTERM, timeout=10):
        """Signal the process (the bootloader passes it on); exit code."""
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise SmokeError(f'{proc.name} ignored {sig.name} for '
                                 f'{timeout} s: {tail(proc)}') from None
        return proc.returncode

    def stop_all(self):
        """Stop whatever is still running, by force if it must."""
        for proc in self.nodes:
            try:
                self.stop(proc)
            except SmokeError as e:
                print(f'smoke: {e}', file=sys.stderr)
            proc.log.close()


def tail(proc, lines=5):
    """The last lines a spawned process printed."""
    proc.log.flush()
    proc.log.seek(0)
    return ' | '.join(proc.log.read().strip().splitlines()[-lines:])


def output(proc):
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------

def check_command_line(binary):
    """--help, a bad argument, keygen (CURVE inside the bundle)."""
    out, _ = binary.run('--help')
    for command in ('serve', 'seed', 'release', 'restock', 'sell-random',
                    'keygen'):
        check(command in out, f'--help does not mention {command}')
    out, err = binary.run('--no-such-option', expect=2)
    check(not out and len(err.splitlines()) == 1
          and err.startswith('sneakers23:'),
          f'a bad argument should print one sneakers23: line, not {err!r}')
    public, secret = keygen(binary)
    check(public != secret, 'keygen printed the same key twice')


def keygen(binary):
    """A CURVE key pair from `sneakers23 keygen`."""
    out, _ = binary.run('keygen')
    keys = dict(re.findall(r'^(public_key|secret_key) = "(.{40})"$', out,
                           re.MULTILINE))
    check(len(keys) == 2, f'keygen should print two 40-char keys: {out!r}')
    return keys['public_key'], keys['secret_key']


def check_first_start(binary):
    """No arguments, empty HOME: seeds the per-user DB and serves."""
    port, args = 8023, ()
    if not port_is_free(port):  # someone's node: same start, another port
        port = free_port()
        args = ('--port', str(port))
    proc, seconds = binary.serve('first', port, *args)
    db_file = os.path.join(binary.home, '.local', 'share', 'sneakers23',
                           'sneakers23.db')
    check(os.path.isfile(db_file), f'no database at {db_file}')
    health = get_json(port, '/healthz')
    check(health['db'] == f'sqlite:///{db_file}' and health['products'] > 0,
          f'/healthz after the first start: {health}')
    check(f'serving on http://127.0.0.1:{port}' in output(proc)
          and 'admin token' in output(proc),
          f'the first start did not print its token and URL: {tail(proc)}')
    worker = fan_out_worker(port)
    check(binary.stop(proc) == 0, f'SIGTERM: exit {proc.returncode}')
    check(wait_gone(worker), f'its fan-out worker {worker} outlived it')
    check(os.listdir(binary.folder) == ['sneakers23'],
          f'the binary wrote beside itself: {os.listdir(binary.folder)}')
    return seconds


def fan_out_worker(port):
    """The pid of the node's fan-out worker, which the first stream
    starts (the binary runs it as a second process of itself)."""
    stream = http.client.HTTPConnection('127.0.0.1', port, timeout=20)
    try:
        stream.request('GET', '/events')
        check(stream.getresponse().status == 200, '/events: not 200')
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            fan_out = get_json(port, '/healthz')['fan_out']
            check(fan_out['process'] == 'worker', f'fan_out: {fan_out}')
            if fan_out['rss_bytes']:   # it reported: it runs
                return fan_out['pid']
            time.sleep(0.1)
    finally:
        stream.close()
    raise SmokeError(f'no fan-out worker reported in 20 s: {fan_out}')


def wait_gone(pid, timeout=10):
    """True once process `pid` is gone (or a zombie)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rpartition(')')[2].split()[0] == 'Z':
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def check_store(binary):
    """Second start: page, API, static files, subcommands, a purchase."""
    port = free_port()
    proc, seconds = binary.serve('second', port, '--port', str(port),
                                 SNEAKERS23_ADMIN_TOKEN=TOKEN)
    check_pages(port)
    out, _ = binary.run('seed')
    check('already holds products' in out, f'seed twice said {out!r}')
    url = f'http://127.0.0.1:{port}'
    out, _ = binary.run('release', 'SHU6000', '--url', url,
                        SNEAKERS23_ADMIN_TOKEN=TOKEN)
    check('released' in out, f'release said {out!r}')
    item = in_stock_item(port, 'SHU6000')
    status, body = request(port, 'POST', '/api/purchase',
                           {'item_id': item})
    check(status == 201 and 'order_id' in json.loads(body),
          f'purchase of item {item}: {status} {body[:200]!r}')
    out, _ = binary.run('restock', str(item), '5', '--url', url,
                        SNEAKERS23_ADMIN_TOKEN=TOKEN)
    check(f'item {item} now has' in out, f'restock said {out!r}')
    check_sell_random(binary, url)
    check(binary.stop(proc) == 0, f'SIGTERM: exit {proc.returncode}')
    return seconds


def check_pages(port):
    """/api/products, the store page and the dashboard with their
    scripts (the chart library from static/vendor/): 200, not empty."""
    products = get_json(port, '/api/products')
    check(len(products) == 8 and all(p['items'] for p in products),
          f'/api/products: {len(products)} products')
    for path, needle in (('/', b'data-product-id'),
                         ('/static/app.js', b'EventSource'),
                         ('/static/app.css', b'{'),
                         ('/admin', b'id="signin"'),
                         ('/static/admin.js', b'EventSource'),
                         ('/static/vendor/uPlot-1.6.32.iife.min.js',
                          b'uPlot')):
        status, body = request(port, 'GET', path)
        check(status == 200 and needle in body,
              f'GET {path}: {status}, {len(body)} bytes')


def in_stock_item(port, sku):
    """The id of an item of `sku` that has stock."""
    for product in get_json(port, '/api/products'):
        if product['sku'] == sku:
            check(product['released'], f'{sku} is not released')
            return next(i['id'] for i in product['items'] if i['count'])
    raise SmokeError(f'no product {sku} in /api/products')


def check_sell_random(binary, url):
    """sell-random sells, then stops cleanly on Ctrl-C (SIGINT)."""
    proc = binary.spawn('sell-random', 'sell-random', '--rate', '20',
                        '--url', url, SNEAKERS23_ADMIN_TOKEN=TOKEN)
    time.sleep(2.5)
    check(binary.stop(proc, signal.SIGINT) == 0,
          f'sell-random after SIGINT: exit {proc.returncode}: {tail(proc)}')
    sold = re.search(r'interrupted after selling (\d+) pairs', output(proc))
    check(sold and int(sold[1]) > 0, f'sell-random sold nothing: '
          f'{tail(proc)}')


def check_cluster(binary, tmp):
    """Two CURVE nodes of a peers.toml on one SQLite file: a release on
    node a reaches an SSE stream of node b. Returns the delay in s."""
    folder = os.path.join(tmp, 'cluster')
    os.makedirs(folder)
    db_file = os.path.join(folder, 'c.db')
    out, _ = binary.run('seed', '--db', f'sqlite:///{db_file}')
    check('seeded 8 products' in out, f'cluster seed said {out!r}')
    nodes = {name: (free_port(), free_port(), *keygen(binary))
             for name in 'ab'}
    config = os.path.join(folder, 'peers.toml')
    with open(config, 'w') as f:
        f.write('database = "sqlite:///c.db"\n')  # relative to the file
        for name, (http_port, zmq_port, public, _) in nodes.items():
            f.write(f'\n[nodes.{name}]\nhttp = "127.0.0.1:{http_port}"\n'
                    f'replication = "tcp://127.0.0.1:{zmq_port}"\n'
                    f'public_key = "{public}"\n')
    for name, (http_port, _, _, secret) in nodes.items():
        binary.serve(f'node-{name}', http_port, '--config', config,
                     '--node', name, SNEAKERS23_ADMIN_TOKEN=TOKEN,
                     SNEAKERS23_CURVE_SECRET=secret)
    a_port, b_port = nodes['a'][0], nodes['b'][0]
    wait_connected(a_port, 'b', db_file)
    wait_connected(b_port, 'a', db_file)
    return release_reaches(a_port, b_port, product_id=2)


def wait_connected(port, peer, db_file):
    """Wait until the node on `port` says its peer is connected."""
    deadline = time.monotonic() + PEER_TIMEOUT
    while time.monotonic() < deadline:
        health = get_json(port, '/healthz')
        check(health['db'] == f'sqlite:///{db_file}',
              f'node on :{port} uses {health["db"]}, not {db_file}')
        if health['peers'].get(peer, {}).get('state') == 'connected':
            return
        time.sleep(0.1)
    raise SmokeError(f'node on :{port}: peer {peer} not connected after '
                     f'{PEER_TIMEOUT:.0f} s: {health["peers"]}')


def release_reaches(a_port, b_port, product_id):
    """Release on node a; seconds until `event: released` on node b."""
    stream = http.client.HTTPConnection('127.0.0.1', b_port,
                                        timeout=EVENT_TIMEOUT)
    try:
        stream.request('GET', '/events')
        answer = stream.getresponse()
        check(answer.status == 200, f'/events on b: {answer.status}')
        check(answer.fp.readline().startswith(b'retry:'),
              'the stream on b does not start with retry:')
        started = time.monotonic()
        status, body = request(
            a_port, 'POST', f'/admin/api/products/{product_id}/release', {},
            {'Authorization': f'Bearer {TOKEN}'})
        check(status == 200, f'release on a: {status} {body[:200]!r}')
        wait_event(answer, b'event: released', started)
        data = answer.fp.readline()
        check(f'"product_id":{product_id}'.encode() in data,
              f'released event for another product: {data[:200]!r}')
        return time.monotonic() - started
    finally:
        stream.close()


def wait_event(answer, line, started):
    """Read the stream until `line`, within EVENT_TIMEOUT of `started`."""
    try:
        while time.monotonic() - started < EVENT_TIMEOUT:
            got = answer.fp.readline()
            check(got, 'node b closed its event stream')
            if got.rstrip(b'\n') == line:
                return
    except TimeoutError:
        pass
    raise SmokeError(f'no {line.decode()!r} on node b within '
                     f'{EVENT_TIMEOUT:.0f} s of the release on node a')


def check_postgresql(binary, test_url):
    """A node on PostgreSQL: its own database, seeded afresh."""
    parts = urllib.parse.urlsplit(test_url)
    url = parts._replace(path=f'/{SMOKE_DB}').geturl()
    exists = subprocess.run(
        ['psql', test_url, '-tAc',
         f"SELECT 1 FROM pg_database WHERE datname = '{SMOKE_DB}'"],
        capture_output=True, text=True, timeout=30)
    check(exists.returncode == 0, f'psql: {exists.stderr.strip()}')
    if exists.stdout.strip() != '1':
        created = subprocess.run(['psql', test_url, '-c',
                                  f'CREATE DATABASE {SMOKE_DB}'],
                                 capture_output=True, text=True, timeout=30)
        check(created.returncode == 0, f'psql: {created.stderr.strip()}')
    out, _ = binary.run('seed', '--reset', '--db', url)
    check('seeded 8 products' in out, f'seed on PostgreSQL said {out!r}')
    port = free_port()
    proc, seconds = binary.serve('postgresql', port, '--db', url,
                                 '--port', str(port),
                                 SNEAKERS23_ADMIN_TOKEN=TOKEN)
    health = get_json(port, '/healthz')
    check(health['db'] == url, f'/healthz on PostgreSQL: {health}')
    check_pages(port)
    status, _ = request(port, 'POST', '/admin/api/products/1/release', {},
                        {'Authorization': f'Bearer {TOKEN}'})
    check(status == 200, f'release on PostgreSQL: {status}')
    item = in_stock_item(port, 'SHU6000')
    status, body = request(port, 'POST', '/api/purchase', {'item_id': item})
    check(status == 201, f'purchase on PostgreSQL: {status} {body[:200]!r}')
    check(binary.stop(proc) == 0, f'SIGTERM: exit {proc.returncode}')
    return seconds


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def smoke(source, tmp):
    """Every check in order; the figures for the summary."""
    binary = Binary(source, tmp)
    figures = {'size': f'{os.path.getsize(source) / 1e6:.1f} MB'}
    try:
        check_command_line(binary)
        figures['first start (seeds)'] = f'{check_first_start(binary):.2f} s'
        figures['second start'] = f'{check_store(binary):.2f} s'
        delay = check_cluster(binary, tmp)
        figures['release on a -> SSE on b'] = f'{delay * 1000:.0f} ms'
        test_url = os.environ.get('TEST_DATABASE_URL')
        if test_url:
            seconds = check_postgresql(binary, test_url)
            figures['start on PostgreSQL'] = f'{seconds:.2f} s'
        else:
            figures['PostgreSQL'] = 'skipped (no TEST_DATABASE_URL)'
    finally:
        binary.stop_all()
    return figures


def main(argv):
    source = os.path.abspath(argv[1] if len(argv) > 1 else DEFAULT_BINARY)
    if not os.access(source, os.X_OK):
        print(f'smoke: no binary at {source}: run `make binary`',
              file=sys.stderr)
        return 1
    # Children must get SIGINT's default action, even from a shell that
    # started this script in the background with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix='sneakers23-smoke-') as tmp:
        try:
            figures = smoke(source, tmp)
        except (SmokeError, OSError, subprocess.SubprocessError) as e:
            print(f'smoke: FAILED: {e}', file=sys.stderr)
            return 1
    print(f'smoke: OK in {time.monotonic() - started:.1f} s')
    for name, value in figures.items():
        print(f'  {name}: {value}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
