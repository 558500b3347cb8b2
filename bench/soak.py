#!/usr/bin/env python3
"""Soak: one node under a steady mixed load; does anything grow?

    .venv/bin/python bench/soak.py                  # 10 minutes (make soak)
    .venv/bin/python bench/soak.py --minutes 1      # a short run
    .venv/bin/python bench/soak.py --pg postgresql://postgres@127.0.0.1/soak

Starts a real node process on a fresh SQLite database in a temporary
folder (or, with --pg, on that PostgreSQL database, created when missing:
its sneakers23 tables are dropped and seeded again), from a copy of the
catalogue with small stocks, and releases every product. Before the clock
starts it fills the node's 4,096-event replay ring (purchase / restock
pairs across the low-medium line), so that replays are as long as they
will ever be from the first minute on. Then, until the time is up:

- purchases at a steady rate (--rate), each by a new shopper (no cookie),
  of a random size, on a few keep-alive connections;
- restocks: once a second every sold-out size gets a few pairs (sometimes
  enough to go from low to medium), so nothing stays out for long, and
  one random size gets one or two more; together with the purchases this
  makes a steady trickle of `stock_change` events (out, low, medium);
- --streams (2,000) SSE streams that churn: each opens (some with a
  Last-Event-ID far back, asking for a replay of thousands of events or
  a snapshot; some resuming where that slot's last stream stopped; some
  with an id the node cannot know), reads for a while (20-120 s), and
  leaves; a new one takes its place at once. One in five stalls (stops
  reading, with a small receive buffer so that the node's side fills up)
  for 10-45 s, then either reads on or leaves without reading.

Every 10 s it prints one line: the node's RSS, open fds and greenlet count
(from `/healthz` "process" when the node shows it, else RSS and fds from
/proc/PID and greenlets "n/a"), the open streams, what the load did in
those 10 s, the node's and this client's CPU use. At the end it prints each
of the three after warm-up vs at the end (each the median of three
samples), with the change in %, and exits 1 if any ended more than 10%
above where it started (or the node died).

The client is one gevent process (raw sockets, no HTTP library): it must
not be the bottleneck on a 2-core machine, so its CPU use is printed on
every line and at the end.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib

import gevent
from repl_driver import Connection, call_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NODE = os.path.join(ROOT, 'sneakers23.py')
CATALOG = os.path.join(ROOT, 'data', 'catalog.toml')
TOKEN = 'soak-admin-token'
HOST = '127.0.0.1'
CLK_TCK = os.sysconf('SC_CLK_TCK')
LIMIT_PCT = 10.0
SMOOTH = 3           # samples in the median of the start and of the end

# Stream behaviour: lifetime, the share that stalls and for how long, the
# receive buffer of a staller, how many open per second at the start.
LIFE_S = (20, 120)
STALL_SHARE = 0.2
STALL_S = (10, 45)
STALL_RCVBUF = 4096
RAMP_PER_S = 250
# How a new stream picks its Last-Event-ID.
FAR_BACK_SHARE = 0.15      # an id 500-6,000 events back: replay/snapshot
RESUME_SHARE = 0.25        # the last id this slot's previous stream saw
UNKNOWN_SHARE = 0.05       # another epoch: a snapshot
# The node keeps the last 4,096 events for replays (SSE_BUFFER); the soak
# fills that ring before it starts, so that replays are as long as they
# will ever be from the first minute on.
RING_EVENTS = 4096


def say(text):
    print(text, flush=True)


# ---------------------------------------------------------------------------
# The node
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def small_catalog(path, rng):
    """The seed catalogue with 0-40 pairs per size, written to `path`:
    stock that sells out and comes back, not 850 pairs that never move."""
    with open(CATALOG, 'rb') as f:
        products = tomllib.load(f)['products']
    out = []
    for product in products:
        out.append('[[products]]')
        for key in ('sku', 'brand', 'name', 'color', 'image'):
            out.append(f'{key} = {json.dumps(product[key])}')
        out.append(f'price_cents = {product["price_cents"]}')
        out.append('[products.stock]')
        for size in product['stock']:
            out.append(f'{json.dumps(size)} = {rng.randint(0, 40)}')
        out.append('')
    with open(path, 'w') as f:
        f.write('\n'.join(out))


class Node:
    """The node process, in its own session, its output in a log file."""

    def __init__(self, db_url, workdir, port):
        self.db_url, self.port = db_url, port
        self.log_path = os.path.join(workdir, 'node.log')
        self.env = {**os.environ, 'SNEAKERS23_ADMIN_TOKEN': TOKEN,
                    'PYTHONUNBUFFERED': '1'}
        self.proc = None

    def seed(self, catalog):
        cmd = [sys.executable, NODE, 'seed', '--reset', '--db', self.db_url,
               '--catalog', catalog]
        done = subprocess.run(cmd, env=self.env, capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f'seed failed: {done.stdout}{done.stderr}')

    def start(self):
        cmd = [sys.executable, NODE, 'serve', '--db', self.db_url,
               '--host', HOST, '--port', str(self.port)]
        with open(self.log_path, 'ab') as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if api(self.port, 'GET', '/healthz')[0] == 200:
                    return
            except OSError:
                pass
            gevent.sleep(0.05)
        raise RuntimeError('the node did not answer /healthz in 60 s')

    def check_alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f'the node exited with {self.proc.returncode}'
                               f':\n{self.log_tail()}')

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, errors='replace') as f:
                return ''.join(f.readlines()[-lines:])
        except OSError:
            return ''

    def tracebacks(self):
        try:
            with open(self.log_path, errors='replace') as f:
                return f.read().count('Traceback')
        except OSError:
            return 0

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    # -- what it uses ------------------------------------------------------

    def proc_rss_bytes(self):
        with open(f'/proc/{self.proc.pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) * 1024
        return None

    def proc_fds(self):
        return len(os.listdir(f'/proc/{self.proc.pid}/fd'))

    def cpu_seconds(self):
        with open(f'/proc/{self.proc.pid}/stat') as f:
            fields = f.read().rpartition(')')[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


def api(port, method, path, body=None, admin=False):
    """(status, JSON) of one request on a fresh connection."""
    return call_json(HOST, port, method, path, body,
                     TOKEN if admin else None)


def fill_ring(port, products, events=RING_EVENTS, lanes=4):
    """Make `events` stock_change events fast: on `lanes` sizes at once,
    a restock to 150 (medium), then purchase (149, low) and restock 1
    (150, medium) in turn, each on one keep-alive connection."""
    sizes = [i for p in products for i in p['items']][:lanes]
    auth = [f'Authorization: Bearer {TOKEN}']

    def lane(item, changes):
        conn = Connection(HOST, port)
        try:
            if item['count'] < 150:
                admin(port, f'/admin/api/items/{item["id"]}/restock',
                      {'count': 150 - item['count']})
            for k in range(changes):
                if k % 2 == 0:
                    _, status, _ = conn.request(
                        'POST', '/api/purchase', {'item_id': item['id']})
                    want = 201
                else:
                    _, status, _ = conn.request(
                        'POST', f'/admin/api/items/{item["id"]}/restock',
                        {'count': 1}, auth)
                    want = 200
                if status != want:
                    raise RuntimeError(f'filling the ring: {status} on '
                                       f'item {item["id"]}')
        finally:
            conn.close()

    per_lane = -(-events // lanes)
    gevent.joinall([gevent.spawn(lane, item, per_lane) for item in sizes],
                   raise_error=True)


def admin(port, path, body):
    status, answer = api(port, 'POST', path, body, admin=True)
    if status != 200:
        raise RuntimeError(f'POST {path}: {status} {answer}')
    return answer


# ---------------------------------------------------------------------------
# The load
# ---------------------------------------------------------------------------

class Load:
    """Purchases, restocks and churning SSE streams, all greenlets."""

    def __init__(self, args, port, items, rng):
        self.args, self.port, self.items, self.rng = args, port, items, rng
        self.greenlets = []
        self.open_streams = 0
        self.event_id = None       # the node's latest, from /healthz
        self.counts = dict.fromkeys(
            ('opened', 'left', 'cut', 'refused', 'stalled', 'far_back',
             'resumed', 'unknown', 'bytes', 'bought', 'sold_out',
             'buy_other', 'buy_errors', 'restocks', 'restock_errors'), 0)

    def start(self):
        per_conn = self.args.rate / self.args.buyers
        for n in range(self.args.buyers):
            self.greenlets.append(gevent.spawn(self._buyer, n, per_conn))
        self.greenlets.append(gevent.spawn(self._restocker))
        for n in range(self.args.streams):
            self.greenlets.append(gevent.spawn(self._slot, n))

    def stop(self):
        gevent.killall(self.greenlets, timeout=10)

    # -- purchases -------------------------------------------------------

    def _buyer(self, n, rate):
        """Purchases at `rate`/s on one keep-alive connection; each has
        no cookie, so each is a new shopper."""
        interval, conn = 1.0 / rate, None
        due = time.monotonic() + n * interval / self.args.buyers
        while True:
            delay = due - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            due = max(due + interval, time.monotonic() - 1.0)
            try:
                conn = conn or Connection(HOST, self.port)
                _, status, _ = conn.request(
                    'POST', '/api/purchase',
                    {'item_id': self.rng.choice(self.items)})
            except OSError:
                self.counts['buy_errors'] += 1
                if conn:
                    conn.close()
                conn = None
                continue
            if status == 201:
                self.counts['bought'] += 1
            elif status == 409:
                self.counts['sold_out'] += 1
            else:
                self.counts['buy_other'] += 1

    # -- restocks --------------------------------------------------------

    def _restocker(self):
        """Once a second: a few pairs for every size that is out (1-15,
        or 150-170 one time in 20), and 1-2 for one random size."""
        while True:
            gevent.sleep(1.0)
            try:
                status, products = api(self.port, 'GET', '/api/products')
                if status != 200:
                    raise OSError(f'/api/products answered {status}')
                out = [i['id'] for p in products for i in p['items']
                       if i['count'] == 0]
                for item in out:
                    count = (self.rng.randint(150, 170)
                             if self.rng.random() < 0.05
                             else self.rng.randint(1, 15))
                    self._restock(item, count)
                self._restock(self.rng.choice(self.items),
                              self.rng.randint(1, 2))
            except OSError:
                self.counts['restock_errors'] += 1

    def _restock(self, item, count):
        status, _ = api(self.port, 'POST',
                        f'/admin/api/items/{item}/restock', {'count': count},
                        admin=True)
        self.counts['restocks' if status == 200 else 'restock_errors'] += 1

    # -- SSE streams -----------------------------------------------------

    def _slot(self, n):
        """One of the N streams: open, read, maybe stall, leave; again."""
        gevent.sleep(n / RAMP_PER_S)
        last_id = None
        while True:
            try:
                last_id = self._stream(last_id)
            except OSError:
                self.counts['refused'] += 1
                gevent.sleep(1.0)

    def _pick_last_id(self, last_id):
        """(Last-Event-ID to send or None, whether it is far back)."""
        roll, now = self.rng.random(), self.event_id
        if roll < FAR_BACK_SHARE:
            if now:
                epoch, _, seq = now.partition('-')
                self.counts['far_back'] += 1
                back = int(seq) - self.rng.randint(500, 6000)
                return f'{epoch}-{max(0, back)}', True
        elif roll < FAR_BACK_SHARE + RESUME_SHARE:
            if last_id:
                self.counts['resumed'] += 1
                return last_id, False
        elif roll < FAR_BACK_SHARE + RESUME_SHARE + UNKNOWN_SHARE:
            self.counts['unknown'] += 1
            return f'{self.rng.getrandbits(40):x}-{self.rng.randint(1, 99)}',\
                False
        return None, False

    def _stream(self, last_id):
        """One stream's life; returns the last event id it saw."""
        rng = self.rng
        want_id, far_back = self._pick_last_id(last_id)
        life = rng.uniform(*LIFE_S)
        stall_at = stall_for = None
        if rng.random() < STALL_SHARE:
            # A far-back request that never reads is the replay attack:
            # half of those stall from the first byte.
            stall_at = 0.0 if far_back and rng.random() < 0.5 else \
                rng.uniform(0, life / 2)
            stall_for = rng.uniform(*STALL_S)
        sock = socket.socket()
        if stall_at is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                            STALL_RCVBUF)
        try:
            sock.connect((HOST, self.port))
            head = ['GET /events HTTP/1.1', f'Host: {HOST}',
                    'Accept: text/event-stream']
            if want_id:
                head.append(f'Last-Event-ID: {want_id}')
            sock.sendall(('\r\n'.join(head) + '\r\n\r\n').encode())
            self.counts['opened'] += 1
            self.open_streams += 1
            try:
                return self._read(sock, life, stall_at, stall_for) or last_id
            finally:
                self.open_streams -= 1
        finally:
            sock.close()

    def _read(self, sock, life, stall_at, stall_for):
        """Read until `life` is over (with the stall, if any); the last
        event id seen, or None."""
        start, last_id, checked = time.monotonic(), None, False
        phases = [(life, False)]
        if stall_at is not None:
            leave_after = self.rng.random() < 0.5
            phases = [(stall_at, False), (stall_at + stall_for, True)]
            if not leave_after:
                phases.append((life + stall_for, False))
        for until, stalled in phases:
            if stalled:
                self.counts['stalled'] += 1
                gevent.sleep(max(0.0, start + until - time.monotonic()))
                continue
            while True:
                left = start + until - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                except OSError:
                    chunk = b''
                if not chunk:
                    self.counts['cut'] += 1
                    return last_id
                if not checked:
                    if not chunk.startswith(b'HTTP/1.1 200'):
                        raise OSError(f'the node answered {chunk[:40]!r}')
                    checked = True
                self.counts['bytes'] += len(chunk)
                at = chunk.rfind(b'id: ')
                if at >= 0:
                    end = chunk.find(b'\n', at)
                    if end > 0:
                        last_id = chunk[at + 4:end].decode('latin-1')
        self.counts['left'] += 1
        return last_id


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------

def client_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Sampler:
    """One sample every --every seconds: node RSS, fds, greenlets, and
    what happened since the last one."""

    def __init__(self, node, load):
        self.node, self.load = node, load
        self.samples = []
        self.began = time.monotonic()
        self._last = (self.began, node.cpu_seconds(), client_cpu(),
                      dict(load.counts))

    def sample(self):
        node, load = self.node, self.load
        node.check_alive()
        status, health = api(node.port, 'GET', '/healthz')
        if status != 200:
            raise RuntimeError(f'/healthz answered {status}: {health}')
        process = health.get('process') or {}
        now, node_cpu, own_cpu = time.monotonic(), node.cpu_seconds(), \
            client_cpu()
        before_t, before_node, before_own, before = self._last
        took = max(1e-6, now - before_t)
        counts = dict(load.counts)
        delta = {k: counts[k] - before.get(k, 0) for k in counts}
        self._last = (now, node_cpu, own_cpu, counts)
        load.event_id = health.get('event_id') or load.event_id
        row = {
            't': now - self.began,
            'rss': process.get('rss_bytes') or node.proc_rss_bytes(),
            'fds': process.get('open_fds') or node.proc_fds(),
            'greenlets': process.get('greenlets'),
            'from': 'healthz' if process else 'proc',
            'node_streams': health.get('streams'),
            'client_streams': load.open_streams,
            'event_seq': int(str(health.get('event_id', '-0'))
                             .rpartition('-')[2] or 0),
            'hub_lag_ms': (health.get('hub_lag_ms') or {}).get('max_10s'),
            'node_cpu': (node_cpu - before_node) / took,
            'client_cpu': (own_cpu - before_own) / took,
            'delta': delta}
        self.samples.append(row)
        return row


def mb(value):
    return f'{value / 1e6:,.1f} MB'


def count(value):
    return 'n/a' if value is None else f'{value:,}'


def line(row, previous_seq):
    d = row['delta']
    lag = row['hub_lag_ms']
    return (f't={row["t"]:4.0f}s  rss {mb(row["rss"]):>9}  fds '
            f'{count(row["fds"]):>6}  greenlets {count(row["greenlets"]):>5}'
            f'  | streams {row["client_streams"]:,} (node '
            f'{count(row["node_streams"])}) +{d["opened"]} opened, '
            f'{d["left"]} left, {d["cut"]} cut, {d["refused"]} refused, '
            f'{d["bytes"] / 1e6:.1f} MB read | buys {d["bought"]} ok '
            f'{d["sold_out"]} out {d["buy_other"] + d["buy_errors"]} bad, '
            f'restocks {d["restocks"]} | events +'
            f'{row["event_seq"] - previous_seq} | hub lag '
            f'{"n/a" if lag is None else f"{lag:.0f} ms"} | cpu node '
            f'{row["node_cpu"]:.0%} client {row["client_cpu"]:.0%}')


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description='sneakers23 soak: does RSS, fds or greenlets grow?')
    parser.add_argument('--minutes', type=float, default=10,
                        help='how long the load runs (default 10)')
    parser.add_argument('--warmup', type=float, default=60, metavar='S',
                        help='seconds before the start sample (default 60,'
                             ' at most half the run)')
    parser.add_argument('--streams', type=int, default=2000,
                        help='SSE streams kept open (default 2,000)')
    parser.add_argument('--rate', type=float, default=50,
                        help='purchases per second (default 50)')
    parser.add_argument('--buyers', type=int, default=4,
                        help='keep-alive connections for purchases')
    parser.add_argument('--every', type=float, default=10, metavar='S',
                        help='seconds between samples (default 10)')
    parser.add_argument('--pg', metavar='URL',
                        help='run the node on this PostgreSQL database, '
                             'created when missing (its sneakers23 tables '
                             'are dropped!), e.g. postgresql://postgres@'
                             '127.0.0.1:5432/sneakers23_soak')
    parser.add_argument('--seed', type=int, default=23,
                        help='random seed of the load')
    return parser.parse_args(argv)


def pg_ensure_database(url):
    """Create the database of `url` when it is missing."""
    import psycopg2
    from psycopg2.extensions import make_dsn, parse_dsn
    try:
        psycopg2.connect(url).close()
        return
    except psycopg2.OperationalError as e:
        if 'does not exist' not in str(e):
            raise RuntimeError(f'cannot reach {url}: {e}') from None
    conn = psycopg2.connect(make_dsn(url, dbname='postgres'))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{parse_dsn(url)["dbname"]}"')
    finally:
        conn.close()


def run(args, workdir):
    rng = random.Random(args.seed)
    catalog = os.path.join(workdir, 'catalog.toml')
    small_catalog(catalog, rng)
    if args.pg:
        pg_ensure_database(args.pg)
    db_url = args.pg or f'sqlite:///{os.path.join(workdir, "soak.db")}'
    node = Node(db_url, workdir, free_port())
    node.seed(catalog)
    node.start()
    say(f'node pid {node.proc.pid} on http://{HOST}:{node.port}, '
        f'{db_url.split("@")[-1] if args.pg else "SQLite in " + workdir}')
    status, products = api(node.port, 'GET', '/api/products')
    for product in products:
        admin(node.port, f'/admin/api/products/{product["id"]}/release', {})
    items = [i['id'] for p in products for i in p['items']]
    began = time.monotonic()
    fill_ring(node.port, products)
    say(f'filled the event ring: '
        f'{api(node.port, "GET", "/healthz")[1].get("event_id")} after '
        f'{time.monotonic() - began:.1f} s')
    say(f'released {len(products)} products, {len(items)} sizes; '
        f'{args.streams:,} streams, {args.rate:g} purchases/s, for '
        f'{args.minutes:g} min; a sample every {args.every:g} s')
    load = Load(args, node.port, items, rng)
    load.event_id = api(node.port, 'GET', '/healthz')[1].get('event_id')
    sampler = Sampler(node, load)
    load.start()
    try:
        return watch(args, node, load, sampler)
    finally:
        load.stop()
        try:
            after_stop(node, sampler)
        finally:
            node.stop()


def watch(args, node, load, sampler):
    duration = args.minutes * 60
    warmup = min(args.warmup, duration / 2)
    ticks = max(1, round(duration / args.every))
    seq = int((load.event_id or '-0').rpartition('-')[2] or 0)
    for k in range(1, ticks + 1):
        gevent.sleep(max(0.0, sampler.began + k * args.every
                         - time.monotonic()))
        row = sampler.sample()
        say(line(row, seq))
        seq = row['event_seq']
    return report(args, node, load, sampler, warmup)


def after_stop(node, sampler):
    """Once the load has left: is the memory given back?"""
    if node.proc.poll() is not None:
        return
    gevent.sleep(5)
    try:
        row = sampler.sample()
    except (OSError, RuntimeError):
        return
    say(f'5 s after the load stopped: rss {mb(row["rss"])}, fds '
        f'{count(row["fds"])}, greenlets {count(row["greenlets"])}, '
        f'streams (node) {count(row["node_streams"])}')


def keep_log(node):
    """Copy the node's log out of the temporary folder."""
    results = os.path.join(HERE, 'results')
    os.makedirs(results, exist_ok=True)
    path = os.path.join(results, 'soak-node.log')
    shutil.copyfile(node.log_path, path)
    return path


def when(rows):
    times = ', '.join(f'{row["t"]:.0f}' for row in rows)
    return f't={times}s' if len(rows) == 1 else f'median of t={times}s'


def middle(rows, key):
    values = [row[key] for row in rows]
    return None if None in values else statistics.median_low(values)


def report(args, node, load, sampler, warmup):
    samples = sampler.samples
    # The start is a sample after warm-up, not the idle node: in its first
    # minute the node grows to its working size (2,000 streams' sockets
    # and buffers, the 4,096-event ring filling, page and JSON caches,
    # SQLite's page cache, Python's allocator arenas), and that is not a
    # leak. Steady state is from when all streams are open; growth past
    # that, over minutes of the same churn, is what a leak looks like.
    full = [s for s in samples if s['t'] >= warmup - 1
            and s['client_streams'] >= 0.95 * args.streams]
    start = full[0] if full else next(
        (s for s in samples if s['t'] >= warmup - 1), samples[0])
    end = samples[-1]
    # Start and end are each the median of three samples when the run is
    # long enough: the greenlet count is ~20, and the request greenlets of
    # the moment (a restock, this /healthz) move one sample by 10-15%.
    steady = samples[samples.index(start):]
    width = SMOOTH if len(steady) >= 2 * SMOOTH else 1
    first, last = steady[:width], steady[-width:]
    totals = {k: sum(s['delta'][k] for s in samples) for k in load.counts}
    took = end['t']
    own = sum(s['client_cpu'] for s in samples) * args.every / max(1, took)
    node_cpu = sum(s['node_cpu'] for s in samples) * args.every / max(1, took)
    say('')
    say(f'load over {took:.0f} s: {totals["opened"]:,} streams opened '
        f'({totals["far_back"]:,} far back, {totals["resumed"]:,} resuming,'
        f' {totals["unknown"]:,} unknown id), {totals["left"]:,} left, '
        f'{totals["cut"]:,} cut off by the node, {totals["stalled"]:,} '
        f'stalled, {totals["refused"]:,} refused; {totals["bytes"] / 1e6:,.0f}'
        f' MB read; {totals["bought"]:,} bought ({totals["bought"] / took:.0f}'
        f'/s), {totals["sold_out"]:,} sold out, {totals["buy_other"]:,} other'
        f' answers, {totals["buy_errors"]:,} connection errors; '
        f'{totals["restocks"]:,} restocks ({totals["restock_errors"]:,} '
        f'failed); {end["event_seq"]:,} events')
    say(f'CPU: node {node_cpu:.0%} of a core on average, this client '
        f'{own:.0%} (max {max(s["client_cpu"] for s in samples):.0%} over '
        f'{args.every:g} s)')
    if own > 0.7:
        say('  note: the client used most of a core: it may have been the '
            'bottleneck')
    tracebacks = node.tracebacks()
    if tracebacks:
        say(f'node log: {tracebacks} tracebacks (kept in '
            f'{os.path.relpath(keep_log(node), ROOT)})')
    if start is end:
        say('too short: no sample after warm-up to compare with')
        return 1
    say(f'\nstart = {when(first)} (after {warmup:.0f} s warm-up'
        f'{"" if full else ", not all streams open"}), end = '
        f'{when(last)}; values from {end["from"]}')
    failed = []
    say(f'{"":10} {"start":>12} {"end":>12} {"change":>8}')
    for key, name, show in (('rss', 'RSS', mb), ('fds', 'open fds', count),
                            ('greenlets', 'greenlets', count)):
        a, b = middle(first, key), middle(last, key)
        if a is None or b is None:
            say(f'{name:10} {"n/a":>12} {"n/a":>12} {"n/a":>8}')
            continue
        change = (b - a) / a * 100 if a else 0.0
        peak = max(s[key] for s in samples if s['t'] >= start['t'])
        flag = ''
        if change > LIMIT_PCT:
            failed.append(name)
            flag = f'  MORE THAN {LIMIT_PCT:g}% ABOVE THE START'
        say(f'{name:10} {show(a):>12} {show(b):>12} {change:+7.1f}%  '
            f'(peak {show(peak)}){flag}')
    if failed:
        say(f'FAILED: {", ".join(failed)} grew by more than {LIMIT_PCT:g}%')
        return 1
    say(f'ok: each ended within {LIMIT_PCT:g}% of where it started')
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    main_greenlet = gevent.getcurrent()
    gevent.signal_handler(signal.SIGTERM, gevent.kill, main_greenlet,
                          SystemExit(1))
    workdir = tempfile.mkdtemp(prefix='sneakers23-soak-')
    try:
        return run(args, workdir)
    except RuntimeError as e:
        say(f'soak FAILED: {e}')
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
