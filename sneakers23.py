"""sneakers23: a real-time sneaker store for flash-sale drops.

One module holds the whole server: Peewee models on SQLite or PostgreSQL,
the node's in-memory inventory, a Server-Sent Events hub, ZeroMQ
replication between nodes, the Bottle web app and the command line.

    python sneakers23.py                      # seed if needed, serve :8023
    python sneakers23.py --config peers.toml --node b
    python sneakers23.py seed --reset
    python sneakers23.py release SHU6000
    python sneakers23.py sell-random --until-gone
"""

from gevent import monkey

monkey.patch_all()

import _socket
import argparse
import contextlib
import csv
import ctypes
import ctypes.util
import gc
import hashlib
import hmac
import http.client
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
import urllib.parse
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import bottle
import gevent
import gevent.event
import gevent.lock
import gevent.queue
import gevent.socket
import gevent.threadpool
import greenlet
import peewee
import prometheus_client
import prometheus_client.metrics_core
import zmq.green as zmq
from gevent.pywsgi import WSGIHandler, WSGIServer, format_date_time
from peewee import (
    BooleanField,
    CharField,
    Check,
    DatabaseError,
    DatabaseProxy,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    IntegrityError,
    InterfaceError,
    Model,
    OperationalError,
    SqliteDatabase,
    TextField,
)
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

logger = logging.getLogger('sneakers23')


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

# A one-file build (PyInstaller) unpacks views/, static/ and data/ into
# sys._MEIPASS; its database goes to the user's data folder instead.
FROZEN = getattr(sys, 'frozen', False)
HERE = getattr(sys, '_MEIPASS', os.path.dirname(os.path.abspath(__file__)))
VIEWS_DIR = os.path.join(HERE, 'views')
STATIC_DIR = os.path.join(HERE, 'static')
DATA_DIR = os.path.join(HERE, 'data')
CATALOG_PATH = os.path.join(DATA_DIR, 'catalog.toml')
XDG_DATA_HOME = (os.environ.get('XDG_DATA_HOME')
                 or os.path.expanduser('~/.local/share'))
DB_DIR = os.path.join(XDG_DATA_HOME, 'sneakers23') if FROZEN else DATA_DIR
DEFAULT_DB_URL = f"sqlite:///{os.path.join(DB_DIR, 'sneakers23.db')}"
# Where a node keeps the admin token it made (owner-only), and where the
# command line finds it when SNEAKERS23_ADMIN_TOKEN is unset.
TOKEN_FILE = (os.environ.get('SNEAKERS23_TOKEN_FILE')
              or os.path.join(DB_DIR, 'admin-token'))
DEFAULT_HOST, DEFAULT_PORT = '127.0.0.1', 8023
DEFAULT_URL = f'http://{DEFAULT_HOST}:{DEFAULT_PORT}'

SIZES = tuple(f'{n / 2:g}' for n in range(12, 25))
LEVEL_THRESHOLDS = ((150, 'low'), (500, 'medium'))

SHOPPER_COOKIE = 's23_shopper'
SHOPPER_MAX_AGE = 90 * 24 * 3600
ADMIN_COOKIE = 's23_admin'
ADMIN_SESSION_AGE = 12 * 3600   # s a dashboard sign-in lasts
MAX_BODY = 4096
MAX_RESTOCK = 1_000_000
MAX_STOCK = 1_000_000_000   # fits a 32-bit integer column on every database
MAX_BATCH = 256
PG_POOL_SIZE = 4
DB_DEADLINE = 3.0           # a write not done by then answers 503
DB_DEADLINE_MARGIN = 0.5    # clock skew allowed between node and database
DB_PROBE_INTERVAL = 1.0     # s without a database call before one probe
SQLITE_LOCK_RETRY = 0.002
HEADER_TIMEOUT = float(os.environ.get('SNEAKERS23_HEADER_TIMEOUT') or 5)
LAG_PROBE_INTERVAL = 0.05
LAG_WINDOW = 10.0
LOOP_ERROR_PAUSE = 0.1
HOUSEKEEPING_INTERVAL = 10.0

IP_PAIRS, IP_RATE = 4, 20
TRUSTED_IPS = ('127.0.0.1', '::1')
ADMIN_FAILURES, ADMIN_REFILL = 10, 6.0   # wrong tokens per IP, s per one
ORDER_LOOKUPS = 10          # GET /api/orders per second per IP (a read each)
PAIRS_RETRY_AFTER = 3600
PAUSED_RETRY_AFTER = '10'

SSE_RETRY_MS = 2000
SSE_KEEPALIVE = 15.0
SSE_BUFFER = 4096
SSE_MAX_PENDING = 256 * 1024
SSE_STALL_TIMEOUT = 30.0
SSE_FAN_OUT_SLICE = 1000
SSE_SEND_SLICE = 64         # streams a sender takes at a time (fan-out)
SSE_THREAD_FROM = 2000
SSE_WORKER_PASS = 2500     # streams per pass of the worker's fan-out
# After a fan-out round that took T, the next waits until T * ratio has
# passed (at most SSE_REST_MAX): under a storm of changes the events of
# that time go out together, and purchases get the hub meanwhile.
SSE_REST_RATIO, SSE_REST_MAX = 1.0, 0.1
# Where the shoppers' streams are written: a process of their own
# ("process", the default), so that a fan-out to 10,000 streams does not
# share a GIL with the purchases; or in the node's own process ("inline").
FAN_OUT = os.environ.get('SNEAKERS23_FAN_OUT') or 'process'
FAN_OUT_COMMAND = '_fan-out-worker'   # argv[1] of the worker process
FAN_OUT_STATS_INTERVAL = 0.1   # s between the worker's counts, if changed
FAN_OUT_RESTART_PAUSE = 1.0    # s before a worker that died is replaced
FAN_OUT_MAX_BACKLOG = 100_000  # messages kept while no worker runs
SO_SNDBUF = 64 * 1024
GC_THRESHOLDS = (50_000, 20, 10)   # see freeze_the_living()
GIL_SWITCH_INTERVAL = 0.001   # s (Python's default 0.005); see Node.start

HEARTBEAT_INTERVAL = 1.0
PEER_SILENT_AFTER = 3.0
PEER_REDIAL_AFTER = 3.0
PEER_REDIAL_INTERVAL = 2.0
PRESENCE_FRESH = 5.0        # a peer's figures older than this: node gone
SALES_WINDOW = 10           # s of orders behind `sales_per_s`
DASHBOARD_INTERVAL = 1.0    # s between the dashboards' overviews
DASHBOARD_HISTORY = 300     # s of sales the dashboard's chart opens with
ZMQ_HEARTBEAT_MS = 1000

DRAW_TICK = 0.25            # s between a draw's live counts, at most
DRAW_IDLE = 1.0             # s between looks at the draws table
DRAW_CLAIM_TTL = 3.0        # s a node's claim to run a draw lasts
DRAW_DEADLINE = 10.0        # s the draw's one transaction may take
DRAW_CLOSED, NO_ENTRY = 'draw_closed', 'no_entry'
ZAP_ENDPOINT = 'inproc://zeromq.zap.01'


class Sneakers23Error(Exception): pass
class ConfigError(Sneakers23Error): pass
class Refused(Sneakers23Error): pass
class Unavailable(Sneakers23Error): pass
class DeadlinePassed(Unavailable): pass
class OutcomeUnknown(Unavailable): pass   # COMMIT sent, its answer lost


# What a database call raises when the database is away (or past its
# deadline): callers that can go on without the answer catch these.
DB_AWAY = (Unavailable, OperationalError, InterfaceError)


class ApiError(Sneakers23Error):
    """An error answered to an HTTP client as `{"error": code}`."""

    def __init__(self, status, code, **headers):
        super().__init__(code)
        self.status, self.code, self.headers = status, code, headers


class TooMany(ApiError):
    """429: a client over one of its limits, told when to come back."""

    def __init__(self, retry_after):
        super().__init__(429, 'too_many_requests',
                         **{'Retry-After': str(max(1, int(retry_after)))})


@dataclass
class Config:
    """Everything a node needs to know before it starts."""

    node: str = 'a'
    db_url: str = DEFAULT_DB_URL
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    admin_token: str = ''
    seed_when_empty: bool = True
    catalog: str = CATALOG_PATH
    peers: dict = field(default_factory=dict)   # name -> Peer
    replication: str = ''
    public_key: str = ''
    curve_secret: str = ''
    drop_rate: float = 0.0   # test-only: lose this share of messages
    ip_pairs: int = IP_PAIRS
    ip_rate: float = IP_RATE
    trusted_ips: tuple = TRUSTED_IPS
    proxies: tuple = ()
    hold_draw: bool = False   # test-only: hang inside a first draw


@dataclass
class Peer:
    """Another node of the cluster, as `peers.toml` lists it."""

    name: str
    replication: str
    public_key: str = ''


def level_of(count):
    """The stock level a shopper sees for `count` pairs left."""
    if count <= 0:
        return 'out'
    for limit, level in LEVEL_THRESHOLDS:
        if count < limit:
            return level
    return 'high'


def utcnow():
    """The current time in UTC, without tzinfo (as stored)."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso_moment(moment):
    """A stored (naive UTC) moment as ISO 8601 with `Z`; None stays."""
    return moment and moment.isoformat() + 'Z'


def parse_moment(text):
    """ISO 8601 with a zone (`Z` or `+01:00`) as a naive UTC moment;
    ValueError without a zone or when unreadable."""
    if not isinstance(text, str):
        raise ValueError('a moment must be ISO 8601 text')
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        raise ValueError('a moment needs a zone: Z or +01:00')
    try:
        return moment.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:  # 0001-01-01T00:00+01:00
        raise ValueError('a moment out of range') from None


def load_cluster(path, node):
    """Read `peers.toml`: the config fields of node `node`."""
    nodes, db_url, limits = _read_cluster_file(path)
    if node not in nodes:
        known = ', '.join(sorted(nodes)) or 'none'
        raise ConfigError(f'node {node!r} is not in {path} (nodes: {known})')
    for name, spec in nodes.items():
        if not str(spec.get('replication', '')).startswith('tcp://'):
            raise ConfigError(f'{path}: nodes.{name}.replication must be '
                              '"tcp://host:port"')
    keyed = [name for name, spec in nodes.items() if spec.get('public_key')]
    if keyed and len(keyed) != len(nodes):
        raise ConfigError(f'{path}: give every node a public_key, or none')
    me = nodes[node]
    host, port = _split_hostport(me.get('http', ''), path, node)
    peers = {name: Peer(name, spec.get('replication', ''),
                        spec.get('public_key', ''))
             for name, spec in nodes.items() if name != node}
    return dict(node=node, host=host, port=port, db_url=db_url,
                peers=peers, replication=me.get('replication', ''),
                public_key=me.get('public_key', ''), **limits)


def _read_cluster_file(path):
    """The `nodes` table, database URL and per-IP limits of a
    peers.toml."""
    try:
        with open(path, 'rb') as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f'cannot read {path}: {e.strerror}') from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f'{path} is not valid TOML: {e}') from None
    nodes = doc.get('nodes')
    if not isinstance(nodes, dict) or not all(
            isinstance(spec, dict) for spec in nodes.values()):
        raise ConfigError(f'{path} has no [nodes.NAME] tables')
    db_url = doc.get('database', DEFAULT_DB_URL)
    if db_url.startswith('sqlite:///') and not db_url.startswith(
            'sqlite:////'):  # relative: to the folder of peers.toml
        folder = os.path.dirname(os.path.abspath(path))
        relative = db_url[len('sqlite:///'):]
        db_url = f"sqlite:///{os.path.join(folder, relative)}"
    limits = {key: doc[key] for key in ('ip_pairs', 'ip_rate',
                                        'trusted_ips', 'proxies')
              if key in doc}
    return nodes, db_url, limits


def _split_hostport(text, path, node):
    """Split "host:port" from peers.toml, or explain what is wrong."""
    host, _, port = str(text).rpartition(':')
    if not host or not port.isdigit():
        raise ConfigError(f'{path}: nodes.{node}.http must be "host:port"')
    return host, int(port)


# ---------------------------------------------------------------------------
# Background loops
# ---------------------------------------------------------------------------

class Loop:
    """A named background loop: `start()` / `stop()`, a shutdown Event as
    its sleep, and every iteration guarded, so that it never dies silently.

    `step()` is one iteration; with an `interval`, the loop sleeps that
    long before each one. A failed iteration is logged and counted.
    """

    def __init__(self, name, step, interval=0.0):
        self.name, self.step, self.interval = name, step, interval
        self.errors = 0
        self.greenlet = None
        self._shutdown = gevent.event.Event()

    def start(self):
        self.greenlet = gevent.spawn(self._run)
        self.greenlet.name = self.name
        return self

    def stop(self):
        self._shutdown.set()
        if self.greenlet is not None:
            self.greenlet.kill(block=False)

    @property
    def state(self):
        """`running`, `stopped`, or `dead` (ended by itself)."""
        if self._shutdown.is_set():
            return 'stopped'
        if self.greenlet is not None and self.greenlet.dead:
            return 'dead'
        return 'running'

    def _run(self):
        while not self._shutdown.is_set():
            if self.interval and self._shutdown.wait(self.interval):
                return
            try:
                self.step()
            except Exception:
                self.errors += 1
                logger.exception('%s: an iteration failed', self.name)
                self._shutdown.wait(LOOP_ERROR_PAUSE)


class LagProbe:
    """How late the gevent hub wakes a sleeping greenlet: a stalled hub
    (blocking I/O, long CPU work) shows here, in /healthz."""

    def __init__(self, interval=LAG_PROBE_INTERVAL, window=LAG_WINDOW):
        self._lateness = deque(maxlen=int(window / interval))
        self._asleep = time.perf_counter()
        self.loop = Loop('lag-probe', self._measure, interval)

    def start(self):
        self._asleep = time.perf_counter()
        self.loop.start()

    def stop(self):
        self.loop.stop()

    def stats(self):
        """The latest and the worst lateness in the window, in ms."""
        worst = max(self._lateness, default=0.0)
        second = int(1 / self.loop.interval)
        recent = max(itertools.islice(reversed(self._lateness), second),
                     default=0.0)
        latest = self._lateness[-1] if self._lateness else 0.0
        return {'latest': round(latest * 1000, 1),
                'max_1s': round(recent * 1000, 1),
                'max_10s': round(worst * 1000, 1)}

    def _measure(self):
        now = time.perf_counter()
        late = now - self._asleep - self.loop.interval
        self._lateness.append(max(0.0, late))
        self._asleep = now


# ---------------------------------------------------------------------------
# Database: connections, prepared queries, the runner
# ---------------------------------------------------------------------------

def open_database(url):
    """Make a Peewee database for `sqlite:///path` or `postgresql://...`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == 'sqlite':
        return _open_sqlite(url[len('sqlite:///'):] if url.startswith(
            'sqlite:///') else '')
    if parts.scheme in ('postgresql', 'postgres'):
        return _open_postgresql(parts)
    raise ConfigError(f'unsupported database URL {url!r}: use '
                      'sqlite:///path or postgresql://user@host:port/db')


def _open_sqlite(path):
    """SQLite in WAL mode, full sync: a committed order survives a crash."""
    if not path:
        raise ConfigError('a SQLite URL needs a path: sqlite:///data/x.db')
    folder = os.path.dirname(os.path.abspath(path))
    if folder == DB_DIR:
        os.makedirs(folder, exist_ok=True)  # the default place: make it
    if not os.path.isdir(folder):
        raise ConfigError(f'no such folder for the database: {folder}')
    pragmas = {'journal_mode': 'wal', 'synchronous': 'full',
               'foreign_keys': 1, 'busy_timeout': 5000}
    # IMMEDIATE: take the write lock at BEGIN. A node waiting for another
    # node's write then waits before its transaction starts (and retries
    # cooperatively, see DatabaseRunner), never failing half-way through.
    return ThreadCommitSqliteDatabase(
        path, pragmas=pragmas, returning_clause=True, lock_type='IMMEDIATE',
        check_same_thread=False)


class ThreadCommitSqliteDatabase(SqliteDatabase):
    """SQLite whose COMMIT runs on a native thread.

    COMMIT is where SQLite waits for the disk: the WAL write, its fsync
    and now and then a checkpoint. On the hub's thread a slow disk froze
    the whole node (a 1.15 s stall seen in a benchmark); on a thread only
    the batch being committed waits. The connection is never used by two
    threads at once: its owner greenlet waits for the commit, and is the
    first to run when it is done (see _call_in_thread_first).
    """

    _committer = None

    def commit(self):
        if self.is_closed():
            return super().commit()
        if self._committer is None:
            ThreadCommitSqliteDatabase._committer = (
                gevent.threadpool.ThreadPool(1))
        with peewee.__exception_wrapper__:
            return _call_in_thread_first(self._committer,
                                         self._state.conn.commit)


LIBEV_MAXPRI = 2   # libev's EV_MAXPRI; io and timers run at 0


def _call_in_thread_first(pool, fn):
    """`pool.apply(fn)`, except that the caller resumes ahead of the
    hub's other ready greenlets: its wake-up is an async watcher of the
    highest priority, switched to directly, not a callback queued behind
    every request that became readable meanwhile. Called from another
    thread than the pool's hub, `fn()` runs there, as `apply` would."""
    hub = gevent.get_hub()
    if hub is not pool.hub:
        return fn()
    watcher = hub.loop.async_()
    watcher.priority = LIBEV_MAXPRI
    outcome = []

    def work():
        try:
            outcome.append((True, fn()))
        except BaseException as e:   # handed to the caller
            outcome.append((False, e))
        finally:
            watcher.send()

    waiter = gevent.hub.Waiter(hub)
    watcher.start(waiter.switch, None)
    try:
        pool.spawn(work)
        while not outcome:
            waiter.get()
            waiter.clear()
    finally:
        watcher.stop()
        watcher.close()
    ok, value = outcome[0]
    if ok:
        return value
    raise value


PG_CONNECT_STALL = 1.0      # s a connect may go without progress


def _wait_for_postgresql(conn, timeout=None):
    """psycogreen's wait callback, with a bound while connecting.

    psycopg2 connects asynchronously here, so libpq's connect_timeout is
    never applied, and a gevent Timeout did not end a connect whose SYN
    was lost in a cut link either (one such wait lasted 7.1 s): it held
    the lock Peewee takes around every connect, and the first purchase
    after the database's cable was back waited 1.7 s for it
    (tests/test_lan.py; 0.6 s with this bound). A connect that makes no
    progress for PG_CONNECT_STALL fails now; queries are bounded by their
    deadlines.
    """
    import psycopg2
    from gevent.socket import wait_read, wait_write
    ext = psycopg2.extensions
    while True:
        state = conn.poll()
        if state == ext.POLL_OK:
            return
        stall = None if conn.status in (
            ext.STATUS_READY, ext.STATUS_BEGIN, ext.STATUS_PREPARED) \
            else PG_CONNECT_STALL   # still connecting
        wait = wait_read if state == ext.POLL_READ else wait_write
        try:
            wait(conn.fileno(), timeout=stall)
        except TimeoutError:   # gevent's socket.timeout
            raise psycopg2.OperationalError(
                f'no progress connecting for {stall} s') from None


def _open_postgresql(parts):
    """PostgreSQL through psycopg2, made cooperative by psycogreen."""
    try:
        import psycogreen.gevent
        import psycopg2.extensions
        from playhouse.pool import PooledPostgresqlDatabase
    except ImportError as e:  # pragma: no cover - pinned in requirements
        raise ConfigError(f'PostgreSQL support is missing: {e}') from None
    psycogreen.gevent.patch_psycopg()   # checks that psycopg2 can
    psycopg2.extensions.set_wait_callback(_wait_for_postgresql)
    name = parts.path.lstrip('/')
    if not name:
        raise ConfigError('a PostgreSQL URL needs a database name')
    # Deadlines the server enforces itself, and TCP keepalives so that a
    # connection to a vanished host fails instead of waiting for ever.
    ms = int(DB_DEADLINE * 1000)
    options = (f'-c statement_timeout={ms} -c lock_timeout={ms} '
               f'-c idle_in_transaction_session_timeout={ms * 10}')
    return PooledPostgresqlDatabase(
        name, user=parts.username, password=parts.password,
        host=parts.hostname or '127.0.0.1', port=parts.port or 5432,
        max_connections=PG_POOL_SIZE + 2, stale_timeout=300,
        connect_timeout=max(1, int(DB_DEADLINE)), options=options,
        keepalives=1, keepalives_idle=5, keepalives_interval=2,
        keepalives_count=2)


# A purchase answered 503 must never be committed later. A stalled
# PostgreSQL (SIGSTOP, a frozen VM) would otherwise run a COMMIT that sat
# in its socket long after the node gave up: this deferred trigger makes
# the COMMIT itself fail once the deadline the node set has passed.
PG_DEADLINE_SQL = (
    "SELECT pg_advisory_xact_lock(2323)",
    """CREATE OR REPLACE FUNCTION sneakers23_deadline() RETURNS trigger AS $$
    BEGIN
      IF coalesce(current_setting('sneakers23.deadline', true), '') <> ''
         AND clock_timestamp() >
             current_setting('sneakers23.deadline')::timestamptz THEN
        RAISE EXCEPTION 'sneakers23: the deadline passed before COMMIT'
          USING ERRCODE = '57014';
      END IF;
      RETURN NULL;
    END $$ LANGUAGE plpgsql""",
    # A batch of purchases as one statement, run in autocommit: the rows
    # are locked, sold and committed by the server in one go. Statement
    # by statement (a lock, an insert and an update per item, each a
    # round trip to a node busy with its shoppers), a transaction held
    # its rows' locks for as long as its node took to send the next
    # statement, and three nodes queued behind each other (drop on 3
    # nodes: 996 purchases/s, p99 2.4 s; pg_stat_activity: most busy
    # backends waiting for a row lock). The same rules as
    # _place_item_orders: items in id order, purchases in their order, one
    # pair per shopper and product. A row per purchase: its place n (from
    # 1) and the order id, or NULL with count -1 (sold out) or -2 (already
    # purchased); a placed order has the item's new count and version.
    """CREATE OR REPLACE FUNCTION sneakers23_place(
        deadline text, node_name text, placed_at timestamp,
        item_ids int[], product_ids int[], shoppers text[])
      RETURNS TABLE (n int, order_id int, left_count int, new_version int)
    AS $$
    DECLARE
      the_item int; have int; sold int; new_id int; k int;
      done int[]; ids int[]; c int; v int;
    BEGIN
      PERFORM set_config('sneakers23.deadline', deadline, true);
      FOR the_item IN SELECT DISTINCT x FROM unnest(item_ids) x ORDER BY x
      LOOP
        SELECT a.count INTO have FROM availability a
          WHERE a.item_id = the_item FOR UPDATE;
        have := coalesce(have, 0);
        sold := 0; done := '{}'; ids := '{}';
        FOR k IN 1 .. cardinality(item_ids) LOOP
          CONTINUE WHEN item_ids[k] <> the_item;
          IF sold >= have THEN
            n := k; order_id := NULL; left_count := -1; new_version := NULL;
            RETURN NEXT;
            CONTINUE;
          END IF;
          new_id := NULL;
          INSERT INTO orders (item_id, product_id, shopper, node, created_at)
            VALUES (the_item, product_ids[k], shoppers[k], node_name,
                    placed_at)
            ON CONFLICT DO NOTHING RETURNING id INTO new_id;
          IF new_id IS NULL THEN
            n := k; order_id := NULL; left_count := -2; new_version := NULL;
            RETURN NEXT;
          ELSE
            sold := sold + 1; done := done || k; ids := ids || new_id;
          END IF;
        END LOOP;
        IF sold > 0 THEN
          UPDATE availability a SET count = a.count - sold,
                                    version = a.version + 1
            WHERE a.item_id = the_item RETURNING a.count, a.version
            INTO c, v;
          FOR k IN 1 .. sold LOOP
            n := done[k]; order_id := ids[k]; left_count := c;
            new_version := v;
            RETURN NEXT;
          END LOOP;
        END IF;
      END LOOP;
    END $$ LANGUAGE plpgsql""",
    )
# Created once: a trigger made again at every start would lock the hot
# table (ACCESS EXCLUSIVE) while a drop is selling.
PG_DEADLINE_TRIGGER = (
    """CREATE CONSTRAINT TRIGGER availability_deadline
    AFTER UPDATE ON availability DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION sneakers23_deadline()""")


def install_deadline_trigger():
    """On PostgreSQL, make a late COMMIT fail (see PG_DEADLINE_SQL)."""
    if isinstance(db.obj, SqliteDatabase):
        return
    with db.atomic():
        for sql in PG_DEADLINE_SQL:
            db.execute_sql(sql)
        exists = db.execute_sql(
            "SELECT 1 FROM pg_trigger WHERE tgname = 'availability_deadline'"
            " AND tgrelid = 'availability'::regclass").fetchone()
        if not exists:
            db.execute_sql(PG_DEADLINE_TRIGGER)


def set_commit_deadline(deadline):
    """The wall-clock moment after which this transaction may not commit
    (PostgreSQL; SQLite checks `deadline` itself before COMMIT)."""
    if isinstance(db.obj, SqliteDatabase):
        return
    db.execute_sql("SELECT set_config('sneakers23.deadline', %s, true)",
                   (wall_moment(deadline),))


def wall_moment(deadline):
    """A `time.monotonic()` moment as wall-clock ISO 8601 (UTC)."""
    left = deadline - time.monotonic()
    return (datetime.now(UTC) + timedelta(seconds=left)).isoformat()


def redact(url):
    """A database URL safe to show: without its password."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f':{parts.password}@', ':***@')
        return parts._replace(netloc=netloc).geturl()
    return url


db = DatabaseProxy()


def _first(rows):
    return rows[0] if rows else None


def _stand_in(n, value):
    """A value unlike any real one, of the type of `value`."""
    if isinstance(value, datetime):
        return datetime(1901, 1, 1) + timedelta(seconds=n)
    if isinstance(value, str):
        return f'\x00stand-in {n}\x00'
    return -10**15 - n


class Prepared:
    """A Peewee query compiled once (per database and argument types) and
    then run with other values, as a prepared statement would be.

    Peewee writes SQL in Python, some 0.1 ms a query: on the write path
    that was 40% of a node's CPU (cProfile, 1,000 writes/s). The query is
    built once from stand-in values, which show where each argument goes.
    """

    def __init__(self, build):
        self.build = build
        self._compiled = {}

    def rows(self, *args):
        """Run with `args`; every row returned, as tuples."""
        sql, slots = self._compile(args)
        params = [args[n] if n is not None else value for n, value in slots]
        return db.execute_sql(sql, params).fetchall()

    def _compile(self, args):
        # Keyed by the database object itself, not its id(): ids of
        # dead objects are reused (PostgreSQL once got SQLite's SQL).
        key = (db.obj, tuple(type(a) for a in args))
        if key not in self._compiled:
            stand_ins = [_stand_in(n, a) for n, a in enumerate(args)]
            sql, params = self.build(*stand_ins).sql()
            where = {(type(s), s): n for n, s in enumerate(stand_ins)}
            slots = [(where.get((type(p), p)), p) for p in params]
            if {n for n, _ in slots} - {None} != set(range(len(args))):
                raise ValueError(f'cannot prepare {sql}')
            self._compiled[key] = (sql, slots)
        return self._compiled[key]


class DatabaseRunner:
    """Runs a node's database work without stalling the gevent hub, and
    never past a deadline.

    PostgreSQL work runs in the calling greenlet, made cooperative by
    psycogreen, at most `PG_POOL_SIZE` at a time, under a gevent Timeout
    (psycopg2 closes a connection whose wait was interrupted). SQLite has
    no cooperative driver. Its writes run in one greenlet that owns the
    connection: transactions are short (group commit, prepared queries),
    and when another process holds the write lock the greenlet sleeps and
    retries instead of waiting inside SQLite, until the deadline. A native
    thread was tried for writes: every statement then waited for the GIL
    to come back from the busy hub (14 ms p50 writes at 1,000 writes/s,
    against 2 ms here). Whole-catalogue reads do go to a thread, with a
    connection of its own (WAL lets them run beside the writes).
    """

    def __init__(self, database):
        self.database = database
        self.is_sqlite = isinstance(database, SqliteDatabase)
        self._slots = gevent.lock.BoundedSemaphore(PG_POOL_SIZE)
        self.state = 'ok'   # or 'unavailable' after a failed call
        self.answered = time.monotonic()   # when a call last ended
        self.loops = [Loop('db-probe', self._probe, DB_PROBE_INTERVAL)]
        if self.is_sqlite:
            self._jobs = gevent.queue.Queue()
            self.loops.append(Loop('sqlite-writer', self._run_next_job))
            self._reader = gevent.threadpool.ThreadPool(1)

    def start(self):
        for loop in self.loops:
            loop.start()

    def run(self, fn, *args, deadline=None, then=None):
        """Call `fn(*args)` with a database connection; return its result
        (with `then`: `then(result)`, called as soon as `fn` is done, in
        the greenlet that ran it).

        Raises DeadlinePassed when it is not done by `deadline` (a
        `time.monotonic()` moment; default DB_DEADLINE from now).
        """
        deadline = deadline or time.monotonic() + DB_DEADLINE
        try:
            if self.is_sqlite:
                job = gevent.event.AsyncResult()
                self._jobs.put((fn, args, then, deadline, job))
                result, then = job.get(), None   # the writer applied it
            else:
                result = self._run_pooled(fn, args, deadline)
        except DB_AWAY:
            self.state, self.answered = 'unavailable', time.monotonic()
            raise
        self.state, self.answered = 'ok', time.monotonic()
        # PostgreSQL: `then` outside the deadline and the connection slot,
        # which are the database's alone.
        return result if then is None else then(result)

    def _probe(self):
        """Keep `state` true when nothing else asks the database (a node
        cut off from it says so, and says when it is back)."""
        if time.monotonic() - self.answered < DB_PROBE_INTERVAL:
            return
        try:
            self.run(_select_one,
                     deadline=time.monotonic() + DB_PROBE_INTERVAL * 2)
        except DB_AWAY:
            pass   # `state` says so

    def read(self, fn, *args):
        """Like `run`, for big reads (a whole catalogue): three times the
        deadline; on SQLite, off the hub's thread."""
        deadline = time.monotonic() + DB_DEADLINE * 3
        if not self.is_sqlite:
            return self.run(_long_statement, fn, args, deadline=deadline)
        with _deadline(deadline):
            return self._reader.apply(self._read_in_thread, (fn, args))

    def close(self):
        """Close the connections (and the SQLite reader thread)."""
        if not self.is_sqlite:
            return db.close_all()
        self.run(db.close)
        for loop in self.loops:
            loop.stop()
        self._reader.apply(db.close)
        self._reader.kill()

    def _run_pooled(self, fn, args, deadline):
        with _deadline(deadline):
            with self._slots, db.connection_context():
                return fn(*args)

    def _run_next_job(self):
        fn, args, then, deadline, result = self._jobs.get()
        try:
            value = self._retry_when_locked(fn, args, deadline)
            result.set(value if then is None else then(value))
        except Exception as e:  # the caller gets it
            result.set_exception(e)

    def _retry_when_locked(self, fn, args, deadline):
        while True:
            try:
                if db.is_closed():
                    db.connect()
                    db.execute_sql('PRAGMA busy_timeout = 0')
                return fn(*args)
            except OperationalError as e:
                if 'locked' not in str(e):
                    raise
                if time.monotonic() > deadline:
                    raise DeadlinePassed('the database stayed locked') \
                        from None
                gevent.sleep(SQLITE_LOCK_RETRY)

    def _read_in_thread(self, fn, args):
        if db.is_closed():
            db.connect()
        return fn(*args)


def _select_one():
    return db.execute_sql('SELECT 1').fetchone()


def _long_statement(fn, args):
    """`fn(*args)` in a transaction whose statements may take three times
    the PostgreSQL statement_timeout."""
    with db.atomic():
        db.execute_sql(f'SET LOCAL statement_timeout = '
                       f'{int(DB_DEADLINE * 3000)}')
        return fn(*args)


def _deadline(deadline):
    """A gevent Timeout raising DeadlinePassed at `deadline`."""
    return gevent.Timeout(max(0.0, deadline - time.monotonic()),
                          DeadlinePassed('the database did not answer in '
                                         'time'))


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

class BaseModel(Model):
    class Meta:
        database = db


class Product(BaseModel):
    sku = CharField(unique=True)
    brand = CharField()
    name = CharField()
    color = CharField()
    price_cents = IntegerField()
    image = CharField()
    position = IntegerField(index=True)
    released = BooleanField(default=False)
    release_at = DateTimeField(null=True)

    @classmethod
    def schedule(cls, product_id, at):
        """Set (or, with None, clear) the moment an unreleased product is
        released; True when it is still unreleased."""
        return bool(cls
                    .update(release_at=at)
                    .where((cls.id == product_id) & (cls.released == False))  # noqa: E712,E501
                    .execute())

    @classmethod
    def release(cls, product_id, at):
        """Mark a product released at `at`; True when it was not already."""
        return bool(cls
                    .update(released=True, release_at=at)
                    .where((cls.id == product_id) & (cls.released == False))  # noqa: E712,E501
                    .execute())

    @classmethod
    def release_as_scheduled(cls, product_id, at):
        """Release a product at its scheduled moment `at`, only if the
        database still has that moment (not cancelled or moved
        meanwhile); (released, release_at) as the database has them."""
        (cls.update(released=True)
         .where((cls.id == product_id) & (cls.released == False)  # noqa: E712,E501
                & (cls.release_at == at))
         .execute())
        return (cls
                .select(cls.released, cls.release_at)
                .where(cls.id == product_id)
                .tuples()
                .first())


class Item(BaseModel):
    product = ForeignKeyField(Product, backref='items', on_delete='CASCADE')
    sku = CharField(unique=True)
    size = CharField()

    class Meta:
        indexes = ((('product', 'size'), True),)


class Availability(BaseModel):
    item = ForeignKeyField(Item, unique=True, on_delete='CASCADE')
    count = IntegerField(constraints=[Check('count >= 0')])
    version = IntegerField(default=1)

    @classmethod
    def count_for_update(cls, item_id):
        """An item's count, locked until the transaction ends."""
        row = _first(cls._locked_count.rows(item_id))
        return row and row[0]

    @classmethod
    def take(cls, item_id, pairs):
        """Decrement an item's count by `pairs` if it has them."""
        row = _first(cls._take.rows(item_id, pairs))
        if row is None:
            raise IntegrityError(f'item {item_id} has fewer than {pairs}')
        return row

    @classmethod
    def add(cls, item_id, count):
        """Put `count` more pairs on an item: (count, version), or None
        when it has no such item or would hold more than MAX_STOCK."""
        return _first(cls._add.rows(item_id, count, MAX_STOCK))


class Order(BaseModel):
    item = ForeignKeyField(Item, on_delete='CASCADE')
    product = ForeignKeyField(Product, on_delete='CASCADE')
    shopper = CharField()
    node = CharField()
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'orders'
        indexes = ((('shopper', 'product'), True),)

    @classmethod
    def place_many(cls, purchases, node):
        """Insert order rows, skipping shoppers who have one for the
        product already: {shopper: order id} of the rows inserted."""
        placed, now, start = {}, utcnow(), 0
        while start < len(purchases):
            # Row counts in powers of two: few statements to prepare.
            size = 1 << ((len(purchases) - start).bit_length() - 1)
            values = [value for p in purchases[start:start + size]
                      for value in (p.item_id, p.product_id, p.shopper,
                                    node, now)]
            placed.update((shopper, order_id) for order_id, shopper
                          in cls._insert_rows.rows(*values))
            start += size
        return placed


def _locked_count(item_id):
    query = (Availability
             .select(Availability.count)
             .where(Availability.item == item_id))
    if db.for_update:  # SQLite has none: BEGIN IMMEDIATE locks already
        query = query.for_update()
    return query


Availability._locked_count = Prepared(_locked_count)
Availability._take = Prepared(lambda item_id, pairs: (
    Availability
    .update(count=Availability.count - pairs,
            version=Availability.version + 1)
    .where((Availability.item == item_id) & (Availability.count >= pairs))
    .returning(Availability.count, Availability.version)))
Availability._add = Prepared(lambda item_id, pairs, most: (
    Availability
    .update(count=Availability.count + pairs,
            version=Availability.version + 1)
    .where((Availability.item == item_id)
           & (Availability.count + pairs <= most))
    .returning(Availability.count, Availability.version)))
ORDER_COLUMNS = ('item', 'product', 'shopper', 'node', 'created_at')
Order._insert_rows = Prepared(lambda *values: (
    Order
    .insert_many([dict(zip(ORDER_COLUMNS, values[n:n + 5], strict=True))
                  for n in range(0, len(values), 5)])
    .on_conflict_ignore()
    .returning(Order.id, Order.shopper)))


class Setting(BaseModel):
    """Store-wide values every node shares, such as the cookie key."""

    key = CharField(primary_key=True)
    value = CharField()

    @classmethod
    def put(cls, key, value):
        """Store `value` under `key`, replacing what was there."""
        (cls.insert(key=key, value=value)
         .on_conflict(conflict_target=[cls.key], update={cls.value: value})
         .execute())

    @classmethod
    def read(cls, key, default=None):
        row = cls.get_or_none(cls.key == key)
        return default if row is None else row.value

    @classmethod
    def get_or_make(cls, key, make):
        """The value under `key`, stored first from `make()` if missing."""
        cls.insert(key=key, value=make()).on_conflict_ignore().execute()
        return cls.get_by_id(key).value


# -- draws: the published rule, then the rows ---------------------------------

def commitment_of(seed):
    """The commitment published when a draw opens: hex SHA-256 of the
    seed's bytes."""
    return hashlib.sha256(bytes.fromhex(seed)).hexdigest()


def entries_digest(entries):
    """Hex SHA-256 of every (entry_id, item_id), as compact JSON sorted by
    entry id: binds each entry's rank to the whole list."""
    rows = sorted([int(entry_id), int(item_id)]
                  for entry_id, item_id in entries)
    return hashlib.sha256(
        json.dumps(rows, separators=(',', ':')).encode()).hexdigest()


def entry_rank(seed, digest, entry_id):
    """An entry's rank in its size: hex HMAC-SHA256 keyed by the seed."""
    return hmac.new(bytes.fromhex(seed), f'{digest}:{entry_id}'.encode(),
                    hashlib.sha256).hexdigest()


def draw_winners(seed, entries, pairs):
    """The winning entry ids, sorted: per item, its entries of smallest
    rank (ties, never seen, by entry id), as many as its `pairs`."""
    digest = entries_digest(entries)
    ranked = defaultdict(list)
    for entry_id, item_id in entries:
        ranked[int(item_id)].append(
            (entry_rank(seed, digest, entry_id), int(entry_id)))
    winners = []
    for item_id, ranks in ranked.items():
        winners += [e for _, e in sorted(ranks)[:pairs.get(item_id, 0)]]
    return sorted(winners)


class Draw(BaseModel):
    """A product sold by a draw: its window, its secret seed, and which
    node runs it (a claim that expires, so another node takes over)."""

    product = ForeignKeyField(Product, primary_key=True, on_delete='CASCADE')
    opens_at = DateTimeField()
    closes_at = DateTimeField()
    seed = CharField()          # hex; published only once drawn
    commitment = CharField()    # commitment_of(seed), published at once
    state = CharField(default='scheduled')   # scheduled, open, drawn
    pairs = TextField(null=True)     # {"ITEM_ID": pairs}, fixed at opening
    winners = TextField(null=True)   # [entry_id, ...] once drawn
    claimed_by = CharField(null=True)
    claim_until = DateTimeField(null=True)
    claims = IntegerField(default=0)
    version = IntegerField(default=1)


class Entry(BaseModel):
    """One shopper's entry in a draw: one per shopper per product."""

    product = ForeignKeyField(Product, on_delete='CASCADE')
    item = ForeignKeyField(Item, on_delete='CASCADE')
    shopper = CharField()
    node = CharField()
    created_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((('product', 'shopper'), True),)


DRAW_COLUMNS = (Draw.product, Draw.opens_at, Draw.closes_at,
                Draw.commitment, Draw.state, Draw.pairs, Draw.winners,
                Draw.version)


def define_draw(product_id, opens_at, closes_at, seed, now):
    """Make an unreleased product a draw (open at once when `opens_at`
    has come); True, or False when it is released or has a draw."""
    product = Product.get_or_none(Product.id == product_id)
    if product is None or product.released or (
            Draw.select().where(Draw.product == product_id).exists()):
        return False
    Product.schedule(product_id, None)   # a draw replaces a schedule
    Draw.insert(product=product_id, opens_at=opens_at, closes_at=closes_at,
                seed=seed, commitment=commitment_of(seed)).execute()
    if opens_at <= now:
        open_draw(product_id)
    return True


def open_draw(product_id):
    """Open a scheduled draw, fixing its pairs per size now; True if
    this call opened it (every node tries, one wins)."""
    pairs = dict(Availability
                 .select(Availability.item, Availability.count)
                 .join(Item)
                 .where(Item.product == product_id)
                 .tuples())
    return bool(Draw
                .update(state='open', version=Draw.version + 1,
                        pairs=json.dumps({str(k): v
                                          for k, v in pairs.items()}))
                .where((Draw.product == product_id)
                       & (Draw.state == 'scheduled'))
                .execute())


def _draw_is_open(product_id, now):
    """Whether the draw takes entries now, read under a shared lock that
    the drawing transaction's exclusive one waits for (PostgreSQL;
    SQLite's BEGIN IMMEDIATE serialises writers already)."""
    query = (Draw
             .select(Draw.product)
             .where((Draw.product == product_id) & (Draw.state == 'open')
                    & (Draw.closes_at > now)))
    if db.for_update:
        query = query.for_update('FOR SHARE')
    return query.exists()


def entry_counts(product_id):
    """{item_id: entries} of one draw."""
    return dict(Entry
                .select(Entry.item, peewee.fn.COUNT(Entry.id))
                .where(Entry.product == product_id)
                .group_by(Entry.item)
                .tuples())


def enter_draw(product_id, item_id, shopper, node, now):
    """Make or change a shopper's one entry: (entry_id, counts), or
    DRAW_CLOSED outside the window."""
    if not _draw_is_open(product_id, now):
        return DRAW_CLOSED
    rows = list(Entry
                .insert(product=product_id, item=item_id, shopper=shopper,
                        node=node, created_at=now)
                .on_conflict(conflict_target=[Entry.product, Entry.shopper],
                             update={Entry.item: item_id})
                .returning(Entry.id)
                .tuples()
                .execute())
    return rows[0][0], entry_counts(product_id)


def withdraw_entry(product_id, shopper, now):
    """Delete a shopper's entry: the counts, DRAW_CLOSED outside the
    window, or NO_ENTRY when they have none."""
    if not _draw_is_open(product_id, now):
        return DRAW_CLOSED
    deleted = (Entry
               .delete()
               .where((Entry.product == product_id)
                      & (Entry.shopper == shopper))
               .execute())
    return entry_counts(product_id) if deleted else NO_ENTRY


def claim_draw(product_id, node, now, ttl):
    """Claim a closed draw for `node` for `ttl` seconds, unless another
    node's claim is still live: the number of claims so far, or 0."""
    rows = list(Draw
                .update(claimed_by=node, claims=Draw.claims + 1,
                        claim_until=now + timedelta(seconds=ttl))
                .where((Draw.product == product_id)
                       & (Draw.state == 'open') & (Draw.closes_at <= now)
                       & (Draw.claim_until.is_null()
                          | (Draw.claim_until < now)))
                .returning(Draw.claims)
                .tuples()
                .execute())
    return rows[0][0] if rows else 0


class DrawWinner(NamedTuple):
    item_id: int
    product_id: int
    shopper: str


def run_draw(product_id, node, deadline, hold=None):
    """The whole draw in one transaction, by the node holding the claim:
    winners' orders, stock, winners published, state drawn. Returns
    ({item_id: (count, version)}, draw_rows(product_id)), or None when
    the claim went to another node meanwhile. `hold()` (tests only)
    runs just before COMMIT."""
    with db.atomic():
        set_commit_deadline(deadline)
        draw = _claimed_draw(product_id, node)
        if draw is None:
            return None
        stock, winners = _place_winners(product_id, draw, node)
        (Draw.update(state='drawn', version=Draw.version + 1,
                     winners=json.dumps(winners))
         .where(Draw.product == product_id)
         .execute())
        if hold:
            hold()
        if time.monotonic() > deadline:
            raise DeadlinePassed('the draw missed its deadline')
        return stock, draw_rows(product_id)


def _claimed_draw(product_id, node):
    """The open draw this node holds the claim of, locked; or None."""
    query = (Draw
             .select(Draw.seed, Draw.pairs)
             .where((Draw.product == product_id) & (Draw.state == 'open')
                    & (Draw.claimed_by == node)))
    if db.for_update:
        query = query.for_update()
    return query.first()


def _place_winners(product_id, draw, node):
    """Rank every entry, give each winner an order and take its pair:
    ({item_id: (count, version)}, the winning entry ids)."""
    entries = list(Entry
                   .select(Entry.id, Entry.item, Entry.shopper)
                   .where(Entry.product == product_id)
                   .order_by(Entry.id)
                   .tuples())
    pairs = {int(k): v for k, v in json.loads(draw.pairs).items()}
    winners = draw_winners(draw.seed, [(e, i) for e, i, _ in entries],
                           pairs)
    chosen = set(winners)
    won = [DrawWinner(item, product_id, shopper)
           for entry_id, item, shopper in entries if entry_id in chosen]
    if won:
        Order.place_many(won, node)
    stock = {item_id: Availability.take(item_id, n) for item_id, n
             in sorted(Counter(w.item_id for w in won).items())}
    return stock, winners


def draw_rows(product_id=None):
    """Draws as (row, counts): one product's, or every one. Counts are
    read for draws not drawn yet (and the one asked for)."""
    query = Draw.select(*DRAW_COLUMNS).tuples()
    if product_id is not None:
        query = query.where(Draw.product == product_id)
    rows = list(query)
    return [(row, entry_counts(row[0])
             if row[4] != 'drawn' or product_id is not None else None)
            for row in rows]


def drawn_entries(product_id):
    """Every entry of a draw as (entry_id, item_id), by entry id."""
    return list(Entry
                .select(Entry.id, Entry.item)
                .where(Entry.product == product_id)
                .order_by(Entry.id)
                .tuples())


def draw_secret(product_id):
    """The seed of a drawn draw (None before)."""
    return (Draw
            .select(Draw.seed)
            .where((Draw.product == product_id) & (Draw.state == 'drawn'))
            .scalar())


def shopper_entries(shopper):
    """Every entry of one shopper: (entry_id, product_id, item_id, size)."""
    return list(Entry
                .select(Entry.id, Entry.product, Entry.item, Item.size)
                .join(Item)
                .where(Entry.shopper == shopper)
                .order_by(Entry.id)
                .tuples())


MODELS = (Product, Item, Availability, Order, Setting, Draw, Entry)


def catalog_rows():
    """Every product (in display order) with its items' rows.

    An item row is (id, product_id, sku, size, count, version): plain
    tuples, so that a catalogue of 130,000 items loads in a blink.
    """
    items = (Item
             .select(Item.id, Item.product, Item.sku, Item.size,
                     Availability.count, Availability.version)
             .join(Availability)
             .order_by(Item.product, Item.id)
             .tuples())
    by_product = {}
    for row in items:
        by_product.setdefault(row[1], []).append(row)
    products = (Product
                .select()
                .order_by(Product.position, Product.id)
                .namedtuples())
    return [(p, by_product.get(p.id, [])) for p in products]


def stock_rows():
    """(item_id, count, version) of every item."""
    return list(Availability
                .select(Availability.item, Availability.count,
                        Availability.version)
                .tuples())


def release_rows():
    """(product_id, released, release_at) of every product."""
    return list(Product
                .select(Product.id, Product.released, Product.release_at)
                .tuples())


def order_counts(since):
    """{product_id: (orders, orders since `since`)}."""
    recent = peewee.Case(None, [(Order.created_at >= since, 1)], 0)
    return {product_id: (count, int(latest or 0)) for product_id, count,
            latest in (Order
                       .select(Order.product, peewee.fn.COUNT(Order.id),
                               peewee.fn.SUM(recent))
                       .group_by(Order.product)
                       .tuples())}


def recent_sales(since):
    """(product_id, created_at) of every order since `since`."""
    return list(Order
                .select(Order.product, Order.created_at)
                .where(Order.created_at >= since)
                .tuples())


def product_orders(product_id):
    """Every order of one product, oldest first:
    (order_id, item_id, size, node, created_at)."""
    return list(Order
                .select(Order.id, Order.item, Item.size, Order.node,
                        Order.created_at)
                .join(Item)
                .where(Order.product == product_id)
                .order_by(Order.created_at, Order.id)
                .tuples())


def shopper_orders(shopper):
    """Every order of one shopper, oldest first:
    (order_id, product_id, item_id, size, created_at)."""
    return list(Order
                .select(Order.id, Order.product, Order.item, Item.size,
                        Order.created_at)
                .join(Item)
                .where(Order.shopper == shopper)
                .order_by(Order.created_at, Order.id)
                .tuples())


def sales_paused():
    """(whether sales are paused, the version of that setting): a reload
    that read an older version must not undo a newer pause or resume."""
    paused, _, version = Setting.read('paused', '0:0').partition(':')
    return paused == '1', int(version or 0)


def set_sales_paused(paused):
    """Pause or resume sales; the setting's new version."""
    _, version = sales_paused()
    Setting.put('paused', f'{int(paused)}:{version + 1}')
    return version + 1


def create_tables():
    """Create every table that is missing."""
    db.create_tables(MODELS, safe=True)


CATALOG_FIELDS = {'sku': str, 'brand': str, 'name': str, 'color': str,
                  'price_cents': int, 'image': str}


def read_catalog(path):
    """The products of a catalogue TOML, checked; ConfigError if wrong."""
    try:
        with open(path, 'rb') as f:
            entries = tomllib.load(f).get('products')
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f'cannot read the catalogue {path}: {e}') from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{path} has no [[products]]')
    for n, entry in enumerate(entries, 1):
        problem = _catalog_problem(entry)
        if problem:
            raise ConfigError(f'{path}: product {n}: {problem}')
    return entries


def _catalog_problem(entry):
    """What is wrong with one catalogue entry, or None."""
    for name, kind in CATALOG_FIELDS.items():
        if type(entry.get(name)) is not kind:
            return f'{name} must be {"an integer" if kind is int else "text"}'
    stock = entry.get('stock', {})
    if not isinstance(stock, dict) or set(stock) - set(SIZES):
        return f'stock must map sizes {SIZES[0]}..{SIZES[-1]} to counts'
    if any(type(n) is not int or n < 0 for n in stock.values()):
        return 'stock counts must be integers >= 0'
    return None


def seed(catalog_path, reset=False):
    """Fill the database from the catalogue; returns products written."""
    entries = read_catalog(catalog_path)
    with db.atomic():
        if reset:
            db.drop_tables(MODELS, safe=True)
        create_tables()
        if Product.select().exists():
            return 0
        for position, entry in enumerate(entries):
            _seed_product(position, entry)
    return len(entries)


def _seed_product(position, entry):
    """Write one catalogue entry: the product, its items, their stock."""
    stock = entry.get('stock', {})
    product = Product.create(
        sku=entry['sku'], brand=entry['brand'], name=entry['name'],
        color=entry['color'], price_cents=entry['price_cents'],
        image=entry['image'], position=position,
        released=entry.get('released', False))
    items = (Item
             .insert_many([{'product': product, 'size': size,
                            'sku': f"{entry['sku']}-{size}"}
                           for size in SIZES])
             .returning(Item.id, Item.size)
             .tuples()
             .execute())
    (Availability
     .insert_many([{'item': item_id, 'count': int(stock.get(size, 0))}
                   for item_id, size in items])
     .execute())


# ---------------------------------------------------------------------------
# Inventory: the node's in-memory store
# ---------------------------------------------------------------------------

class ItemState:
    """One size of one product as this node knows it."""

    __slots__ = ('id', 'product_id', 'sku', 'size', 'count', 'version')

    def __init__(self, id, product_id, sku, size, count, version):
        self.id, self.product_id, self.sku = id, product_id, sku
        self.size, self.count, self.version = size, count, version

    @property
    def level(self):
        return level_of(self.count)

    def as_json(self):
        return {'id': self.id, 'sku': self.sku, 'size': self.size,
                'count': self.count, 'level': self.level}


class DrawState:
    """A product's draw as this node knows it (never its seed)."""

    __slots__ = ('product_id', 'opens_at', 'closes_at', 'commitment',
                 'state', 'pairs', 'winners', 'version', 'entries')

    def __init__(self, row, entries=None):
        (self.product_id, self.opens_at, self.closes_at, self.commitment,
         self.state, pairs, winners, self.version) = row
        self.pairs = {int(k): v for k, v in json.loads(pairs).items()} \
            if pairs else {}
        self.winners = json.loads(winners) if winners else []
        self.entries = dict(entries or {})

    def takes_entries(self, now):
        return self.state == 'open' and now < self.closes_at

    def as_json(self):
        """The draw's public part, as `/api/products` and events show it."""
        return {'state': self.state, 'opens_at': iso_moment(self.opens_at),
                'closes_at': iso_moment(self.closes_at),
                'commitment': self.commitment,
                'pairs': {str(k): v for k, v in self.pairs.items()},
                'entries': self.counts()}

    def counts(self):
        """Entries per size, every size of the draw shown (0 included)."""
        return {str(item_id): self.entries.get(item_id, 0)
                for item_id in self.pairs}


DRAW_STATES = {'scheduled': 'scheduled', 'open': 'draw_open',
               'drawn': 'drawn'}


class ProductState:
    """A product as this node knows it, with its items in size order."""

    __slots__ = ('id', 'sku', 'brand', 'name', 'color', 'price_cents',
                 'image', 'position', 'released', 'release_at', 'items',
                 'json', 'draw')

    def __init__(self, row, items, draw=None):
        for name in self.__slots__[:-3]:
            setattr(self, name, getattr(row, name))
        self.items = items
        self.json = None
        self.draw = draw

    @property
    def state(self):
        """`released`, `scheduled`, `coming_soon`, `draw_open` or
        `drawn` (a draw not open yet is `scheduled`)."""
        if self.draw is not None:
            return DRAW_STATES[self.draw.state]
        if self.released:
            return 'released'
        return 'scheduled' if self.release_at else 'coming_soon'

    @property
    def moment(self):
        """`release_at` as shoppers see it: a draw's opening."""
        return self.draw.opens_at if self.draw else self.release_at

    def as_json(self):
        return {'id': self.id, 'sku': self.sku, 'brand': self.brand,
                'name': self.name, 'color': self.color,
                'price_cents': self.price_cents, 'image': self.image,
                'released': self.released, 'state': self.state,
                'release_at': iso_moment(self.moment),
                'items': [item.as_json() for item in self.items],
                **({'draw': self.draw.as_json()} if self.draw else {})}

    def json_bytes(self):
        """This product's `/api/products` entry, encoded once per change."""
        if self.json is None:
            self.json = json.dumps(self.as_json(),
                                   separators=(',', ':')).encode()
        return self.json


class Inventory:
    """Every product and item of the store, held in memory.

    Readers use it without touching the database. Writers change the
    database first and then call `item_changed` / `product_released`,
    which also tell the listeners (the event hub, replication).
    """

    def __init__(self):
        self.products, self.items = {}, {}
        self.revision = 0
        self.paused = False   # the kill switch: no sales anywhere
        self.sales_version = 0
        self._listeners = []

    def load(self, rows):
        """Replace everything with `catalog_rows()` output."""
        products, items = {}, {}
        for row, item_rows in rows:
            states = [ItemState(*item) for item in item_rows]
            known = self.products.get(row.id)
            products[row.id] = ProductState(row, states,
                                            known and known.draw)
            items.update((s.id, s) for s in states)
        self.products, self.items = products, items
        self.revision += 1

    def listen(self, callback):
        """Call `callback(kind, product, item, old_level, local)`."""
        self._listeners.append(callback)

    def ordered(self):
        """Products in display order."""
        return sorted(self.products.values(),
                      key=lambda p: (p.position, p.id))

    def item_changed(self, item_id, count, version, local=True):
        """Apply a new count when `version` is newer; True if applied."""
        item = self.items.get(item_id)
        if item is None or version <= item.version:
            return False
        old_level = item.level
        item.count, item.version = count, version
        product = self.products[item.product_id]
        self._touch(product)
        self._tell('availability', product, item, old_level, local)
        return True

    def product_released(self, product_id, at, local=True):
        """Mark a product released at `at`; True if it was not already."""
        product = self.products.get(product_id)
        if product is None or product.released:
            return False
        product.released, product.release_at = True, at
        self._touch(product)
        self._tell('released', product, None, None, local)
        return True

    def product_scheduled(self, product_id, at, local=True):
        """Set the moment an unreleased product is released (None: not
        scheduled); True if that changed anything."""
        product = self.products.get(product_id)
        if product is None or product.released or product.release_at == at:
            return False
        product.release_at = at
        self._touch(product)
        self._tell('scheduled', product, None, None, local)
        return True

    def draw_changed(self, draw, local=True):
        """Set a product's draw when it is new or newer; True if so."""
        product = self.products.get(draw.product_id)
        if product is None or (product.draw is not None
                               and product.draw.version >= draw.version):
            return False
        if product.draw is not None and not draw.entries:
            draw.entries = product.draw.entries
        product.draw = draw
        self._touch(product)
        self._tell('draw', product, None, None, local)
        return True

    def draw_entries_changed(self, product_id, entries):
        """Set a draw's entries per size; True if they changed."""
        product = self.products.get(product_id)
        if product is None or product.draw is None or (
                product.draw.entries == entries):
            return False
        product.draw.entries = dict(entries)
        self._touch(product)
        self._tell('draw_entries', product, None, None, True)
        return True

    def sales_changed(self, paused, version, local=True):
        """Pause or resume every sale when `version` is newer; True if
        that changed anything."""
        if version <= self.sales_version:
            return False
        self.sales_version = version
        if self.paused == paused:
            return False
        self.paused = paused
        self.revision += 1
        self._tell('sales', None, None, None, local)
        return True

    def released_stock(self):
        """Pairs left across every released product."""
        return sum(item.count for p in self.products.values()
                   if p.released for item in p.items)

    def _touch(self, product):
        product.json = None
        self.revision += 1

    def _tell(self, kind, product, item, old_level, local):
        for callback in self._listeners:
            try:
                callback(kind, product, item, old_level, local)
            except Exception:
                logger.exception('inventory listener %r failed', callback)


# ---------------------------------------------------------------------------
# Write path: purchases, releases, restocks in group commits
# ---------------------------------------------------------------------------

def _deadline_from_now():
    return time.monotonic() + DB_DEADLINE


@dataclass(eq=False)
class Job:
    """A write waiting for the next batch: its result, its deadline."""

    result: gevent.event.AsyncResult = field(
        default_factory=gevent.event.AsyncResult, kw_only=True)
    deadline: float = field(default_factory=_deadline_from_now,
                            kw_only=True)
    taken: bool = field(default=False, kw_only=True)
    abandoned: bool = field(default=False, kw_only=True)
    commit_sent: bool = field(default=False, kw_only=True)


@dataclass(eq=False)
class Purchase(Job):
    """One shopper's request for one item, on its way to the database."""

    item_id: int
    product_id: int
    shopper: str


@dataclass(eq=False)
class Write(Job):
    """Any other write (a release, a restock) riding the next batch."""

    fn: object
    args: tuple
    # Applied to the result in the batch's answer, before the requester
    # wakes: a release's or restock's change to memory (see _write).
    then: object = None


@dataclass
class Placed:
    order_id: int
    count: int
    version: int


SOLD_OUT, ALREADY_PURCHASED = 'sold_out', 'already_purchased'


def commit_batch(purchases, writes, node, deadline):
    """Everything that arrived together, in one transaction (group commit),
    committed only before `deadline` (else DeadlinePassed, nothing kept).

    Returns (what each write returned or raised, each purchase's outcome).
    """
    with db.atomic():
        set_commit_deadline(deadline)
        done = [_in_savepoint(w.fn, *w.args) for w in writes]
        outcomes = place_orders(purchases, node) if purchases else []
        if time.monotonic() > deadline:
            raise DeadlinePassed('the batch missed its deadline')
        for job in (*purchases, *writes):
            job.commit_sent = True   # from here, no answer = unknown
        return done, outcomes


PLACE_SQL = ('SELECT n, order_id, left_count, new_version FROM '
             'sneakers23_place(%s, %s, %s, %s::int[], %s::int[], %s::text[])')


def place_orders_at_once(purchases, node, deadline):
    """PostgreSQL: a batch of purchases as one statement in autocommit
    (sneakers23_place, see PG_DEADLINE_SQL), committed by the server
    before it answers, unless `deadline` has passed. One outcome each,
    in their order, as place_orders gives them."""
    if time.monotonic() > deadline:
        raise DeadlinePassed('the batch missed its deadline')
    args = (wall_moment(deadline), node, utcnow(),
            [p.item_id for p in purchases],
            [p.product_id for p in purchases],
            [p.shopper for p in purchases])
    if db.in_transaction():   # Peewee's connections are in autocommit
        raise RuntimeError('place_orders_at_once runs outside transactions')
    for job in purchases:
        job.commit_sent = True   # the statement is its own COMMIT
    rows = db.execute_sql(PLACE_SQL, args).fetchall()
    outcomes = [SOLD_OUT] * len(purchases)
    for n, order_id, count, version in rows:
        outcomes[n - 1] = (Placed(order_id, count, version)
                           if order_id is not None else
                           SOLD_OUT if count == -1 else ALREADY_PURCHASED)
    return outcomes


def _in_savepoint(fn, *args):
    """`fn(*args)`, or the database error it raised (rolled back alone).

    A plain SAVEPOINT: Peewee's names each one with a fresh UUID and
    wraps it in context objects, a sixth of a small batch's CPU. Savepoints
    of the same name nest; the innermost is the one released.
    """
    db.execute_sql('SAVEPOINT sneakers23_write')
    try:
        result = fn(*args)
    except DatabaseError as e:
        db.execute_sql('ROLLBACK TO SAVEPOINT sneakers23_write')
        db.execute_sql('RELEASE SAVEPOINT sneakers23_write')
        return e
    db.execute_sql('RELEASE SAVEPOINT sneakers23_write')
    return result


def place_orders(purchases, node):
    """Place a batch of purchases; one outcome each, in their order.

    Items are locked in id order so that concurrent batches (other
    connections, other nodes) never deadlock.
    """
    by_item = {}
    for p in purchases:
        by_item.setdefault(p.item_id, []).append(p)
    outcomes = {}
    # In a batch's transaction already: a savepoint would add nothing
    # (a failure here fails the whole batch) but two statements.
    with contextlib.nullcontext() if db.in_transaction() else db.atomic():
        for item_id in sorted(by_item):
            outcomes.update(_place_item_orders(item_id, by_item[item_id],
                                               node))
    return [outcomes[id(p)] for p in purchases]


def _place_item_orders(item_id, group, node):
    """All purchases of one item: three statements, however many buyers.

    Lock the count, insert the order rows (a shopper who already has a
    pair of this product gets none), then one conditional decrement.
    """
    left = Availability.count_for_update(item_id) or 0
    outcomes, placed, waiting = {}, [], list(group)
    while waiting and len(placed) < left:
        take, waiting = (waiting[:left - len(placed)],
                         waiting[left - len(placed):])
        fresh = _first_per_shopper(take, outcomes)
        order_ids = Order.place_many(fresh, node)
        for p in fresh:
            if p.shopper in order_ids:
                placed.append((p, order_ids[p.shopper]))
            else:
                outcomes[id(p)] = ALREADY_PURCHASED
    for p in waiting:
        outcomes[id(p)] = SOLD_OUT
    if placed:
        count, version = Availability.take(item_id, len(placed))
        for p, order_id in placed:
            outcomes[id(p)] = Placed(order_id, count, version)
    return outcomes


def _first_per_shopper(purchases, outcomes):
    """Drop a shopper's second purchase in the same batch."""
    seen, fresh = set(), []
    for p in purchases:
        if p.shopper in seen:
            outcomes[id(p)] = ALREADY_PURCHASED
        else:
            seen.add(p.shopper)
            fresh.append(p)
    return fresh


def _batch_failure(error, job, in_process):
    """What a failed batch tells one of its jobs: OutcomeUnknown when its
    COMMIT went out to a server and no answer came back (a timeout, a lost
    connection), else Unavailable: nothing was committed. (SQLite commits
    in this process: its answer cannot be lost.)"""
    if job.commit_sent and not in_process and not _server_answered(error):
        return OutcomeUnknown(f'COMMIT sent, then: {error}')
    return error if isinstance(error, Unavailable) else Unavailable(
        str(error))


def _server_answered(error):
    """Whether PostgreSQL itself answered with this error (it has an
    SQLSTATE): the transaction was then surely rolled back."""
    while error is not None:
        if getattr(error, 'pgcode', None):
            return True
        error = error.__cause__ or error.__context__
    return False


class WritePath:
    """The node's write path: database first, then memory.

    Purchases, releases and restocks queue here and are committed in
    batches (group commit): everything that arrived while the previous
    batch was in the database goes into the next transaction.
    """

    def __init__(self, runner, inventory, node):
        self.runner, self.inventory, self.node = runner, inventory, node
        self._queue = gevent.queue.Queue()
        workers = 1 if runner.is_sqlite else PG_POOL_SIZE
        self.loops = [Loop(f'commit-{n}', self._commit_next)
                      for n in range(1, workers + 1)]
        self.committed = lambda size, seconds: None   # see Metrics

    def start(self):
        self.runner.start()
        for loop in self.loops:
            loop.start()

    def load(self):
        """(Re)load the whole inventory from the database."""
        rows, paused = self.runner.read(
            lambda: (catalog_rows(), sales_paused()))
        self.inventory.load(rows)
        self.inventory.paused, self.inventory.sales_version = paused

    def refresh(self):
        """Bring memory up to the database (changes made anywhere)."""
        stock, releases, paused = self.runner.read(
            lambda: (stock_rows(), release_rows(), sales_paused()))
        self.inventory.sales_changed(*paused, local=False)
        for product_id, released, at in releases:
            if released:
                self.inventory.product_released(product_id, at, local=False)
            else:
                self.inventory.product_scheduled(product_id, at, local=False)
        for item_id, count, version in stock:
            self.inventory.item_changed(item_id, count, version, local=False)

    def buy(self, item, shopper):
        """Place one order; returns Placed, SOLD_OUT or ALREADY_PURCHASED.

        Raises Unavailable when the database did not commit it by the
        deadline; it is then never committed later.
        """
        return self._submit(Purchase(item.id, item.product_id, shopper))

    def release(self, product_id, at=None):
        """Release a product (at its scheduled moment `at`, else now);
        True if this node marked it released.

        Every node releases a scheduled product by itself at its moment:
        the database's conditional write lets the first one in, and the
        others mark memory as released all the same.
        """
        if self.inventory.products[product_id].released:
            return False  # memory follows the database: nothing to write
        if at is None:
            at = utcnow()
            return self._write(
                Product.release, product_id, at,
                then=lambda _: self.inventory.product_released(product_id,
                                                               at))
        return self._write(Product.release_as_scheduled, product_id, at,
                           then=lambda row: self._mark_released(product_id,
                                                                *row))

    def _mark_released(self, product_id, released, stored):
        if not released:  # cancelled or moved meanwhile: memory was stale
            self.inventory.product_scheduled(product_id, stored, local=False)
            return False
        return self.inventory.product_released(product_id, stored)

    def schedule(self, product_id, at):
        """Release a product at `at` (None: cancel); False when it was
        released meanwhile."""
        if not self._write(Product.schedule, product_id, at):
            return False
        self.inventory.product_scheduled(product_id, at)
        return True

    def pause_sales(self, paused):
        """The kill switch: stop (or restart) every sale of the store."""
        version = self._write(set_sales_paused, paused)
        self.inventory.sales_changed(paused, version)

    def restock(self, item_id, count):
        """Add pairs to an item; its new count, or None if it has none."""
        def changed(row):
            if row is not None:
                self.inventory.item_changed(item_id, *row)
            return row and row[0]

        return self._write(Availability.add, item_id, count, then=changed)

    def write(self, fn, *args):
        """Run `fn(*args)` in the next batch's transaction (a draw's
        entries and claims); its result."""
        return self._write(fn, *args)

    def stop(self):
        """Stop taking purchases and close the database."""
        for loop in self.loops:
            loop.stop()
        self.runner.close()

    def _write(self, fn, *args, then=None):
        """Run `fn(*args)` in the next batch's transaction; its result,
        or with `then`: `then(result)`, called as soon as it is committed
        (before the requester's turn: see _commit_jobs)."""
        return self._submit(Write(fn, args, then=then))

    def _submit(self, job):
        """Queue a job; its result, or Unavailable after its deadline.

        On PostgreSQL a late COMMIT fails by itself (the deadline
        trigger). SQLite commits in this process and checks the deadline
        just before COMMIT: a job already in a transaction is waited for,
        so that its answer is always the truth.
        """
        self._queue.put(job)
        left = job.deadline + DB_DEADLINE_MARGIN - time.monotonic()
        try:
            return job.result.get(timeout=left)
        except gevent.Timeout:
            if job.taken and self.runner.is_sqlite:
                return job.result.get()
            job.abandoned = True
            if job.commit_sent:
                raise OutcomeUnknown('COMMIT sent, no answer by the '
                                     'deadline') from None
            raise DeadlinePassed('no answer from the database') from None

    def _commit_next(self):
        """Take what is queued (up to MAX_BATCH) and commit it together."""
        batch = self._live([self._queue.get()])
        while len(batch) < MAX_BATCH and not self._queue.empty():
            batch += self._live([self._queue.get_nowait()])
        if not batch:
            return
        try:
            self._commit(batch)
        except Exception as e:
            if not isinstance(e, DB_AWAY):
                logger.exception('a batch of %d writes failed', len(batch))
            for job in batch:
                if not job.result.ready():
                    job.result.set_exception(_batch_failure(
                        e, job, in_process=self.runner.is_sqlite))

    @staticmethod
    def _live(jobs):
        """The jobs whose requester still waits; they are taken now."""
        now, live = time.monotonic(), []
        for job in jobs:
            if job.abandoned or now > job.deadline:
                job.result.set_exception(DeadlinePassed('too late'))
            else:
                job.taken = True
                live.append(job)
        return live

    def _commit(self, batch):
        """SQLite: the batch in one transaction. PostgreSQL: its other
        writes in one, then its purchases in one statement of their own
        (place_orders_at_once), which holds the items' locks for no
        round trip to this node."""
        purchases = [job for job in batch if isinstance(job, Purchase)]
        writes = [job for job in batch if isinstance(job, Write)]
        if self.runner.is_sqlite or not purchases:
            return self._commit_jobs(commit_batch, purchases, writes)
        if writes:
            self._commit_jobs(commit_batch, [], writes)
        self._commit_jobs(self._place_at_once, purchases, [])

    @staticmethod
    def _place_at_once(purchases, writes, node, deadline):
        return [], place_orders_at_once(purchases, node, deadline)

    def _commit_jobs(self, fn, purchases, writes):
        batch = purchases + writes
        deadline = min(job.deadline for job in batch)
        started = time.perf_counter()

        def answer(committed):
            done, outcomes = committed
            self.committed(len(batch), time.perf_counter() - started)
            for write, result in zip(writes, done, strict=True):
                if isinstance(result, DatabaseError):
                    write.result.set_exception(Unavailable(str(result)))
                elif write.then is None:
                    write.result.set(result)
                else:
                    try:
                        write.result.set(write.then(result))
                    except Exception as e:   # the requester gets it
                        write.result.set_exception(e)
            for purchase, outcome in zip(purchases, outcomes, strict=True):
                if isinstance(outcome, Placed):
                    self.inventory.item_changed(
                        purchase.item_id, outcome.count, outcome.version)
                purchase.result.set(outcome)
            return outcomes

        # Answered by the greenlet that committed, the moment it has: the
        # hop back to this loop waited behind every request read meanwhile,
        # and each sale's stock_change with it.
        outcomes = self.runner.run(
            fn, purchases, writes, self.node, deadline,
            deadline=deadline + DB_DEADLINE_MARGIN, then=answer)
        for item_id in {p.item_id for p, o in zip(purchases, outcomes,
                                                  strict=True)
                        if o == SOLD_OUT}:
            self._note_sold_out(item_id)

    def _note_sold_out(self, item_id):
        """The database says 0: make sure memory agrees."""
        item = self.inventory.items.get(item_id)
        if item is not None and item.count > 0:
            self.load_item(item_id)

    def load_item(self, item_id):
        """Refresh one item's count from the database."""
        row = self.runner.run(
            lambda: Availability
            .select(Availability.count, Availability.version)
            .where(Availability.item == item_id).tuples().first())
        if row is not None:
            self.inventory.item_changed(item_id, *row)


# ---------------------------------------------------------------------------
# Drop day: scheduled releases
# ---------------------------------------------------------------------------

class Scheduler:
    """Releases each scheduled product at its moment, on every node by
    itself: no admin action and no peer needed. A node started after a
    moment releases the product at once."""

    def __init__(self, inventory, writes):
        self.inventory, self.writes = inventory, writes
        self._wake = gevent.event.Event()
        self.loop = Loop('scheduler', self._release_due)
        inventory.listen(self.on_inventory)

    def start(self):
        self.loop.start()

    def stop(self):
        self.loop.stop()

    def on_inventory(self, kind, product, item, old_level, local):
        """A schedule changed: look again at once."""
        if kind == 'scheduled':
            self._wake.set()

    def _release_due(self):
        """Release what is due, then sleep until the next moment (at most
        a second, or until a schedule changes)."""
        self._wake.clear()
        now = utcnow()
        due = sorted((p.release_at, p.id)
                     for p in list(self.inventory.products.values())
                     if p.release_at and not p.released)
        for at, product_id in due:
            if at <= now:
                self._release(product_id, at)
        later = [at for at, _ in due if at > now]
        wait = min([1.0] + [(at - now).total_seconds() for at in later])
        self._wake.wait(max(0.0, wait))

    def _release(self, product_id, at):
        try:
            if self.writes.release(product_id, at):
                logger.info('released product %d at its scheduled moment '
                            '%s', product_id, iso_moment(at))
        except Unavailable as e:
            logger.warning('cannot release product %d at its moment yet: '
                           '%s', product_id, e)
            self._wake.wait(1.0)


# ---------------------------------------------------------------------------
# Event hub: Server-Sent Events
# ---------------------------------------------------------------------------

def format_event(name, data, event_id):
    """Encode one SSE event: the exact bytes every stream receives."""
    payload = json.dumps(data, separators=(',', ':'))
    return f'id: {event_id}\nevent: {name}\ndata: {payload}\n\n'.encode()


# One list for every call: Bottle caches a compiled template under the
# id() of its lookup list, and a new list per call (whose id is now and
# then new) added a compiled copy for good: +4.6 MB a minute in the soak.
VIEWS_LOOKUP = [VIEWS_DIR]


def render(name, **context):
    """Render a template from `views/`."""
    return bottle.template(name, template_lookup=VIEWS_LOOKUP, **context)


def size_html(product):
    """The size selector of a released product, as the page shows it."""
    return render('size_selector', product=product)


def snapshot_of(products, paused=False):
    """The `snapshot` event body for `products`.

    Released products also carry `size_html`, so that a page which missed
    the release can show the sizes from this one event.
    """
    return {'paused': paused,
            'products': [_product_snapshot(p) for p in products]}


def _product_snapshot(product):
    entry = {'product_id': product.id, 'released': product.released,
             'release_at': iso_moment(product.moment),
             'items': [{'id': i.id, 'level': i.level} for i in product.items]}
    if product.released:
        entry['size_html'] = size_html(product)
    if product.draw is not None and product.draw.state != 'scheduled':
        entry['draw'] = draw_event(product, html=True)
    return entry


def draw_html(product):
    """A draw's panel on the card, as the page shows it."""
    return render('draw_panel', product=product, iso=iso_moment)


def draw_event(product, html=False):
    """The `draw` event body of a product (with its panel when `html`):
    entries per size, and the winning entry ids once drawn."""
    draw = product.draw
    data = {'product_id': product.id,
            'state': 'drawn' if draw.state == 'drawn' else 'open',
            'entries': draw.counts(),
            'closes_at': iso_moment(draw.closes_at)}
    if draw.state == 'drawn':
        data['winners'] = draw.winners
    if html and draw.state != 'scheduled':
        data['draw_html'] = draw_html(product)
    return data


SSE_HEAD = (b'HTTP/1.1 200 OK\r\n'
            b'Content-Type: text/event-stream\r\n'
            b'Cache-Control: no-cache\r\n'
            b'X-Accel-Buffering: no\r\n'
            b'Connection: close\r\n\r\n')
KEEPALIVE = b': keep-alive\n\n'


def _send_each(pairs):
    """send() each (stream, chunk); those the kernel did not take whole,
    as (stream, bytes sent or None when the client is gone, chunk)."""
    short = []
    for stream, chunk in pairs:
        try:
            sent = stream.sock.send(chunk)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = None
        if sent is None or sent < len(chunk):
            short.append((stream, sent, chunk))
    return short


def _send_shared(pairs, slices):
    """_send_each over the slices of `pairs` that `slices` (an iterator
    shared with another thread) hands out; the short sends."""
    short = []
    for start in slices:
        short += _send_each(pairs[start:start + SSE_SEND_SLICE])
    return short


class Stream:
    """One open SSE connection, owned by the hub after its first bytes.

    Tiny on purpose (a socket, a cursor, a filter): no greenlet, no queue.
    Bytes the kernel would not take wait in `pending`, which is bounded.
    """

    __slots__ = ('sock', 'cursor', 'products', 'pending', 'reader',
                 'writer', 'progress')

    def __init__(self, sock, cursor, products):
        self.sock, self.cursor, self.products = sock, cursor, products
        self.pending = b''   # bytes, or a memoryview of shared bytes
        self.reader = self.writer = None
        self.progress = time.monotonic()   # when it last took bytes


class EventHub:
    """Fan-out of inventory events to every open SSE stream.

    Each event is encoded once into a ring buffer (kept for `Last-Event-ID`
    replays). One fan-out greenlet writes the new bytes straight to every
    stream's non-blocking socket, the same bytes object to every stream
    that wants the same events. A client that stops reading collects
    unsent bytes up to `SSE_MAX_PENDING`, then is cut off; it reconnects
    with `Last-Event-ID` and gets what it missed, or a snapshot.
    """

    def __init__(self, inventory, buffer_size=SSE_BUFFER, name='fan-out'):
        self.inventory = inventory
        self.epoch = format(int(time.time() * 1000), 'x')
        self.seq = 0
        self.cut_off = 0
        self._ring = deque(maxlen=buffer_size)
        self._streams = set()
        # Open streams by the product they watch (every product: _everyone)
        self._everyone, self._watch = 0, Counter()
        self._dirty = gevent.event.Event()
        self._loop = gevent.get_hub().loop
        self._sender = gevent.threadpool.ThreadPool(1)
        self._sending, self._closing = False, []
        self._rest_until = 0.0
        self._openings = {}   # (seq, cursor, products) -> shared bytes
        self.rest_ratio = SSE_REST_RATIO
        self.pass_size = None   # streams per pass; None: all in one
        self.published = Counter()   # events by name
        self.loops = [Loop(name, self._fan_out_next)]

    @property
    def last_event_id(self):
        return f'{self.epoch}-{self.seq}'

    @property
    def open_streams(self):
        return len(self._streams)

    def watching(self):
        """{product_id: open streams that include it} (a stream without
        a filter includes every product)."""
        counts = Counter({pid: self._everyone
                          for pid in self.inventory.products})
        counts.update(self._watch)
        return counts

    def _count(self, products, step):
        if products is None:
            self._everyone += step
            return
        for pid in products:
            self._watch[pid] += step
            if not self._watch[pid]:
                del self._watch[pid]

    def start(self):
        self._sender.apply(int)  # start its thread now, not mid-drop
        for loop in self.loops:
            loop.start()

    def stop(self):
        for loop in self.loops:
            loop.stop()
        for stream in list(self._streams):
            self._close(stream)

    def on_inventory(self, kind, product, item, old_level, local):
        """Inventory listener: turn a change into the events shoppers see."""
        if kind == 'released':
            self.publish('released', product.id, {
                'product_id': product.id, 'size_html': size_html(product),
                'items': [{'id': i.id, 'size': i.size, 'level': i.level}
                          for i in product.items]})
        elif kind == 'availability':
            level = item.level
            if level != old_level or level == 'out':
                self.publish('stock_change', product.id, {
                    'product_id': product.id, 'item_id': item.id,
                    'level': level})
        elif kind == 'scheduled':
            self.publish('scheduled', product.id, {
                'product_id': product.id,
                'release_at': iso_moment(product.release_at)})
        elif kind == 'sales':
            self.publish('sales', None, {'paused': self.inventory.paused})

    def publish(self, name, product_id, data):
        """Encode an event once; the fan-out greenlet sends it (to every
        stream when `product_id` is None, else to those that want it)."""
        seq = self.seq + 1
        self.published[name] += 1
        self.receive(seq, product_id,
                     format_event(name, data, f'{self.epoch}-{seq}'))

    def receive(self, seq, product_id, payload):
        """An encoded event into the ring (the node's worker receives the
        node's events so), to be sent."""
        self.seq = seq
        self._ring.append((seq, product_id, payload))
        self._dirty.set()

    def describe(self):
        """Where the streams are written, for /healthz."""
        return {'process': 'inline'}

    # -- opening a stream ----------------------------------------------

    def adopt(self, sock, request):
        """Own a connected non-blocking socket and send it the opening:
        headers, `retry:`, then the missed events or a snapshot.

        The opening is bounded like everything else a stream is sent: a
        client that asks for more than it reads is cut off. Streams that
        ask for the same opening share one bytes object.
        """
        cursor, opening = self.opening(*request)
        return self.own(sock, cursor, request.products, (SSE_HEAD, opening))

    def own(self, sock, cursor, products, chunks):
        """Take a stream whose events after `cursor` are still to send,
        sending `chunks` first."""
        stream = Stream(sock, cursor, products)
        stream.reader = self._loop.io(sock.fileno(), 1)
        stream.reader.start(self._on_readable, stream)
        self._streams.add(stream)
        self._count(products, 1)
        for chunk in chunks:
            if chunk and stream in self._streams:
                self._send(stream, chunk)
        if cursor < self.seq:
            self._dirty.set()
        return stream

    def opening(self, products=None, last_event_id=None):
        """(cursor, bytes): `retry:` plus the missed events, or a snapshot
        when they are gone from the buffer or too many to replay."""
        cursor = self._resume_cursor(last_event_id)
        products = None if products is None else frozenset(products)
        key = (self.seq, cursor, products)
        if key not in self._openings:
            if len(self._openings) > 64 or any(
                    seq != self.seq for seq, _, _ in self._openings):
                self._openings.clear()
            self._openings[key] = self._make_opening(cursor, products)
        return self.seq, self._openings[key]

    def _make_opening(self, cursor, products):
        head = f'retry: {SSE_RETRY_MS}\n\n'.encode()
        missed = None if cursor is None else self._since(cursor, products)
        if missed is None or len(missed) > SSE_MAX_PENDING // 2:
            return head + self._snapshot(products)
        return head + missed

    def _snapshot(self, products):
        chosen = [p for p in self.inventory.ordered()
                  if products is None or p.id in products]
        return format_event('snapshot',
                            snapshot_of(chosen, self.inventory.paused),
                            self.last_event_id)

    def _resume_cursor(self, last_event_id):
        """The seq to resume after, or None when a snapshot is needed."""
        if not last_event_id:
            return self.seq
        epoch, _, seq = last_event_id.partition('-')
        if (epoch != self.epoch or not (seq.isascii() and seq.isdigit())
                or int(seq) > self.seq):
            return None
        return int(seq)

    def _since(self, cursor, products):
        """Buffered events after `cursor`, or None if some are gone."""
        first = self._ring[0][0] if self._ring else self.seq + 1
        if cursor < first - 1:
            return None
        skip = cursor - first + 1
        return b''.join(payload for _, pid, payload
                        in itertools.islice(self._ring, skip, None)
                        if products is None or pid is None
                        or pid in products)

    # -- writing ---------------------------------------------------------

    def _fan_out_next(self):
        woken = self._dirty.wait(SSE_KEEPALIVE)
        rest = self._rest_until - time.monotonic()
        if woken and rest > 0:
            gevent.sleep(rest)   # the last round was a big one
        self._dirty.clear()
        started = time.monotonic()
        self._fan_out() if woken else self._keep_alive()
        took = time.monotonic() - started
        self._rest_until = time.monotonic() + min(took * self.rest_ratio,
                                                  SSE_REST_MAX)

    def _fan_out(self):
        """Send every stream the events after its cursor, in passes of
        `pass_size` streams (default: one pass).

        Between passes the hub takes the events that came meanwhile, and
        the next passes send them too: in a drop's storm an event no
        longer waits for the whole round in progress, then a round of
        its own (about two rounds at p99), only for the streams already
        done (the fan-out worker, which has no purchases to yield to).
        """
        streams = list(self._streams)
        size = self.pass_size or len(streams) or 1
        for start in range(0, len(streams), size):
            if start:
                gevent.idle()   # the channel's frames, closed streams
            self._fan_out_pass(streams[start:start + size])

    def _fan_out_pass(self, streams):
        """The hot loop of a drop: streams at the same cursor with the
        same filter share one bytes object, and a send the kernel takes
        whole (the usual case) costs one syscall and nothing else. A
        cursor moves once its bytes were handed over (sent or pending),
        so a failure half-way resends rather than skips."""
        target, chunks, direct = self.seq, {}, []
        for stream in streams:
            if stream.cursor >= target or stream not in self._streams:
                continue
            key = (stream.cursor, stream.products)
            if key not in chunks:
                chunks[key] = self._since(*key)
            chunk = chunks[key]
            if stream.pending or chunk is None:
                self._send(stream, chunk)
                stream.cursor = target
            elif chunk:
                direct.append((stream, chunk))
            else:
                stream.cursor = target
        self._send_direct(direct)
        for stream, _ in direct:
            stream.cursor = target

    def _send_direct(self, pairs):
        """Write whole chunks to streams with nothing pending.

        The kernel's share of a loopback send is most of its cost and
        runs without the GIL, so a big fan-out is shared with a native
        thread: both take the next slice of streams until none is left
        (measured: 10,000 streams, 105 ms from one loop). Neither yields
        meanwhile: a thread left alone while the hub serves a storm of
        purchases gets the GIL once per switch interval, and a fan-out
        took 1.1 s so (bench/run.py drop). Sockets closed meanwhile stay
        open until the thread is done, so that their numbers cannot go to
        new connections under it.
        """
        if len(pairs) < SSE_THREAD_FROM:
            return self._after_send(_send_each(pairs))
        slices = iter(range(0, len(pairs), SSE_SEND_SLICE))
        self._sending = True
        try:
            other = self._sender.spawn(_send_shared, pairs, slices)
            short = _send_shared(pairs, slices)
            short += other.get()
        finally:
            self._sending = False
            for sock in self._closing:
                sock.close()
            self._closing.clear()
        self._after_send(short)

    def _after_send(self, short):
        for stream, sent, chunk in short:
            if sent is None:
                self._close(stream)
            else:
                self._send(stream, chunk[sent:])

    def _keep_alive(self):
        for n, stream in enumerate(list(self._streams), 1):
            self._send(stream, KEEPALIVE)
            if n % SSE_FAN_OUT_SLICE == 0:
                gevent.sleep(0)

    def cut_stalled(self):
        """Cut off streams that took no byte for SSE_STALL_TIMEOUT while
        bytes waited for them: a client that stopped reading, even when
        too few events flow to fill its pending bound."""
        now = time.monotonic()
        for stream in list(self._streams):
            if (stream.pending
                    and now - stream.progress > SSE_STALL_TIMEOUT):
                self._close(stream, cut_off=True)

    def _send(self, stream, data):
        """Write without ever waiting; keep the rest, bounded."""
        if data is None:  # it fell out of the ring: resume impossible
            return self._close(stream, cut_off=True)
        if stream.pending:
            stream.pending = bytes(stream.pending) + data
        else:
            stream.pending = data  # shared with other streams: no copy
            stream.progress = time.monotonic()
        if stream.writer is None:
            self._flush(stream)
        if stream not in self._streams:
            return
        if len(stream.pending) > SSE_MAX_PENDING:
            self._close(stream, cut_off=True)
        elif stream.pending and stream.writer is None:
            stream.writer = self._loop.io(stream.sock.fileno(), 2)
            stream.writer.start(self._on_writable, stream)

    def _flush(self, stream):
        try:
            sent = stream.sock.send(stream.pending)
        except BlockingIOError:
            return
        except OSError:
            return self._close(stream)
        if sent:
            stream.progress = time.monotonic()
        left = memoryview(stream.pending)[sent:]
        stream.pending = left if left else b''

    def _on_writable(self, stream):
        self._flush(stream)
        if not stream.pending and stream.writer is not None:
            stream.writer.stop()
            stream.writer = None

    def _on_readable(self, stream):
        """A client never sends after its request: this is its goodbye."""
        try:
            data = stream.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        if not data:
            self._close(stream)

    def _close(self, stream, cut_off=False):
        if stream not in self._streams:
            return
        self._streams.discard(stream)
        self._count(stream.products, -1)
        for watcher in (stream.reader, stream.writer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        stream.reader = stream.writer = None
        if self._sending:
            self._closing.append(stream.sock)
        else:
            stream.sock.close()
        if cut_off:
            self.cut_off += 1
            logger.info('cut off an SSE client that stopped reading')


# The channel between a node and its fan-out worker: frames of (kind,
# length, body). `e`: an event (seq, product id or -1 for every product,
# the encoded bytes); `s`: a stream handed over (cursor, its product ids
# or ALL_PRODUCTS, the opening bytes its socket did not take yet), its
# socket riding along as SCM_RIGHTS; `c`: the worker's counts, as JSON.
FRAME = struct.Struct('!cI')
EVENT_HEAD = struct.Struct('!Qq')
STREAM_HEAD = struct.Struct('!QI')
ALL_PRODUCTS = 0xFFFFFFFF


def frame(kind, body):
    return FRAME.pack(kind, len(body)) + body


def take_frames(buffer):
    """Remove the whole frames at the start of `buffer` (a bytearray);
    [(kind, body)]."""
    frames, at = [], 0
    while len(buffer) - at >= FRAME.size:
        kind, length = FRAME.unpack_from(buffer, at)
        end = at + FRAME.size + length
        if end > len(buffer):
            break
        frames.append((kind, bytes(buffer[at + FRAME.size:end])))
        at = end
    del buffer[:at]
    return frames


def stream_frame(cursor, products, unsent):
    ids = () if products is None else sorted(products)
    return frame(b's', STREAM_HEAD.pack(
        cursor, ALL_PRODUCTS if products is None else len(ids))
        + struct.pack(f'!{len(ids)}q', *ids) + unsent)


def parse_stream_frame(body):
    """(cursor, products, unsent bytes) of an `s` frame."""
    cursor, count = STREAM_HEAD.unpack_from(body)
    at = STREAM_HEAD.size
    if count == ALL_PRODUCTS:
        return cursor, None, body[at:]
    ids = struct.unpack_from(f'!{count}q', body, at)
    return cursor, frozenset(ids), body[at + 8 * count:]


def fan_out_command(fd):
    """The command line of a fan-out worker reading channel `fd`."""
    if FROZEN:
        return [sys.executable, FAN_OUT_COMMAND, str(fd)]
    return [sys.executable, os.path.abspath(__file__), FAN_OUT_COMMAND,
            str(fd)]


class FanOutProcess(EventHub):
    """The shoppers' hub of a node whose streams are written by a worker
    process.

    The node keeps what an opening needs (the ring of events for
    `Last-Event-ID`, the snapshot) and writes each opening itself; then
    it hands the socket to the worker (SCM_RIGHTS over a Unix socket
    pair), and every event after it follows on the same channel, in
    order. The worker runs an EventHub of its own (the same fan-out,
    cut-offs and keep-alives) in a process of its own, so that sending
    to 10,000 sockets does not hold the GIL the purchases need (during a
    drop 52% of the node's time went to those sends). Its counts come
    back every FAN_OUT_STATS_INTERVAL. It starts with the first stream
    (a node nobody watches costs no second process; the events before
    that stream's opening are not needed by any stream). A worker that
    dies is replaced: its shoppers reconnect with `Last-Event-ID` and
    resume from the node's ring.
    """

    def __init__(self, inventory, buffer_size=SSE_BUFFER):
        super().__init__(inventory, buffer_size)
        # (bytes, the socket they hand over or None, the channel they
        # must go to when they are the rest of a frame, else None: a new
        # worker must not get half a frame)
        self._outbox = deque()
        self._ready = gevent.event.Event()
        self._stopping = gevent.event.Event()
        self._channel = self._proc = None
        self._open, self._cut_before = 0, 0
        self.restarts, self.rss_bytes = 0, None
        self._tender = None   # the loop that runs the worker, once wanted
        self.loops = [Loop('fan-out-feed', self._feed)]

    @property
    def open_streams(self):
        return self._open

    def describe(self):
        return {'process': 'worker', 'restarts': self.restarts,
                'pid': self._proc.pid if self._proc else None,
                'rss_bytes': self.rss_bytes}

    def start(self):
        for loop in self.loops:
            loop.start()

    def _want_worker(self):
        if self._tender is None and not self._stopping.is_set():
            self._tender = Loop('fan-out-worker', self._tend).start()
            self.loops.append(self._tender)

    def stop(self):
        self._stopping.set()
        for loop in self.loops:
            loop.stop()
        if self._channel is not None:
            self._channel.close()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        while self._outbox:
            _, sock, _ = self._outbox.popleft()
            if sock is not None:
                sock.close()

    def cut_stalled(self):
        """The worker cuts off its stalled streams itself."""

    def receive(self, seq, product_id, payload):
        super().receive(seq, product_id, payload)
        if self._tender is None:
            return   # no stream yet: no worker, and nobody needs it
        self._post(frame(b'e', EVENT_HEAD.pack(
            seq, -1 if product_id is None else product_id) + payload))

    def adopt(self, sock, request):
        """Write the opening, then hand the socket to the worker."""
        self._want_worker()
        cursor, opening = self.opening(*request)
        try:
            sent = sock.sendmsg((SSE_HEAD, opening))
        except BlockingIOError:
            sent = 0
        except OSError:
            return sock.close()   # gone already
        unsent = b''
        if sent < len(SSE_HEAD) + len(opening):
            unsent = (SSE_HEAD + opening)[sent:]
        self._post(stream_frame(cursor, request.products, unsent), sock)

    def _post(self, data, sock=None):
        """Queue a frame (and the socket it hands over) for the feed loop.

        Not sent from here, although the channel would usually take it
        at once: queued, the events of one turn of the hub reach the
        worker together and go out in one round. Sent one by one, each
        started a round of its own: stock_change p99 in a drop 457-566 ms
        against 366-462 ms queued (bench/run.py drop, 6 runs each).
        """
        if len(self._outbox) >= FAN_OUT_MAX_BACKLOG:
            _, dropped, _ = self._outbox.popleft()   # no worker for long
            if dropped is not None:
                dropped.close()
        self._outbox.append((data, sock, None))
        self._ready.set()

    @staticmethod
    def _write(channel, data, sock):
        """Bytes of `data` the channel took now (0: full)."""
        try:
            if sock is None:
                return channel.send(data)
            return socket.send_fds(channel, [data], [sock.fileno()])
        except BlockingIOError:
            return 0

    def _feed(self):
        """The outbox to the worker, in order, waiting for the channel
        to take it: the frames queued since the last turn in one send."""
        self._ready.wait()
        self._ready.clear()
        while self._outbox and self._channel is not None:
            channel = self._channel
            data, sock, bound = self._outbox.popleft()
            if bound is not None and bound is not channel:
                continue   # the rest of a frame for a worker now gone
            if sock is None and bound is None:
                parts, size = [data], len(data)
                while (self._outbox and self._outbox[0][1:] == (None, None)
                       and size < 1 << 20):
                    parts.append(self._outbox.popleft()[0])
                    size += len(parts[-1])
                data = b''.join(parts)
            try:
                sent = self._write(channel, data, sock)
            except OSError:
                sent = None
            if sent is None or not sent:
                self._outbox.appendleft((data, sock, bound))
                if sent is None:
                    return   # the worker is gone: _tend starts another
                try:
                    gevent.socket.wait_write(channel.fileno(), timeout=1)
                except (TimeoutError, OSError):
                    pass   # then look again: still this worker?
                continue
            if sock is not None:
                sock.close()
            if sent < len(data):
                self._outbox.appendleft((data[sent:], None, channel))

    def _tend(self):
        """Start a worker and read its counts until it ends; one that
        ends while the node runs is replaced after a pause."""
        ours, theirs = _socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        try:
            proc = subprocess.Popen(fan_out_command(theirs.fileno()),
                                    pass_fds=(theirs.fileno(),),
                                    stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._proc, self._channel = proc, ours
        self._ready.set()
        try:
            self._read_counts(ours)
        finally:
            self._channel = None
            ours.close()
            self._cut_before = self.cut_off
            self._open, self._everyone, self._watch = 0, 0, Counter()
        if self._stopping.is_set():
            return
        try:
            code = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self.restarts += 1
        logger.error('the fan-out worker (pid %s) ended with %s; its '
                     'shoppers reconnect to a new one', proc.pid, code)
        self._stopping.wait(FAN_OUT_RESTART_PAUSE)

    def _read_counts(self, channel):
        buffer = bytearray()
        while True:
            gevent.socket.wait_read(channel.fileno())
            try:
                data = channel.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            buffer += data
            for kind, body in take_frames(buffer):
                if kind == b'c':
                    counts = json.loads(body)
                    self._open = counts['open']
                    self.cut_off = self._cut_before + counts['cut_off']
                    self.rss_bytes = counts['rss_bytes']
                    self._everyone = counts['everyone']
                    self._watch = Counter(dict(counts['watch']))


class FanOutWorker:
    """The worker process of a FanOutProcess: owns the streams handed
    over on the channel and writes them every event that follows."""

    def __init__(self, channel):
        self.channel = channel
        self.hub = EventHub(None)
        # Nothing else here needs the GIL: a fan-out need not rest for
        # purchases between rounds (the events of a round's time go out
        # together in the next one all the same).
        self.hub.rest_ratio = 0.0
        self.hub.pass_size = SSE_WORKER_PASS
        self._fds = deque()
        self._last = None
        self._rss, self._rss_second = None, None
        self.loops = [Loop('fan-out-counts', self._report,
                           FAN_OUT_STATS_INTERVAL),
                      Loop('fan-out-stalls', self.hub.cut_stalled,
                           HOUSEKEEPING_INTERVAL)]

    def run(self):
        """Serve until the node closes the channel (or dies)."""
        self.hub.start()
        for loop in self.loops:
            loop.start()
        freeze_the_living()
        buffer = bytearray()
        try:
            while True:
                data, fds, flags, _ = socket.recv_fds(self.channel,
                                                      1 << 20, 8)
                self._fds.extend(fds)
                if flags & socket.MSG_CTRUNC and not fds:
                    # Out of file descriptors: the kernel closed the one
                    # sent (each arrives alone, with its frame's first
                    # bytes). Its stream is skipped; the rest stay paired.
                    self._fds.append(None)
                if not data:
                    return
                buffer += data
                for kind, body in take_frames(buffer):
                    self._take(kind, body)
        finally:
            for loop in self.loops:
                loop.stop()
            self.hub.stop()
            for fd in self._fds:
                if fd is not None:
                    os.close(fd)

    def _take(self, kind, body):
        if kind == b'e':
            seq, pid = EVENT_HEAD.unpack_from(body)
            self.hub.receive(seq, None if pid == -1 else pid,
                             body[EVENT_HEAD.size:])
        elif kind == b's':
            cursor, products, unsent = parse_stream_frame(body)
            fd = self._fds.popleft() if self._fds else None
            if fd is None:
                logger.warning('fan-out worker: out of file descriptors, '
                               'a stream was closed')
                return
            sock = _socket.socket(fileno=fd)
            sock.setblocking(False)
            self.hub.own(sock, cursor, products, (unsent,))

    def _report(self):
        """The counts, when they changed: open streams, those watching
        every product and those watching each (at most one entry per
        product of the store: `/events` refuses unknown ids)."""
        hub = self.hub
        second = int(time.monotonic())
        if second != self._rss_second:   # /proc, read once a second
            self._rss, self._rss_second = own_rss(), second
        counts = json.dumps({
            'open': hub.open_streams, 'cut_off': hub.cut_off,
            'everyone': hub._everyone, 'watch': sorted(hub._watch.items()),
            'rss_bytes': self._rss}).encode()
        if counts != self._last:
            self.channel.sendall(frame(b'c', counts))
            self._last = counts


def fan_out_worker(fd):
    """The main of a fan-out worker process (argv: FAN_OUT_COMMAND fd)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C: the node's
    FanOutWorker(socket.socket(fileno=fd)).run()
    return 0


class DashboardHub(EventHub):
    """The operator dashboards' streams: written like the shoppers'
    (bounded, no greenlet each), fed an `overview` every second while
    one is open, opened with the last minutes of sales for the chart.

    `overview()` is the store's overview with `sold` per product;
    `history()` the sales per second behind the chart.
    """

    def __init__(self, inventory, overview, history):
        super().__init__(inventory, buffer_size=8, name='dashboard-fan-out')
        self.overview, self.history = overview, history
        self._sold = None   # (epoch s, {product_id: sold}) of the last one
        self.loops.append(Loop('dashboard', self._tick, DASHBOARD_INTERVAL))

    def _tick(self):
        if not self._streams:
            self._sold = None
            return
        self.publish('overview', None, self._current())

    def _current(self):
        """The overview with `at` and `sold_per_s` since the last one."""
        view, at = self.overview(), time.time()
        sold = {p['id']: p['sold'] for p in view['products']}
        rates = {}
        if self._sold is not None:
            before, sold_before = self._sold
            for pid, count in sold.items():
                earlier = sold_before.get(pid)
                rates[str(pid)] = (None if count is None or earlier is None
                                   else round(max(0, count - earlier)
                                              / max(at - before, 0.001), 2))
        self._sold = (at, sold)
        return {**view, 'at': round(at, 3), 'sold_per_s': rates}

    def opening(self, products=None, last_event_id=None):
        """`retry:`, the chart's history and the overview now (a
        dashboard that reconnects gets the same: nothing to replay)."""
        head = f'retry: {SSE_RETRY_MS}\n\n'.encode()
        history = format_event('history', self.history(), self.last_event_id)
        view = self.overview()
        view = {**view, 'at': round(time.time(), 3), 'sold_per_s': {}}
        return self.seq, head + history + format_event(
            'overview', view, self.last_event_id)


# ---------------------------------------------------------------------------
# Replication: ZeroMQ PUB/SUB between nodes
# ---------------------------------------------------------------------------

MESSAGE_FIELDS = {'availability': ('item_id', 'count', 'version'),
                  'released': ('product_id',), 'heartbeat': (),
                  'scheduled': ('product_id',), 'sales': ('version',),
                  'draw': ('product_id',)}


def encode_message(node, boot, seq, kind, **fields):
    """The two frames of one replication message."""
    body = {'node': node, 'seq': seq, 'type': kind, 'boot': boot, **fields}
    return [b'inv', json.dumps(body, separators=(',', ':')).encode()]


def decode_message(frames):
    """A received message as a dict; ValueError when it is malformed."""
    if len(frames) != 2 or frames[0] != b'inv':
        raise ValueError('not two frames starting with "inv"')
    msg = json.loads(frames[1])
    if not isinstance(msg, dict) or not isinstance(msg.get('type'), str):
        raise ValueError(f'not a message: {frames[1][:80]!r}')
    # A type this node does not know (a newer peer's) still counts in
    # the origin's seq; `apply` ignores it.
    for name in ('seq', *MESSAGE_FIELDS.get(msg['type'], ())):
        if type(msg.get(name)) is not int:
            raise ValueError(f'{msg["type"]} message without int {name}')
    if msg['type'] == 'sales' and type(msg.get('paused')) is not bool:
        raise ValueError('sales message without a true/false paused')
    if not isinstance(msg.get('node'), str):
        raise ValueError('message without its origin node')
    return msg


def parse_time(text):
    """An ISO 8601 UTC time from a message, as stored; now if missing."""
    try:
        return datetime.fromisoformat(text.rstrip('Z'))
    except (AttributeError, ValueError):
        return utcnow()


def _moment_or_none(text):
    """A replicated schedule: a moment, or None (cancelled, unreadable)."""
    try:
        return parse_moment(text)
    except ValueError:
        return None


def curve_keys(config):
    """(public, secret) of this node when peers.toml has keys, or None."""
    if not config.public_key:
        return None
    secret = config.curve_secret
    if not secret:
        raise ConfigError('peers.toml has CURVE keys: set '
                          'SNEAKERS23_CURVE_SECRET to this node\'s secret')
    try:
        public = zmq.curve_public(secret.encode()).decode()
    except (zmq.ZMQError, ValueError):
        raise ConfigError('SNEAKERS23_CURVE_SECRET is not a CURVE secret '
                          'key (40 characters of Z85)') from None
    if public != config.public_key:
        raise ConfigError(f'SNEAKERS23_CURVE_SECRET does not match '
                          f'nodes.{config.node}.public_key')
    return public, secret


class PeerState:
    """What this node knows of one peer's message stream."""

    def __init__(self, peer):
        self.peer = peer
        self.boot = self.last_seq = self.last_heard = None
        self.silent = False
        self.messages = self.redials = 0
        self.sub = self.monitor = None
        self.dialled = self.first_dialled = 0.0
        self.refused = False   # its last handshake failed
        self.presence, self.presence_at = None, 0.0   # its own figures

    def as_json(self, now):
        if self.last_heard is None:
            state, lag = 'never', None
        else:
            state = 'silent' if self.silent else 'connected'
            lag = round((now - self.last_heard) * 1000)
        return {'address': self.peer.replication, 'state': state,
                'last_seq': self.last_seq, 'lag_ms': lag,
                'messages': self.messages, 'redials': self.redials}

    def quiet_for(self, now):
        """Seconds since it was last heard, or first dialled if never."""
        return now - (self.last_heard or self.first_dialled)


class Replicator:
    """Sends this node's inventory changes to its peers, applies theirs.

    PUB/SUB loses messages, so every origin numbers its messages (`seq`)
    and sends a heartbeat each second. A gap, a restarted or silent peer,
    or a peer heard for the first time makes the node reload its stock
    from the database: the Clone pattern, the database as the snapshot.
    """

    def __init__(self, config, inventory, writes):
        self.config, self.inventory, self.writes = config, inventory, writes
        self.node = config.node
        self.boot = format(time.time_ns(), 'x')
        self.seq = 0
        self.peers = {p.name: PeerState(p) for p in config.peers.values()}
        self.resyncs = self.dropped = 0
        self.context = zmq.Context()
        self._pub = None
        self._keys = None
        self._resync_wanted = gevent.event.Event()
        self.presence = lambda: None   # this node's figures (Node sets it)
        self.draw_touched = lambda product_id: None   # and this
        self.loops = [Loop('heartbeat', self._heartbeat, HEARTBEAT_INTERVAL),
                      Loop('watch-peers', self._watch_peers,
                           HEARTBEAT_INTERVAL / 4),
                      Loop('resync', self._resync_next)]
        self.loops += [Loop(f'listen-{name}', lambda s=state: self._listen(s))
                       for name, state in sorted(self.peers.items())]

    def start(self):
        """Bind PUB, subscribe to every peer, start the loops."""
        self._keys = curve_keys(self.config)
        if self._keys:
            zap = self._bind_zap()
            self.loops.append(Loop('zap', lambda: self._answer_zap(zap)))
        self._pub = self._bind_pub()
        for loop in self.loops:
            loop.start()
        self.inventory.listen(self.on_inventory)

    def stop(self):
        for loop in self.loops:
            loop.stop()
        self.context.destroy(linger=0)

    def health(self):
        now = time.monotonic()
        return {name: state.as_json(now)
                for name, state in sorted(self.peers.items())}

    # -- sending --------------------------------------------------------

    def on_inventory(self, kind, product, item, old_level, local):
        """Inventory listener: publish local changes, never remote ones."""
        if not local:
            return
        if kind == 'availability':
            self.publish('availability', item_id=item.id, count=item.count,
                         version=item.version)
        elif kind == 'released':
            self.publish('released', product_id=product.id,
                         release_at=iso_moment(product.release_at))
        elif kind == 'scheduled':
            self.publish('scheduled', product_id=product.id,
                         release_at=iso_moment(product.release_at))
        elif kind == 'sales':
            self.publish('sales', paused=self.inventory.paused,
                         version=self.inventory.sales_version)
        elif kind == 'draw':   # peers read the draw from the database
            self.publish('draw', product_id=product.id)

    def publish(self, kind, **fields):
        """Send one message to every subscribed peer."""
        self.seq += 1
        if (self.config.drop_rate and kind != 'heartbeat'
                and random.random() < self.config.drop_rate):
            self.dropped += 1
            return
        self._pub.send_multipart(
            encode_message(self.node, self.boot, self.seq, kind, **fields))

    def _bind_pub(self):
        pub = self.context.socket(zmq.PUB)
        self._secure(pub)
        if self._keys:
            pub.curve_server = True
            pub.zap_domain = b'sneakers23'
        try:
            pub.bind(self.config.replication)
        except zmq.ZMQError as e:
            raise ConfigError(f'cannot bind replication at '
                              f'{self.config.replication!r}: {e}') from None
        return pub

    def _secure(self, sock):
        """This node's CURVE keys (when configured) and ZMTP heartbeats,
        which notice a dead TCP connection within seconds."""
        if self._keys:
            sock.curve_publickey, sock.curve_secretkey = (
                k.encode() for k in self._keys)
        sock.heartbeat_ivl = ZMQ_HEARTBEAT_MS
        sock.heartbeat_timeout = ZMQ_HEARTBEAT_MS * 3
        sock.heartbeat_ttl = ZMQ_HEARTBEAT_MS * 3

    def _heartbeat(self):
        self.publish('heartbeat', presence=self.presence())

    # -- receiving ------------------------------------------------------

    def _listen(self, state):
        """One wait for a peer's message or monitor event; re-dial a peer
        that stays silent, whatever state its connection is in.

        libzmq gives up on a connection for good after a handshake error
        (a rogue bound at the peer's address): only a new socket recovers.
        """
        if state.sub is None:
            self._dial(state)
        poller = zmq.Poller()
        poller.register(state.sub, zmq.POLLIN)
        if state.monitor is not None:
            poller.register(state.monitor, zmq.POLLIN)
        ready = dict(poller.poll(HEARTBEAT_INTERVAL * 250))
        if state.monitor is not None and state.monitor in ready:
            self._note_handshake(state, recv_monitor_message(state.monitor))
        if state.sub in ready:
            self._take_message(state, state.sub.recv_multipart())
        self._redial_if_silent(state)

    def _take_message(self, state, frames):
        try:
            self.receive(state, decode_message(frames))
        except ValueError as e:
            logger.warning('replication: bad message from %s: %s',
                           state.peer.name, e)

    def _dial(self, state):
        peer = state.peer
        sub = self.context.socket(zmq.SUB)
        self._secure(sub)
        if self._keys:
            sub.curve_serverkey = peer.public_key.encode()
            state.monitor = sub.get_monitor_socket()
        sub.setsockopt(zmq.SUBSCRIBE, b'inv')
        sub.connect(peer.replication)
        state.sub, state.dialled = sub, time.monotonic()
        state.first_dialled = state.first_dialled or state.dialled

    def _redial_if_silent(self, state):
        now = time.monotonic()
        if (state.quiet_for(now) < PEER_REDIAL_AFTER
                or now - state.dialled < PEER_REDIAL_INTERVAL):
            return
        state.redials += 1
        if state.redials & (state.redials - 1) == 0:  # 1, 2, 4, 8...
            logger.info('replication: re-dialling %s at %s (silent %.1f s,'
                        ' %d re-dials)', state.peer.name,
                        state.peer.replication, state.quiet_for(now),
                        state.redials)
        self._hang_up(state)
        self._dial(state)

    def _hang_up(self, state):
        if state.monitor is not None:
            state.sub.disable_monitor()
            state.monitor.close(linger=0)
        state.sub.close(linger=0)
        state.sub = state.monitor = None

    def receive(self, state, msg):
        """Apply one peer message; ask for a reload when some were lost."""
        if msg['node'] != state.peer.name:
            raise ValueError(f'message from {state.peer.name} claims to '
                             f'come from {msg["node"]!r}')
        was_silent = state.silent
        state.last_heard, state.silent = time.monotonic(), False
        state.messages += 1
        reason = self._stream_fault(state, msg)
        self.apply(msg)
        if reason or was_silent:
            self.request_resync(reason or f'{state.peer.name} is back')

    def _stream_fault(self, state, msg):
        """Why this message shows lost messages, or None."""
        seq, boot = msg['seq'], msg.get('boot')
        if boot != state.boot or state.last_seq is None:
            joined = 'joined' if state.boot is None else 'restarted'
            state.boot, state.last_seq = boot, seq
            return f'{state.peer.name} {joined}'
        expected, state.last_seq = state.last_seq + 1, max(state.last_seq,
                                                           seq)
        if seq > expected:
            return f'{seq - expected} message(s) from {state.peer.name} lost'
        return None

    def apply(self, msg):
        """Apply a peer's change to memory as a remote one."""
        if msg['type'] == 'heartbeat' and isinstance(msg.get('presence'),
                                                       dict):
            state = self.peers.get(msg['node'])
            if state is not None:
                state.presence = msg['presence']
                state.presence_at = time.monotonic()
        elif msg['type'] == 'availability':
            self.inventory.item_changed(msg['item_id'], msg['count'],
                                        msg['version'], local=False)
        elif msg['type'] == 'released':
            self.inventory.product_released(
                msg['product_id'], parse_time(msg.get('release_at')),
                local=False)
        elif msg['type'] == 'scheduled':
            self.inventory.product_scheduled(
                msg['product_id'], _moment_or_none(msg.get('release_at')),
                local=False)
        elif msg['type'] == 'sales':
            self.inventory.sales_changed(msg['paused'], msg['version'],
                                         local=False)
        elif msg['type'] == 'draw':
            self.draw_touched(msg['product_id'])

    def request_resync(self, reason):
        """Reload stock from the database soon (coalesced)."""
        logger.info('replication: reloading from the database: %s', reason)
        self._resync_wanted.set()

    def _resync_next(self):
        self._resync_wanted.wait()
        self._resync_wanted.clear()
        try:
            self.writes.refresh()
        except Exception:
            self._resync_wanted.set()   # the loop logs it and pauses
            raise
        self.resyncs += 1

    def _watch_peers(self):
        """Notice peers that went silent: their last changes may be lost."""
        now = time.monotonic()
        for state in self.peers.values():
            if (state.last_heard and not state.silent
                    and now - state.last_heard > PEER_SILENT_AFTER):
                state.silent = True
                self.request_resync(f'{state.peer.name} went silent')

    # -- CURVE ----------------------------------------------------------

    def _bind_zap(self):
        zap = self.context.socket(zmq.REP)
        zap.bind(ZAP_ENDPOINT)
        return zap

    def _answer_zap(self, zap):
        """ZAP: only the public keys listed in peers.toml may subscribe.
        Every request gets an answer, even a malformed one (REP)."""
        frames = zap.recv_multipart()
        version, request_id = (frames + [b'1.0', b''])[:2]
        ok = False
        try:
            ok = self._zap_allows(frames)
        finally:
            zap.send_multipart([version, request_id,
                                b'200' if ok else b'400',
                                b'OK' if ok else b'unknown key', b'', b''])

    def _zap_allows(self, frames):
        _, _, _, address, _, mechanism, *creds = frames
        allowed = {s.peer.public_key for s in self.peers.values()}
        key = (z85.encode(creds[0]).decode()
               if mechanism == b'CURVE' and creds else '')
        if key not in allowed:
            logger.warning('replication: refused %s with a key not in '
                           'peers.toml (%s)',
                           address.decode(errors='replace'), key)
        return key in allowed

    def _note_handshake(self, state, event):
        """Log a peer whose key is not the one peers.toml lists (once per
        spell of failures)."""
        failed = (zmq.EVENT_HANDSHAKE_FAILED_AUTH
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        if event['event'] & failed and not state.refused:
            logger.warning('replication: refused %s at %s: its key is '
                           'not the one in peers.toml', state.peer.name,
                           state.peer.replication)
        state.refused = bool(event['event'] & failed) or (
            state.refused
            and event['event'] != zmq.EVENT_HANDSHAKE_SUCCEEDED)


# ---------------------------------------------------------------------------
# Drop day: draws
# ---------------------------------------------------------------------------

def draw_document(draw, seed=None, entries=()):
    """`GET /api/draws/<id>`: everything needed to check a draw. The
    seed, the entries and the winners only once drawn."""
    drawn = seed is not None
    return {'product_id': draw.product_id, 'state': draw.state,
            'opens_at': iso_moment(draw.opens_at),
            'closes_at': iso_moment(draw.closes_at),
            'commitment': draw.commitment, 'seed': seed,
            'pairs': {str(k): v for k, v in draw.pairs.items()},
            'digest': entries_digest(entries) if drawn else None,
            'entries': [{'entry_id': e, 'item_id': i} for e, i in entries],
            'winners': list(draw.winners) if drawn else []}


def verify_draw(document):
    """Recompute a published draw from its document alone: None when
    the seed matches its commitment and the winners match, else why
    not, in one line."""
    if not isinstance(document, dict) or document.get('seed') is None:
        return 'the draw has no seed published: not drawn yet'
    try:
        seed = document['seed']
        commitment = commitment_of(seed)
        entries = [(int(e['entry_id']), int(e['item_id']))
                   for e in document['entries']]
        pairs = {int(k): int(v) for k, v in document['pairs'].items()}
        published = sorted(int(w) for w in document['winners'])
    except (KeyError, TypeError, ValueError, AttributeError):
        return 'the document is not a draw document'
    if commitment != document.get('commitment'):
        return 'the seed does not match the commitment'
    expected = draw_winners(seed, entries, pairs)
    if published != expected:
        differ = sorted(set(published) ^ set(expected)) or published
        return (f'the published winners are not the drawn ones (entries '
                f'{", ".join(map(str, differ[:5]))} differ)')
    return None


class DrawKeeper:
    """A node's draws: it takes entries, opens and runs draws at their
    moments, and sends each draw's live counts to the pages.

    The database is the truth: every node takes entries, and reads the
    draws table every DRAW_TICK while a draw is open (else every
    DRAW_IDLE, or at once when a peer says a draw changed). At the close
    every node tries to claim the draw; the one whose claim lands runs
    it in one transaction. A claim expires after DRAW_CLAIM_TTL, so when
    that node dies mid-draw (its transaction rolled back with it),
    another claims it and runs it.
    """

    def __init__(self, config, runner, inventory, writes, hub):
        self.node, self.hold = config.node, config.hold_draw
        self.runner, self.inventory = runner, inventory
        self.writes, self.hub = writes, hub
        self.documents = {}   # product_id -> its drawn document, kept
        self._sent = {}       # product_id -> (state, counts) last sent
        self._wake = gevent.event.Event()
        self.loop = Loop('draws', self._step, DRAW_TICK)

    def start(self):
        self.look()
        self.loop.start()

    def stop(self):
        self.loop.stop()

    def touched(self, product_id):
        """A peer changed a draw: read the database now."""
        self._wake.set()

    # -- the operator and the shoppers -----------------------------------

    def define(self, product_id, opens_at, closes_at):
        """Make a product a draw: its DrawState, or None when it is
        released or a draw already."""
        if not self.writes.write(define_draw, product_id, opens_at,
                                 closes_at, secrets.token_hex(32),
                                 utcnow()):
            return None
        self.inventory.product_scheduled(product_id, None)
        self._wake.set()
        return self._reload(product_id, local=True)

    def enter(self, product_id, item_id, shopper):
        """Make or change a shopper's entry: its id, or DRAW_CLOSED."""
        outcome = self.writes.write(enter_draw, product_id, item_id,
                                    shopper, self.node, utcnow())
        if outcome == DRAW_CLOSED:
            return outcome
        entry_id, counts = outcome
        self.inventory.draw_entries_changed(product_id, counts)
        return entry_id

    def withdraw(self, product_id, shopper):
        """Withdraw a shopper's entry: True, DRAW_CLOSED or NO_ENTRY."""
        outcome = self.writes.write(withdraw_entry, product_id, shopper,
                                    utcnow())
        if not isinstance(outcome, dict):
            return outcome
        self.inventory.draw_entries_changed(product_id, outcome)
        return True

    def document(self, product_id):
        """The published draw of a product, or None when it has none."""
        product = self.inventory.products.get(product_id)
        draw = product and product.draw
        if draw is None:
            return None
        if draw.state != 'drawn':
            return draw_document(draw)
        if product_id not in self.documents:
            seed, entries = self.runner.read(lambda: (
                draw_secret(product_id), drawn_entries(product_id)))
            self.documents[product_id] = draw_document(draw, seed, entries)
        return self.documents[product_id]

    # -- the loop ----------------------------------------------------------

    def look(self):
        """Bring memory's draws up to the database."""
        for row, counts in self.runner.read(draw_rows):
            self.inventory.draw_changed(DrawState(row, counts), local=False)
            if counts is not None:
                self.inventory.draw_entries_changed(row[0], counts)

    def _step(self):
        """Read the draws, open and run those due, send the counts; then
        wait for the next moment (at most DRAW_IDLE) or a peer's news."""
        self._wake.clear()
        try:
            # While the database is away (the runner's probe says when it
            # is back), a look would only queue for a connection that
            # purchases need the moment it returns.
            if self.runner.state == 'ok':
                self.look()
                self._advance(utcnow())
        except DB_AWAY as e:
            logger.warning('draws: the database is away: %s', e)
        self._send_counts()
        self._wake.wait(self._rest(utcnow()))

    def _advance(self, now):
        for product in list(self.inventory.products.values()):
            draw = product.draw
            if draw is None:
                continue
            if draw.state == 'scheduled' and draw.opens_at <= now:
                self._open(product.id)
            elif (draw.state == 'open' and draw.closes_at <= now
                  and not self.inventory.paused):
                self._draw(product.id)

    def _rest(self, now):
        """Seconds until the next look: none while a draw is open."""
        draws = [p.draw for p in list(self.inventory.products.values())
                 if p.draw is not None and p.draw.state != 'drawn']
        if any(d.state == 'open' for d in draws):
            return 0.0
        moments = [(d.opens_at - now).total_seconds() for d in draws]
        return max(0.0, min([DRAW_IDLE - DRAW_TICK] + moments))

    def _open(self, product_id):
        opened = self.writes.write(open_draw, product_id)
        if opened:
            logger.info('opened the draw of product %d', product_id)
        self._reload(product_id, local=opened)

    def reload(self, product_id):
        """A product's draw as the database has it now (None: none)."""
        return self._reload(product_id, local=False)

    def _reload(self, product_id, local):
        for row, counts in self.runner.run(draw_rows, product_id):
            self.inventory.draw_changed(DrawState(row, counts), local=local)
        return self.inventory.products[product_id].draw

    def _draw(self, product_id):
        """Claim a closed draw and run it (another node's live claim:
        leave it to that node)."""
        claims = self.writes.write(claim_draw, product_id, self.node,
                                   utcnow(), DRAW_CLAIM_TTL)
        if not claims:
            return
        hold = self._hold if self.hold and claims == 1 else None
        started = time.perf_counter()
        deadline = time.monotonic() + DRAW_DEADLINE
        # Its own transaction, not a batch's: a big draw must not make
        # the purchases of a batch miss their deadline, nor they it.
        done = self.runner.run(run_draw, product_id, self.node, deadline,
                               hold, deadline=deadline + DB_DEADLINE_MARGIN)
        if done is None:
            return
        stock, [(row, counts)] = done
        for item_id, (count, version) in stock.items():
            self.inventory.item_changed(item_id, count, version)
        draw = DrawState(row, counts)
        logger.info('drew product %d (claim %d): %d winners among %d '
                    'entries in %.1f ms', product_id, claims,
                    len(draw.winners), sum(counts.values()),
                    (time.perf_counter() - started) * 1000)
        self.inventory.draw_changed(draw)

    def _hold(self):
        """Tests only: hang just before the first claim's COMMIT, and say
        so, until the process is killed."""
        logger.warning('draw: holding before COMMIT '
                       '(SNEAKERS23_TEST_HOLD_DRAW)')
        gevent.event.Event().wait()

    def _send_counts(self):
        """A `draw` event per product whose draw changed since its last
        one: at most one per DRAW_TICK, however many entries came (a draw
        not open yet: a `scheduled` event, its opening's countdown)."""
        for product in list(self.inventory.products.values()):
            draw = product.draw
            now_shown = draw and (draw.state, draw.counts())
            last = self._sent.get(product.id)
            if draw is None or last == now_shown:
                continue
            self._sent[product.id] = now_shown
            if draw.state == 'scheduled':
                self.hub.publish('scheduled', product.id, {
                    'product_id': product.id,
                    'release_at': iso_moment(draw.opens_at)})
            else:
                self.hub.publish('draw', product.id, draw_event(
                    product, html=last is None or last[0] != draw.state))


# ---------------------------------------------------------------------------
# Web: the Bottle app
# ---------------------------------------------------------------------------

def sign(value, key):
    """`value.signature` with an HMAC-SHA256 of `value`."""
    mac = hmac.new(key.encode(), value.encode(), hashlib.sha256)
    return f'{value}.{mac.hexdigest()[:32]}'


def unsign(signed, key):
    """The value of a signed cookie, or None when the signature is wrong
    (whatever bytes the browser sent: compared as UTF-8 bytes)."""
    value, _, _ = (signed or '').rpartition('.')
    if value and hmac.compare_digest(sign(value, key).encode(),
                                     signed.encode(errors='replace')):
        return value
    return None


def price(cents):
    """Price for people: 12000 -> "$120.00"."""
    return f'${cents / 100:,.2f}'


def release_free_memory():
    """Give freed heap pages back to the system (glibc's malloc_trim).

    After 20,000 slow connections left, a node kept 200 MB of freed
    memory (greenlet stacks, socket buffers) that glibc would not return
    by itself; trimming brings it back near where it started.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        return libc if hasattr(libc, 'malloc_trim') else None  # glibc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def token_hash(token):
    return hashlib.sha256(token.encode()).hexdigest()


def admin_token(config):
    """(sha-256 of the admin token, what `serve` prints about it).

    SNEAKERS23_ADMIN_TOKEN wins. Without it the store keeps one token:
    its hash in the database (so every node checks the same one), the
    token itself in an owner-only file (TOKEN_FILE) for the command line.
    """
    if config.admin_token:
        return token_hash(config.admin_token), ''
    stored = Setting.read('admin_token_sha256')
    kept = _read_token_file()
    if stored and kept and token_hash(kept) == stored:
        return stored, f'admin token (kept in {TOKEN_FILE}): {kept}'
    if stored:
        return stored, ('admin token: the one this store made before; it '
                        'is not in ' + TOKEN_FILE + ' here: set '
                        'SNEAKERS23_ADMIN_TOKEN')
    token = secrets.token_urlsafe(24)
    Setting.insert(key='admin_token_sha256', value=token_hash(token)) \
        .on_conflict_ignore().execute()
    if Setting.read('admin_token_sha256') != token_hash(token):
        return admin_token(config)   # another node made one at once
    where = _write_token_file(token)
    return token_hash(token), (f'admin token ({where}; set '
                               f'SNEAKERS23_ADMIN_TOKEN to choose one): '
                               f'{token}')


def _read_token_file():
    try:
        with open(TOKEN_FILE) as f:
            return f.read().strip()
    except OSError:
        return ''


def _write_token_file(token):
    """Keep the token for the next start and the command line."""
    try:
        os.makedirs(os.path.dirname(TOKEN_FILE) or '.', exist_ok=True)
        fd = os.open(TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o600)
        with os.fdopen(fd, 'w') as f:
            f.write(token + '\n')
        os.chmod(TOKEN_FILE, 0o600)
        return f'kept in {TOKEN_FILE}'
    except OSError as e:
        logger.warning('cannot keep the admin token in %s: %s', TOKEN_FILE,
                       e.strerror)
        return 'not kept: write it down'


def freeze_the_living():
    """Collect garbage rarely, and never what lives now.

    A collection holds the hub while it walks the objects. During a drop
    the defaults (a young collection every 700 allocations) ran dozens a
    second, and every few seconds a full one walked modules, catalogue
    and caches too: 44-88 ms at a time. What lives once started (it lives
    as long as the process) is frozen out of every collection, and a
    young collection waits for GC_THRESHOLDS[0] allocations (most objects
    of a request die before): one full collection of 31-43 ms was left in
    a drop (bench/run.py drop, the node's gc.callbacks).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def own_rss():
    """This process's resident memory in bytes, or None (not Linux)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_stats():
    """This process's resident memory and open files (Linux)."""
    try:
        fds = len(os.listdir('/proc/self/fd'))
    except OSError:  # not Linux
        fds = None
    return {'rss_bytes': own_rss(), 'open_fds': fds}


def count_greenlets():
    """Live greenlets: a walk over every tracked object (milliseconds on
    a big heap, so /healthz does it at most every 10 s)."""
    return sum(1 for o in gc.get_objects()
               if isinstance(o, greenlet.greenlet))


class TokenBuckets:
    """Per-key token buckets: `take(key)` is 0 when allowed, else the
    seconds to wait. Full buckets are forgotten (bounded memory)."""

    def __init__(self, capacity, per_second):
        self.capacity, self.per_second = capacity, per_second
        self._buckets = {}   # key -> (tokens, when)

    def take(self, key, now=None):
        now = time.monotonic() if now is None else now
        tokens, when = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - when) * self.per_second)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.per_second
        self._buckets[key] = (tokens - 1, now)
        return 0.0

    def blocked(self, key, now=None):
        """Seconds until `key` has a token again (0: it has one)."""
        now = time.monotonic() if now is None else now
        tokens, when = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - when) * self.per_second)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.per_second

    def forget_full(self, now=None):
        now = time.monotonic() if now is None else now
        full = [key for key, (tokens, when) in self._buckets.items()
                if tokens + (now - when) * self.per_second >= self.capacity]
        for key in full:
            del self._buckets[key]


class ClientLimits:
    """What one client IP may do: purchase attempts per second, pairs
    per product, wrong admin tokens. Trusted IPs skip the first two."""

    def __init__(self, config):
        self.pairs_limit = config.ip_pairs
        self.trusted = frozenset(config.trusted_ips)
        self.proxies = frozenset(config.proxies)
        self.attempts = TokenBuckets(max(1, config.ip_rate), config.ip_rate)
        self.admin_failures = TokenBuckets(ADMIN_FAILURES, 1 / ADMIN_REFILL)
        self.lookups = TokenBuckets(ORDER_LOOKUPS, ORDER_LOOKUPS)
        self.pairs = {}   # (ip, product_id) -> pairs bought or in flight
        self.entrants = {}   # (ip, product_id) -> shoppers who entered

    def client_ip(self, environ):
        """The client's address; X-Forwarded-For only from a proxy."""
        ip = environ.get('REMOTE_ADDR', '')
        if ip not in self.proxies:
            return ip
        hops = environ.get('HTTP_X_FORWARDED_FOR', '').split(',')
        for hop in reversed([h.strip() for h in hops if h.strip()]):
            if hop not in self.proxies:
                return hop
        return ip

    def check_purchase(self, ip, product_id):
        """Raise ApiError(429) when `ip` may not try to buy now."""
        if ip in self.trusted:
            return
        wait = self.attempts.take(ip) if self.attempts.per_second else 0
        if wait:
            raise TooMany(math.ceil(wait))
        if self.pairs_limit and (self.pairs.get((ip, product_id), 0)
                                 >= self.pairs_limit):
            raise TooMany(PAIRS_RETRY_AFTER)

    def check_entry(self, ip, product_id, shopper):
        """Raise ApiError(429) when `ip` may not enter a draw now: the
        attempts per second, and at most `--ip-pairs` shoppers per IP
        per draw (changing one's entry is not another shopper)."""
        self.check_attempt(ip)
        if ip in self.trusted:
            return
        shoppers = self.entrants.get((ip, product_id), set())
        if (self.pairs_limit and shopper not in shoppers
                and len(shoppers) >= self.pairs_limit):
            raise TooMany(PAIRS_RETRY_AFTER)

    def check_attempt(self, ip):
        """Raise ApiError(429) when `ip` is over its attempts per second
        (purchases and entries alike)."""
        if ip in self.trusted or not self.attempts.per_second:
            return
        wait = self.attempts.take(ip)
        if wait:
            raise TooMany(math.ceil(wait))

    def entered(self, ip, product_id, shopper):
        """Count `shopper` among the entrants from `ip`."""
        if ip not in self.trusted and self.pairs_limit:
            self.entrants.setdefault((ip, product_id), set()).add(shopper)

    def holding(self, ip, product_id):
        """Count a pair in flight for `ip`; a context that un-counts it
        unless `keep()` was called (the purchase succeeded)."""
        return _PairHold(self.pairs, None if ip in self.trusted
                         or not self.pairs_limit else (ip, product_id))

    def check_lookup(self, ip):
        """429 for an IP that reads its orders too often: each is a
        database read, taken from the pool that purchases use."""
        wait = 0 if ip in self.trusted else self.lookups.take(ip)
        if wait:
            raise TooMany(math.ceil(wait))

    def check_admin(self, ip):
        wait = self.admin_failures.blocked(ip)
        if wait:
            raise TooMany(math.ceil(wait))

    def admin_failed(self, ip):
        self.admin_failures.take(ip)

    def forget_idle(self):
        self.attempts.forget_full()
        self.admin_failures.forget_full()
        self.lookups.forget_full()


class _PairHold:
    def __init__(self, pairs, key):
        self.pairs, self.key, self.kept = pairs, key, False

    def __enter__(self):
        if self.key:
            self.pairs[self.key] = self.pairs.get(self.key, 0) + 1
        return self

    def keep(self):
        self.kept = True

    def __exit__(self, *exc):
        if self.key and not self.kept:
            self.pairs[self.key] -= 1
            if not self.pairs[self.key]:
                del self.pairs[self.key]


class AnswerLog:
    """Counts purchases and refusals by outcome; logs them at INFO once a
    second, so the log stays readable at thousands of requests a second."""

    def __init__(self):
        self.purchases, self.refusals = Counter(), Counter()
        self.purchase_totals = Counter()   # since start, for /metrics
        self.unavailable = Counter()
        self.loop = Loop('answer-log', self._flush, 1.0)

    def start(self):
        self.loop.start()

    def stop(self):
        self.loop.stop()

    def purchase(self, outcome):
        """Count a purchase's answer (a plain tally: a Prometheus counter,
        with its label lookup and lock, cost a tenth of a sold-out
        answer; /metrics reads the totals when scraped)."""
        self.purchases[str(outcome)] += 1
        self.purchase_totals[str(outcome)] += 1

    def refusal(self, path, status, code, reason=''):
        """Count a refused request: a purchase's by its outcome (an error
        code, or the status for a malformed one), others by route."""
        if path == '/api/purchase':
            self.purchase(code if status in (403, 409, 429, 503)
                          else str(status))
        else:
            self.refusals[f'{status} {code} {path[:40]}'] += 1
        if reason:
            self.unavailable[reason] += 1

    def _flush(self):
        for title, counts in (('purchases', self.purchases),
                              ('refused', self.refusals),
                              ('503 unavailable', self.unavailable)):
            if counts:
                summary = ' '.join(f'{k}={n}' for k, n in
                                   sorted(counts.items()))
                counts.clear()
                logger.info('%s in the last second: %s', title, summary)


class Metrics:
    """The node's Prometheus metrics (`GET /metrics`), in a registry of
    its own: purchases by outcome, streams, events, batch sizes, commit
    time, hub lag, replication lag per peer."""

    def __init__(self, node):
        self.registry = registry = prometheus_client.CollectorRegistry()
        self.batch_size = prometheus_client.Histogram(
            'sneakers23_batch_size', 'Writes committed together',
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self.commit_seconds = prometheus_client.Histogram(
            'sneakers23_commit_seconds', 'Time to commit one batch',
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 3),
            registry=registry)
        registry.register(_NodeGauges(node))

    def committed(self, size, seconds):
        self.batch_size.observe(size)
        self.commit_seconds.observe(seconds)

    def exposition(self):
        return prometheus_client.generate_latest(self.registry)


class _NodeGauges:
    """Values read from the node at each scrape."""

    def __init__(self, node):
        self.node = node

    def collect(self):
        node, metric = self.node, prometheus_client.metrics_core
        purchases = metric.CounterMetricFamily(
            'sneakers23_purchases', 'Purchase answers by outcome',
            labels=['outcome'])
        for outcome, count in sorted(node.answers.purchase_totals.items()):
            purchases.add_metric([outcome], count)
        yield purchases
        yield metric.GaugeMetricFamily(
            'sneakers23_sse_streams', 'Open SSE streams',
            value=node.hub.open_streams)
        events = metric.CounterMetricFamily(
            'sneakers23_sse_events', 'SSE events published', labels=['event'])
        for name, count in sorted(node.hub.published.items()):
            events.add_metric([name], count)
        yield events
        yield metric.CounterMetricFamily(
            'sneakers23_sse_cut_off', 'SSE streams cut off',
            value=node.hub.cut_off)
        yield metric.GaugeMetricFamily(
            'sneakers23_hub_lag_seconds', 'Worst hub lateness, last 10 s',
            value=node.lag.stats()['max_10s'] / 1000)
        yield metric.GaugeMetricFamily(
            'sneakers23_paused', '1 while sales are paused',
            value=int(node.inventory.paused))
        lag = metric.GaugeMetricFamily(
            'sneakers23_replication_lag_seconds',
            'Time since the last message of each peer', labels=['peer'])
        for name, peer in (node.replicator.health().items()
                           if node.replicator else ()):
            if peer['lag_ms'] is not None:
                lag.add_metric([name], peer['lag_ms'] / 1000)
        yield lag


def _product_overview(product, sales):
    """One product's line of the overview (`sales` from order_counts)."""
    sold, recent = (None, None) if sales is None else sales.get(
        product.id, (0, 0))
    return {'id': product.id, 'sku': product.sku, 'state': product.state,
            'release_at': iso_moment(product.moment), 'sold': sold,
            'left': sum(item.count for item in product.items),
            'sales_per_s': None if recent is None
            else round(recent / SALES_WINDOW, 2),
            **({'draw': product.draw.as_json()} if product.draw else {})}


class Node:
    """One running store node: database, memory, events, web app."""

    def __init__(self, config):
        self.config = config
        self.database = open_database(config.db_url)
        db.initialize(self.database)
        self.runner = DatabaseRunner(self.database)
        self.inventory = Inventory()
        if FAN_OUT not in ('process', 'inline'):
            raise ConfigError("SNEAKERS23_FAN_OUT is 'process' or "
                              f"'inline', not {FAN_OUT!r}")
        self.hub = (FanOutProcess if FAN_OUT == 'process'
                    else EventHub)(self.inventory)
        self.inventory.listen(self.hub.on_inventory)
        self.dashboards = DashboardHub(self.inventory, self.dashboard_view,
                                       self.sales_history)
        self.writes = WritePath(self.runner, self.inventory, config.node)
        self.scheduler = Scheduler(self.inventory, self.writes)
        self.draws = DrawKeeper(config, self.runner, self.inventory,
                                self.writes, self.hub)
        self.replicator = None
        if config.replication:
            self.replicator = Replicator(config, self.inventory, self.writes)
            self.replicator.presence = self.presence
            self.replicator.draw_touched = self.draws.touched
        self.cookie_key = ''
        self.admin_hash, self.token_note = token_hash(secrets.token_hex()), ''
        self.lag = LagProbe()
        self.limits = ClientLimits(config)
        self.metrics = Metrics(self)
        self.writes.committed = self.metrics.committed
        self.answers = AnswerLog()
        self.housekeeping = Loop('housekeeping', self._housekeep,
                                 HOUSEKEEPING_INTERVAL)
        self._cache = {}

    def start(self):
        """Prepare the database, load memory, start background work."""
        self.writes.start()
        self.runner.run(self._prepare_database,
                        deadline=time.monotonic() + 60)
        self.writes.load()
        self.hub.start()
        self.dashboards.start()
        if self.replicator:
            self.replicator.start()
        for loop in (self.lag, self.answers, self.housekeeping,
                     self.scheduler, self.draws):
            loop.start()
        freeze_the_living()
        # How long another thread of the node (the SQLite COMMIT thread)
        # waits for the GIL before the hub must hand it over. At 1 ms
        # instead of 5, 8 interleaved pairs of bench/run.py drop gave (the
        # median of the runs) worst hub lag 34 ms against 59, purchase p99
        # 194 ms against 225, 3,361 purchases/s against 2,875, and the
        # same fan-out figures.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)

    def stop(self):
        """Stop every loop and wait for them (a loop caught inside a
        database call must let go of its connection first: psycopg2
        deadlocks closing a connection another greenlet is using), then
        close streams, sockets and the database."""
        loops = [loop for name, loop in self.loops().items()
                 if name != 'sqlite-writer']   # it closes SQLite last
        for loop in loops:
            loop.stop()
        gevent.joinall([loop.greenlet for loop in loops if loop.greenlet],
                       timeout=2)
        if self.replicator:
            self.replicator.stop()
        self.hub.stop()
        self.dashboards.stop()
        self.writes.stop()

    def loops(self):
        """Every background loop of the node, by name."""
        parts = [self.runner, self.writes, self.hub, self.dashboards,
                 self.replicator]
        loops = [loop for part in parts if part for loop in part.loops]
        loops += [self.lag.loop, self.answers.loop, self.housekeeping,
                  self.scheduler.loop, self.draws.loop]
        return {loop.name: loop for loop in loops}

    def health(self):
        """What `/healthz` shows; `ok` is False when a loop died."""
        peers = self.replicator.health() if self.replicator else {}
        loops = {name: loop.state for name, loop in self.loops().items()}
        return {'node': self.config.node, 'db': redact(self.config.db_url),
                'db_state': self.runner.state,
                'ok': 'dead' not in loops.values(),
                'paused': self.inventory.paused,
                'peers': peers, 'streams': self.hub.open_streams,
                'sse_cut_off': self.hub.cut_off,
                'fan_out': self.hub.describe(),
                'products': len(self.inventory.products),
                'event_id': self.hub.last_event_id,
                'hub_lag_ms': self.lag.stats(), 'loops': loops,
                'now': datetime.now(UTC).isoformat(timespec='milliseconds')
                .replace('+00:00', 'Z'),
                # Counting 10,000 open fds in /proc costs milliseconds:
                # at most every 5 s (it was 4% of a drop, polled at 2 Hz).
                'process': {**self.cached('process',
                                          int(time.monotonic() // 5),
                                          process_stats),
                            'greenlets': self.cached(
                                'greenlets', int(time.monotonic() // 10),
                                count_greenlets)}}

    def presence(self):
        """This node's figures for the overview, sent to its peers with
        every heartbeat."""
        peers = self.replicator.health() if self.replicator else {}
        return {'streams': self.hub.open_streams,
                'watching': {str(pid): n for pid, n
                             in sorted(self.hub.watching().items()) if n},
                'hub_lag_ms': self.lag.stats()['max_10s'],
                'peers': {name: peer['state']
                          for name, peer in peers.items()},
                'peer_lag_ms': {name: peer['lag_ms']
                                for name, peer in peers.items()},
                'db': self.runner.state}

    def overview(self, fresh=False):
        """The operator's view of the whole store: every live node of the
        cluster, every product with what it sold (read from the database
        at most once a second, or now when `fresh`)."""
        nodes = {self.config.node: self.presence()}
        now = time.monotonic()
        for name, state in (self.replicator.peers.items()
                            if self.replicator else ()):
            if state.presence and now - state.presence_at < PRESENCE_FRESH:
                nodes[name] = state.presence
        sales = (self._order_counts() if fresh
                 else self.cached('sales', int(now), self._order_counts))
        return {'paused': self.inventory.paused,
                'nodes': dict(sorted(nodes.items())),
                'products': [_product_overview(p, sales)
                             for p in self.inventory.ordered()]}

    def dashboard_view(self):
        """The overview as the dashboard shows it each second: sold read
        now (its rate is taken between two of these), and every product's
        name, price and sizes."""
        view = self.overview(fresh=True)
        for entry in view['products']:
            product = self.inventory.products[entry['id']]
            entry.update(name=product.name, price_cents=product.price_cents,
                         items=[item.as_json() for item in product.items])
        view['now'] = iso_moment(utcnow().replace(microsecond=0))
        return view

    def sales_history(self):
        """Pairs sold per product per second over the last
        DASHBOARD_HISTORY seconds, from the orders (empty while the
        database is away)."""
        now = int(time.time())
        since = utcnow() - timedelta(seconds=DASHBOARD_HISTORY)
        try:
            rows = self.runner.read(recent_sales, since)
        except DB_AWAY:
            rows = []
        series = defaultdict(Counter)
        for product_id, created in rows:
            second = int(created.replace(tzinfo=UTC).timestamp())
            series[str(product_id)][second] += 1
        return {'now': now, 'step_s': 1,
                'series': {pid: sorted(counts.items())
                           for pid, counts in series.items()}}

    def _order_counts(self):
        since = utcnow() - timedelta(seconds=SALES_WINDOW)
        try:
            return self.runner.run(order_counts, since)
        except DB_AWAY:
            return None   # sold unknown while the database is away

    def _housekeep(self):
        self.limits.forget_idle()
        self.hub.cut_stalled()
        self.dashboards.cut_stalled()
        release_free_memory()

    def _prepare_database(self):
        try:
            self._create_and_seed()
        except IntegrityError:
            if not Product.table_exists():
                raise
            logger.info('another node prepared the database at once')
        install_deadline_trigger()
        self.cookie_key = Setting.get_or_make(
            'cookie_key', lambda: secrets.token_hex(32))
        self.admin_hash, self.token_note = admin_token(self.config)

    def _create_and_seed(self):
        if not self.config.seed_when_empty:
            return create_tables()
        count = seed(self.config.catalog)
        if count:
            logger.info('seeded %d products from %s', count,
                        self.config.catalog)

    def cached(self, name, key, make):
        """`make()` once per value of `key`."""
        made_for, body = self._cache.get(name, (None, None))
        if made_for != key:
            body = make()
            self._cache[name] = (key, body)
        return body

    def page(self):
        """The catalogue page, rendered once per event (what it shows)."""
        return self.cached('page', self.hub.last_event_id, lambda: render(
            'index', products=self.inventory.ordered(), price=price,
            iso=iso_moment, paused=self.inventory.paused,
            event_id=self.hub.last_event_id).encode())

    def products_json(self):
        """`/api/products` as bytes, rebuilt from per-product parts."""
        return self.cached('products', self.inventory.revision,
                           lambda: b'[' + b','.join(
            p.json_bytes() for p in self.inventory.ordered()) + b']')


def json_response(status, data, **headers):
    """Answer JSON with `status`, keeping headers set so far (cookies)."""
    bottle.response.status = status
    bottle.response.content_type = 'application/json'
    for name, value in headers.items():
        bottle.response.set_header(name, value)
    return json.dumps(data)


def json_body(required_type=dict):
    """The request's JSON object, or an ApiError saying what is wrong.

    Read from the WSGI environ: Bottle's `request.body` copies the body
    into a buffer first, a third of the cost of a sold-out answer.
    """
    environ = bottle.request.environ
    ctype = environ.get('CONTENT_TYPE', '').partition(';')[0]
    if ctype.strip().lower() != 'application/json':
        raise ApiError(415, 'content type must be application/json')
    length = environ.get('CONTENT_LENGTH') or '0'
    if not length.isdigit():
        raise ApiError(400, 'bad Content-Length')
    if int(length) > MAX_BODY:
        raise ApiError(413, 'body too large')
    raw = _read_body(environ['wsgi.input'])
    if len(raw) > MAX_BODY:
        raise ApiError(413, 'body too large')
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: [[[[...
        raise ApiError(400, 'malformed JSON') from None
    if not isinstance(data, required_type):
        raise ApiError(400, 'body must be a JSON object')
    return data


def _read_body(stream):
    """Up to MAX_BODY + 1 bytes of a body, within HEADER_TIMEOUT."""
    try:
        with gevent.Timeout(HEADER_TIMEOUT, RequestTimeout()):
            return stream.read(MAX_BODY + 1)
    except RequestTimeout:
        raise ApiError(408, 'request_timeout') from None
    except (OSError, ValueError):  # a broken chunked body, a reset
        # where the next request starts is unknown: close the connection
        raise ApiError(400, 'bad_request', Connection='close') from None


def positive_int(data, key, limit=2**53):
    """`data[key]` as an int in 1..limit, or an ApiError."""
    value = data.get(key)
    if type(value) is not int:
        raise ApiError(400, f'{key} must be an integer')
    if not 0 < value <= limit:
        raise ApiError(400, f'{key} must be between 1 and {limit}')
    return value


def product_filter(text):
    """`?products=1,2` as a set of ids, or None for every product."""
    if not text:
        return None
    parts = [part.strip() for part in text.split(',') if part.strip()]
    if not all(ascii_id(part) for part in parts):
        raise ApiError(400, 'products must be a comma-separated list of '
                            'ids')
    return frozenset(int(part) for part in parts)


def ascii_id(text):
    """Whether `text` is an id: ASCII digits only (not "١"), 1-18 long."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def api_errors(node):
    """Bottle plugin: an ApiError (or Unavailable, or a database error)
    becomes its JSON answer, counted for the once-a-second log."""
    def plugin(callback):
        def wrapper(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except ApiError as e:
                node.answers.refusal(bottle.request.path, e.status, e.code)
                return json_response(e.status, {'error': e.code},
                                     **e.headers)
            except DB_AWAY as e:
                # a database that failed a read is away, not a 500; a
                # COMMIT sent and its answer lost: say so, never guess
                code = ('outcome_unknown' if isinstance(e, OutcomeUnknown)
                        else 'unavailable')
                node.answers.refusal(bottle.request.path, 503, code, str(e))
                return json_response(503, {'error': code},
                                     **{'Retry-After': '1'})
        return wrapper
    return plugin


def error_page(res):
    """Bottle's errors (no route, bad method, crashes) as JSON."""
    if res.status_code >= 500:
        logger.error('%s %s failed: %s', bottle.request.method,
                     bottle.request.path, res.traceback or res.body)
    res.set_header('Content-Type', 'application/json')
    codes = {404: 'not_found', 405: 'method_not_allowed'}
    code = codes.get(res.status_code)
    return json.dumps({'error': code or str(res.body or res.status_line)})


STREAM_REQUEST = 'sneakers23.stream'
DASHBOARD = 'sneakers23.dashboard'   # the stream is a dashboard's


class StreamRequest(NamedTuple):
    """What an accepted `/events` request asked for."""

    products: frozenset | None
    last_event_id: str | None


class RequestTimeout(socket.timeout):
    """The request line, headers or body did not arrive in time."""


def http_error(status, code):
    """A whole HTTP error answer with a JSON body, as raw bytes."""
    body = json.dumps({'error': code}).encode()
    reason = http.client.responses.get(status, 'Error')
    return (f'HTTP/1.1 {status} {reason}\r\n'
            f'Content-Type: application/json\r\n'
            f'Content-Length: {len(body)}\r\n'
            f'Connection: close\r\n\r\n').encode() + body


HTTP_LAYER_ERRORS = {'400': 'bad_request', '408': 'request_timeout',
                     '414': 'uri_too_long', '500': 'internal_error'}


MAX_HEADER_LINE, MAX_HEADERS = 65536, 100   # http.client's own limits
HEADER_FIELD = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*"
                          r'([^\r\n]*?)[ \t]*\r?\n')


class RequestHeaders:
    """A request's header fields, as pywsgi's handler reads them.

    http.client.parse_headers (the email package) took a quarter of a
    small request's time. A line that is not `name: value` (a space
    before the colon, a folded line, a name with odd characters, a CR
    inside the value) makes the request a 400, as RFC 9112 asks.
    """

    def __init__(self, rfile):
        self.fields, self.status = [], ''
        while True:
            line = rfile.readline(MAX_HEADER_LINE + 1)
            if line in (b'\r\n', b'\n', b''):
                return
            if len(line) > MAX_HEADER_LINE:
                self.status = 'Line too long'
                return
            match = HEADER_FIELD.fullmatch(line.decode('latin-1'))
            if match is None or len(self.fields) == MAX_HEADERS:
                self.status = 'Bad header field'
                return
            self.fields.append(match.groups())

    def get(self, name, default=None):
        name = name.lower()
        return next((v for k, v in self.fields if k.lower() == name),
                    default)

    getheader = get

    def get_all(self, name, default=None):
        name = name.lower()
        return [v for k, v in self.fields if k.lower() == name] or default

    def __delitem__(self, name):
        self.fields = [(k, v) for k, v in self.fields
                       if k.lower() != name.lower()]

    @property
    def typeheader(self):
        return self.get('content-type')


class Handler(WSGIHandler):
    """pywsgi's handler, which gives an accepted SSE request to the hub.

    The hub writes to the socket itself from then on, so a stream costs no
    greenlet, no WSGI iterator and no chunked framing: the same bytes go
    to every stream (the response ends when the connection closes).

    Also: the request line and headers must arrive within HEADER_TIMEOUT
    (slowloris), and the errors pywsgi answers itself are JSON too.
    """

    _header_timer = None

    def handle(self):
        """pywsgi's, with one header timer for the whole connection (a
        gevent.Timeout made per request cost 4% of a small answer)."""
        try:
            super().handle()
        finally:
            # Dropped at the end: timer -> its exception -> traceback ->
            # frames -> this handler would be a cycle per timed-out
            # connection, freed only by a full gc (80 MB after 15,000).
            if self._header_timer is not None:
                self._header_timer.close()
                self._header_timer = None

    def handle_one_request(self):
        if self._header_timer is None:
            self._header_timer = gevent.Timeout(HEADER_TIMEOUT,
                                                RequestTimeout())
        self._header_timer.start()
        try:
            result = super().handle_one_request()
        finally:
            self._header_timer.cancel()
        if isinstance(result, tuple):  # an error pywsgi answers itself
            status = result[0]
            code = HTTP_LAYER_ERRORS.get(status, 'error')
            self.server.application.node.answers.refusal(
                '(HTTP layer)', status, code)
            return status, http_error(int(status), code)
        return result

    def read_request(self, raw_requestline):
        try:
            if len(raw_requestline.split()) != 3:
                return False  # HTTP/0.9, or a line cut by a bare LF: 400
            return (super().read_request(raw_requestline)
                    and self._framing_is_clear())
        finally:
            self._header_timer.cancel()

    def MessageClass(self, rfile, *args):
        """The request's headers, kept as sent (pywsgi drops a
        Content-Length beside chunked before we could see it)."""
        headers = RequestHeaders(rfile)
        self._framing = (headers.get_all('Content-Length') or [],
                         headers.get_all('Transfer-Encoding') or [])
        return headers

    def _headers(self):
        """The request's headers as WSGI keys; a name with `_` in it is
        dropped (X_Forwarded_For must not pass for X-Forwarded-For)."""
        for name, value in self.headers.fields:
            key = name.upper().replace('-', '_')
            if '_' not in name and key not in ('CONTENT_TYPE',
                                               'CONTENT_LENGTH'):
                yield 'HTTP_' + key, value

    _date = (0, b'')

    def finalize_headers(self):
        """pywsgi's, with the Date header formatted once a second."""
        if self.provided_date is None:
            now = int(time.time())
            if Handler._date[0] != now:
                Handler._date = (now, format_date_time(now))
            self.provided_date = Handler._date[1]
            self.response_headers.append((b'Date', self.provided_date))
        super().finalize_headers()

    def _write_with_headers(self, data):
        """The status line, headers and a small body in one send (pywsgi
        sends the body apart: two segments, two wake-ups per answer)."""
        self.headers_sent = True
        self.finalize_headers()
        head = self._head()
        if self.response_use_chunked or len(data) > SO_SNDBUF:
            self._sendall(head)
            self._write(data)
        else:
            self._sendall(head + data)

    def _head(self):
        lines = [b'HTTP/1.1 ' + self.status]
        lines += [name + b': ' + value
                  for name, value in self.response_headers]
        return b'\r\n'.join(lines) + b'\r\n\r\n'

    def _sendall(self, data):
        """pywsgi's, without gevent's getsockopt per sendall: the usual
        small answer goes whole in one send."""
        try:
            sent = self.socket.send(data)
            if sent < len(data):
                self.socket.sendall(memoryview(data)[sent:])
        except OSError as ex:
            self.status = f'socket error: {ex}'
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)

    def log_request(self):
        """Not formatted: the node counts its answers itself."""

    def _framing_is_clear(self):
        """False (400, connection closed) when the body's length is
        ambiguous: two Content-Lengths, Content-Length beside
        Transfer-Encoding, or a coding other than chunked. A proxy in
        front may read such a request otherwise (request smuggling)."""
        lengths, coding = self._framing
        if len(lengths) > 1 or (coding and lengths):
            return False
        return not coding or [c.strip().lower() for c in coding] == [
            'chunked']

    def _handle_client_error(self, ex):
        """Counted for the once-a-second log instead of logged one by one
        at ERROR (a flood of garbage would flood the log)."""
        return ('408' if isinstance(ex, RequestTimeout) else '400', None)

    def _send_error_response_if_possible(self, error_code):
        if self.response_length:
            self.close_connection = True
            return
        code = HTTP_LAYER_ERRORS.get(str(error_code), 'error')
        body = json.dumps({'error': code}).encode()
        try:
            self.start_response(
                f'{error_code} {http.client.responses[error_code]}',
                [('Content-Type', 'application/json'),
                 ('Connection', 'close'),
                 ('Content-Length', str(len(body)))])
            self.write(body)
        except OSError:
            self.close_connection = True

    def handle_one_response(self):
        # Yield once per request, between reading it and answering it.
        # A keep-alive client that sends its next request at once finds
        # it already buffered, and pywsgi reads it without yielding: under
        # a flood of GETs one connection held the hub for 680 ms (seen in
        # /healthz hub_lag_ms), delaying every stream. Before the answer,
        # not after: a request woken by its socket is then answered in
        # the hub's callbacks, which it bounds per turn, not among the
        # sockets that became readable, which it does not: the first
        # burst of a drop's 500 buyers held the hub 87 ms so (traced).
        gevent.sleep(0)
        super().handle_one_response()

    def process_result(self):
        wanted = self.environ.get(STREAM_REQUEST)
        if wanted is None or self.code != 200 or self.command != 'GET':
            return super().process_result()
        raw = _socket.socket(fileno=self.socket.detach())
        raw.setblocking(False)
        self.socket, self.close_connection = None, True
        node = self.server.application.node
        hub = node.dashboards if self.environ.get(DASHBOARD) else node.hub
        hub.adopt(raw, wanted)


def make_server(app, host, port):
    """The gevent WSGI server of a node, listening but not serving yet.

    Accepted sockets inherit the listener's options. A fixed send buffer:
    without it Linux grows the buffer of a client that stopped reading to
    4 MB before the hub sees anything pending (and can cut it off).
    """
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SO_SNDBUF)
    # pywsgi sends headers and body in two writes: without NODELAY, Nagle
    # holds the body of a keep-alive answer for the client's delayed ACK.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        listener.bind((host, port))
    except OSError as e:
        listener.close()
        raise ConfigError(f'cannot listen on {host}:{port}: '
                          f'{e.strerror}') from None
    listener.listen(4096)
    return WSGIServer(listener, app, log=None, error_log=logger,
                      handler_class=Handler)


def create_app(config):
    """Build a node and its Bottle app; `app.node` reaches the node."""
    node = Node(config)
    app = bottle.Bottle()
    app.node = node
    app.install(api_errors(node))
    app.default_error_handler = error_page
    _routes(app, node)
    return app


def _routes(app, node):
    """Attach every route of the contract to `app`."""
    app.route('/', 'GET', lambda: _page(node))
    app.route('/api/products', 'GET', lambda: _products(node))
    app.route('/events', 'GET', lambda: _events(node))
    app.route('/api/purchase', 'POST', lambda: _purchase(node))
    app.route('/api/orders', 'GET', lambda: _shopper_orders(node))
    app.route('/admin/api/products/<product_id>/release', 'POST',
              lambda product_id: _release(node, path_id(product_id)))
    app.route('/admin/api/items/<item_id>/restock', 'POST',
              lambda item_id: _restock(node, path_id(item_id)))
    app.route('/admin/api/products/<product_id>/schedule', 'POST',
              lambda product_id: _schedule(node, path_id(product_id)))
    app.route('/admin/api/sales', 'POST', lambda: _sales(node))
    app.route('/admin/api/products/<product_id>/draw', 'POST',
              lambda product_id: _define_draw(node, path_id(product_id)))
    app.route('/api/draws/<product_id>', 'GET',
              lambda product_id: _draw(node, path_id(product_id)))
    app.route('/api/draws/<product_id>/entry', 'POST',
              lambda product_id: _enter(node, path_id(product_id)))
    app.route('/api/draws/<product_id>/entry', 'DELETE',
              lambda product_id: _withdraw(node, path_id(product_id)))
    app.route('/api/entries', 'GET', lambda: _shopper_entries(node))
    app.route('/metrics', 'GET', lambda: _metrics(node))
    app.route('/admin/api/overview', 'GET', lambda: _overview(node))
    app.route('/admin/api/products/<product_id>/orders', 'GET',
              lambda product_id: _orders(node, path_id(product_id)))
    app.route('/admin', 'GET', lambda: _dashboard(node))
    app.route('/admin/session', 'POST', lambda: _sign_in(node))
    app.route('/admin/session', 'DELETE', _sign_out)
    app.route('/admin/events', 'GET', lambda: _dashboard_events(node))
    app.route('/healthz', 'GET', lambda: _health(node))
    app.route('/api/openapi.json', 'GET', _openapi)
    app.route('/static/<path:path>', 'GET', _static)


def path_id(text):
    """An id from a URL path; 404 unless it is ASCII digits."""
    if not ascii_id(text):
        raise ApiError(404, 'not_found')
    return int(text)


def _page(node):
    _shopper(node)  # a shopper is known before their first purchase
    bottle.response.set_header('Cache-Control', 'no-store')
    bottle.response.content_type = 'text/html; charset=utf-8'
    return node.page()


def _products(node):
    bottle.response.content_type = 'application/json'
    return node.products_json()


def _events(node):
    query = bottle.request.query
    products = product_filter(query.get('products'))
    unknown = (products or set()) - node.inventory.products.keys()
    if unknown:
        raise ApiError(404, 'not_found')
    last_id = (_raw_header('HTTP_LAST_EVENT_ID')
               or query.get('last_event_id'))
    bottle.request.environ[STREAM_REQUEST] = StreamRequest(products, last_id)
    return ''  # Handler hands the connection to the hub


def _purchase(node):
    ip = node.limits.client_ip(bottle.request.environ)
    item_id = positive_int(json_body(), 'item_id')
    item = node.inventory.items.get(item_id)
    if item is None:
        raise ApiError(404, 'not_found')
    if not node.inventory.products[item.product_id].released:
        raise ApiError(403, 'not_released')
    if node.inventory.paused:
        raise ApiError(503, 'paused', **{'Retry-After': PAUSED_RETRY_AFTER})
    node.limits.check_purchase(ip, item.product_id)
    if item.count <= 0:
        raise ApiError(409, SOLD_OUT)  # from memory, no database trip
    with node.limits.holding(ip, item.product_id) as hold:
        outcome = node.writes.buy(item, _shopper(node))
        if not isinstance(outcome, Placed):
            raise ApiError(409, outcome)
        hold.keep()
    node.answers.purchase(201)
    return json_response(201, {'order_id': outcome.order_id,
                               'item_id': item.id,
                               'product_id': item.product_id})


def _shopper(node):
    """This request's shopper id; a new shopper gets the cookie."""
    signed = bottle.request.get_cookie(SHOPPER_COOKIE)
    shopper = unsign(signed, node.cookie_key)
    if shopper is None:
        shopper = secrets.token_urlsafe(16)
        # Written by hand: the value is URL-safe, and Bottle's cookie
        # machinery costs more than the rest of a sold-out answer.
        bottle.response.add_header(
            'Set-Cookie', f'{SHOPPER_COOKIE}={sign(shopper, node.cookie_key)}'
            f'; Max-Age={SHOPPER_MAX_AGE}; Path=/; HttpOnly; SameSite=Lax')
    return shopper


def _shopper_orders(node):
    """The cookie's shopper's pairs. A request without a (valid) cookie
    is a shopper with none: `[]`, and no cookie made for it."""
    bottle.response.set_header('Cache-Control', 'no-store')
    shopper = unsign(bottle.request.get_cookie(SHOPPER_COOKIE),
                     node.cookie_key)
    if shopper:
        node.limits.check_lookup(node.limits.client_ip(bottle.request.environ))
    rows = node.runner.read(shopper_orders, shopper) if shopper else []
    return json_response(200, [
        {'order_id': order_id, 'product_id': product_id,
         'item_id': item_id, 'size': size,
         'created_at': iso_moment(created)}
        for order_id, product_id, item_id, size, created in rows])


def _raw_header(name):
    """A request header as WSGI gives it (latin-1), never a decode error."""
    return bottle.request.environ.get(name, '')


def _require_admin(node, session=True):
    """401 without the admin token (or, when `session`, a dashboard
    session); 429 for an IP that guessed too often (even with the right
    token then, so guessing teaches nothing)."""
    ip = node.limits.client_ip(bottle.request.environ)
    node.limits.check_admin(ip)
    header = _raw_header('HTTP_AUTHORIZATION')
    if header:
        scheme, _, token = header.partition(' ')
        if scheme.lower() == 'bearer' and hmac.compare_digest(
                token_hash(token.strip()), node.admin_hash):
            return ip
        _wrong_token(node, ip)
    if not (session and _signed_in(node)):
        raise ApiError(401, 'unauthorized')
    if bottle.request.method not in ('GET', 'HEAD') and not _same_origin():
        logger.info('refused %s %s from %s: a dashboard session from '
                    'another origin', bottle.request.method,
                    bottle.request.path, ip)
        raise ApiError(403, 'cross_origin')
    return ip


def _wrong_token(node, ip):
    node.limits.admin_failed(ip)
    logger.info('refused %s %s from %s: wrong admin token',
                bottle.request.method, bottle.request.path, ip)
    raise ApiError(401, 'unauthorized')


def session_key(node):
    """The key of dashboard sessions: from the store's cookie key and
    the admin token's hash, so a new token signs every session out."""
    return hmac.new(node.cookie_key.encode(), node.admin_hash.encode(),
                    hashlib.sha256).hexdigest()


def _signed_in(node):
    """Whether the request carries a live dashboard session."""
    value = unsign(bottle.request.get_cookie(ADMIN_COOKIE),
                   session_key(node))
    expires, _, _ = (value or '').partition('~')
    return ascii_id(expires) and int(expires) > time.time()


def _same_origin():
    """Whether a cookie-borne write comes from this node's own pages
    (SameSite=Strict alone lets another port of the same host in)."""
    origin = _raw_header('HTTP_ORIGIN')
    host = _raw_header('HTTP_HOST')
    return bool(host) and origin in (f'http://{host}', f'https://{host}')


def _dashboard(node):
    bottle.response.set_header('Cache-Control', 'no-store')
    bottle.response.content_type = 'text/html; charset=utf-8'
    return render('admin', signed_in=_signed_in(node),
                  node_name=node.config.node)


def _sign_in(node):
    """Trade the admin token for a session cookie."""
    ip = node.limits.client_ip(bottle.request.environ)
    node.limits.check_admin(ip)
    token = json_body().get('token')
    if not isinstance(token, str) or not token:
        raise ApiError(400, 'token must be the admin token')
    if not hmac.compare_digest(token_hash(token.strip()), node.admin_hash):
        _wrong_token(node, ip)
    expires = int(time.time()) + ADMIN_SESSION_AGE
    value = sign(f'{expires}~{secrets.token_urlsafe(12)}', session_key(node))
    bottle.response.add_header(
        'Set-Cookie', f'{ADMIN_COOKIE}={value}; Max-Age={ADMIN_SESSION_AGE}'
        '; Path=/admin; HttpOnly; SameSite=Strict')
    logger.info('dashboard sign-in from %s', ip)
    return {'signed_in': True}


def _sign_out():
    bottle.response.add_header(
        'Set-Cookie', f'{ADMIN_COOKIE}=; Max-Age=0; Path=/admin; HttpOnly; '
        'SameSite=Strict')
    return {'signed_in': False}


def _dashboard_events(node):
    _require_admin(node)
    environ = bottle.request.environ
    environ[STREAM_REQUEST] = StreamRequest(None, None)
    environ[DASHBOARD] = True
    return ''  # Handler hands the connection to the dashboards' hub


def _release(node, product_id):
    ip = _require_admin(node)
    if product_id not in node.inventory.products:
        raise ApiError(404, 'not_found')
    if node.inventory.products[product_id].draw is not None:
        raise ApiError(409, 'draw')   # sold by its draw, not first come
    changed = node.writes.release(product_id)
    sku = node.inventory.products[product_id].sku
    logger.info('released product %d (%s) for %s%s', product_id, sku, ip,
                '' if changed else ': it already was')
    return {'product_id': product_id, 'released': True, 'changed': changed}


def _restock(node, item_id):
    ip = _require_admin(node)
    count = positive_int(json_body(), 'count', MAX_RESTOCK)
    if item_id not in node.inventory.items:
        raise ApiError(404, 'not_found')
    total = node.writes.restock(item_id, count)
    if total is None:  # the item is there: the count would not fit
        logger.info('refused to restock item %d by %d for %s: past %d '
                    'pairs', item_id, count, ip, MAX_STOCK)
        raise ApiError(409, 'too_many')
    logger.info('restocked item %d with %d pairs for %s: %d now',
                item_id, count, ip, total)
    return {'item_id': item_id, 'count': total, 'level': level_of(total)}


def _schedule(node, product_id):
    ip = _require_admin(node)
    body = json_body()
    if 'at' not in body:
        raise ApiError(400, 'at must be an ISO 8601 moment with a zone, '
                            'or null')
    at = None
    if body['at'] is not None:
        try:
            at = parse_moment(body['at'])
        except ValueError:
            raise ApiError(400, 'at must be an ISO 8601 moment with a '
                                'zone, or null') from None
    product = node.inventory.products.get(product_id)
    if product is None:
        raise ApiError(404, 'not_found')
    if product.released:
        raise ApiError(409, 'already_released')
    if product.draw is not None:
        raise ApiError(409, 'draw')
    if at is not None and at <= utcnow():
        raise ApiError(409, 'in_the_past')
    if not node.writes.schedule(product_id, at):
        raise ApiError(409, 'already_released')  # released meanwhile
    logger.info('%s product %d (%s) for %s', f'scheduled {iso_moment(at)}'
                if at else 'unscheduled', product_id, product.sku, ip)
    return {'product_id': product_id, 'release_at': iso_moment(at),
            'scheduled': at is not None}


def _sales(node):
    ip = _require_admin(node)
    paused = json_body().get('paused')
    if type(paused) is not bool:
        raise ApiError(400, 'paused must be true or false')
    node.writes.pause_sales(paused)
    logger.info('%s sales for %s', 'paused' if paused else 'resumed', ip)
    return {'paused': paused}


def _moment_field(body, key):
    """`body[key]`: an ISO 8601 moment with a zone, or an ApiError."""
    try:
        return parse_moment(body.get(key))
    except ValueError:
        raise ApiError(400, f'{key} must be an ISO 8601 moment with a '
                            'zone') from None


def _define_draw(node, product_id):
    """Release a product as a draw: entries from `at` (default now)
    until `closes`, then the draw."""
    ip = _require_admin(node)
    body = json_body()
    closes = _moment_field(body, 'closes')
    at = None if body.get('at') is None else _moment_field(body, 'at')
    if at is not None and closes <= at:
        raise ApiError(400, 'closes must be after at')
    product = node.inventory.products.get(product_id)
    if product is None:
        raise ApiError(404, 'not_found')
    if product.released:
        raise ApiError(409, 'already_released')
    if product.draw is not None:
        raise ApiError(409, 'draw_exists')
    now = utcnow()
    if closes <= now or (at is not None and at <= now):
        raise ApiError(409, 'in_the_past')
    draw = node.draws.define(product_id, at or now, closes)
    if draw is None:   # released or made a draw meanwhile, elsewhere
        raise ApiError(409, 'draw_exists')
    logger.info('product %d (%s) is a draw from %s to %s for %s',
                product_id, product.sku, iso_moment(draw.opens_at),
                iso_moment(draw.closes_at), ip)
    return {'product_id': product_id, 'state': product.state,
            'opens_at': iso_moment(draw.opens_at),
            'closes_at': iso_moment(draw.closes_at),
            'commitment': draw.commitment}


def _open_draw(node, product_id):
    """A product's draw while it takes entries; 404 or 409 otherwise.
    A draw this node does not know open yet is read from the database
    (a peer's news may still be on its way)."""
    product = node.inventory.products.get(product_id)
    if product is None:
        raise ApiError(404, 'not_found')
    draw = product.draw
    if draw is None or draw.state == 'scheduled':
        draw = node.draws.reload(product_id)
    if draw is None:
        raise ApiError(404, 'not_found')
    if not draw.takes_entries(utcnow()):
        raise ApiError(409, DRAW_CLOSED)
    return draw


def _enter(node, product_id):
    ip = node.limits.client_ip(bottle.request.environ)
    item_id = positive_int(json_body(), 'item_id')
    item = node.inventory.items.get(item_id)
    if item is None or item.product_id != product_id:
        raise ApiError(404, 'not_found')
    shopper = _shopper(node)
    node.limits.check_entry(ip, product_id, shopper)
    draw = _open_draw(node, product_id)
    if not draw.pairs.get(item_id):
        raise ApiError(409, SOLD_OUT)   # the draw has no pair of it
    entry_id = node.draws.enter(product_id, item_id, shopper)
    if entry_id == DRAW_CLOSED:
        raise ApiError(409, DRAW_CLOSED)
    node.limits.entered(ip, product_id, shopper)
    return {'entry_id': entry_id, 'item_id': item_id,
            'product_id': product_id}


def _withdraw(node, product_id):
    node.limits.check_attempt(node.limits.client_ip(bottle.request.environ))
    _open_draw(node, product_id)
    shopper = unsign(bottle.request.get_cookie(SHOPPER_COOKIE),
                     node.cookie_key)
    outcome = node.draws.withdraw(product_id, shopper) if shopper \
        else NO_ENTRY
    if outcome == DRAW_CLOSED:
        raise ApiError(409, DRAW_CLOSED)
    if outcome == NO_ENTRY:
        raise ApiError(404, 'not_found')
    return {'product_id': product_id, 'withdrawn': True}


def _draw(node, product_id):
    document = node.draws.document(product_id)
    if document is None:
        raise ApiError(404, 'not_found')
    bottle.response.set_header('Cache-Control', 'no-store')
    return document


def _shopper_entries(node):
    """The cookie's shopper's draw entries (`[]` without a cookie)."""
    bottle.response.set_header('Cache-Control', 'no-store')
    shopper = unsign(bottle.request.get_cookie(SHOPPER_COOKIE),
                     node.cookie_key)
    rows = node.runner.read(shopper_entries, shopper) if shopper else []
    return json_response(200, [
        {'entry_id': entry_id, 'product_id': product_id,
         'item_id': item_id, 'size': size}
        for entry_id, product_id, item_id, size in rows])


def _orders(node, product_id):
    """A drop's orders, for `report` (no shopper ids: not needed)."""
    _require_admin(node)
    product = node.inventory.products.get(product_id)
    if product is None:
        raise ApiError(404, 'not_found')
    rows = node.runner.read(product_orders, product_id)
    return {'product_id': product_id, 'sku': product.sku,
            'state': product.state,
            'release_at': iso_moment(product.release_at),
            'left': sum(item.count for item in product.items),
            'orders': [{'order_id': order_id, 'item_id': item_id,
                        'size': size, 'node': node_name,
                        'created_at': iso_moment(created)}
                       for order_id, item_id, size, node_name, created
                       in rows]}


def _overview(node):
    _require_admin(node)
    return node.overview()


def _metrics(node):
    _require_admin(node, session=False)
    bottle.response.content_type = prometheus_client.CONTENT_TYPE_LATEST
    return node.metrics.exposition()


def _health(node):
    health = node.health()
    if not health['ok']:
        bottle.response.status = 503
    return health


def _openapi():
    return _static('openapi.json')


def _static(path):
    response = bottle.static_file(path, root=STATIC_DIR)
    if isinstance(response, bottle.HTTPError):
        if response.status_code == 416:
            raise ApiError(416, 'range_not_satisfiable')
        raise ApiError(404, 'not_found')
    response.set_header('Cache-Control', 'public, max-age=60')
    return response


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

COMMANDS = ('serve', 'seed', 'release', 'restock', 'sell-random', 'keygen',
            'pause', 'resume', 'status', 'report', 'verify-draw')


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, exit code 2."""

    def error(self, message):
        self.exit(2, f'sneakers23: {message} (see --help)\n')


def build_parser():
    """The command line of the contract."""
    parser = ArgumentParser(prog='sneakers23' if FROZEN else 'sneakers23.py',
                            description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    serve = commands.add_parser('serve', help='serve the store (default)')
    _serve_options(serve)
    seed_cmd = commands.add_parser('seed', help='create and seed the DB')
    seed_cmd.add_argument('--reset', action='store_true',
                          help='drop everything (orders too) first')
    seed_cmd.add_argument('--db', default=None, help='database URL')
    seed_cmd.add_argument('--catalog', default=CATALOG_PATH,
                          help='catalogue TOML (default: data/catalog.toml)')
    release = commands.add_parser('release', help='release a product')
    release.add_argument('product', help='product id or sku')
    when = release.add_mutually_exclusive_group()
    when.add_argument('--at', metavar='WHEN',
                      help='release at WHEN: ISO 8601 with a zone '
                           '(2026-12-01T18:00:00Z) or +90s, +10m, +2h')
    when.add_argument('--cancel', action='store_true',
                      help='cancel its scheduled release')
    release.add_argument('--draw', action='store_true',
                         help='sell it by a draw: entries from now (or '
                              '--at) until --closes, then the winners')
    release.add_argument('--closes', metavar='WHEN',
                         help='when the draw closes (with --draw)')
    _url_option(release)
    verify = commands.add_parser(
        'verify-draw', help='recompute a published draw\'s winners')
    verify.add_argument('url', help='a node of the store: http://host:port')
    verify.add_argument('product', help='product id or sku')
    restock = commands.add_parser('restock', help='add stock to an item')
    restock.add_argument('item', help='item id or sku (SHU6000-9)')
    restock.add_argument('count', type=int, help='pairs to add (> 0)')
    _url_option(restock)
    sell = commands.add_parser('sell-random', help='mock shoppers buying')
    sell.add_argument('--until-gone', action='store_true',
                      help='stop when all released stock is sold')
    sell.add_argument('--rate', type=float, default=0,
                      help='purchases per second at most (default: no cap)')
    sell.add_argument('--shoppers', type=int, default=20,
                      help='concurrent shoppers (default 20)')
    _url_option(sell)
    commands.add_parser('keygen', help='print a CURVE key pair')
    report = commands.add_parser('report', help='one drop, summed up')
    report.add_argument('product', help='product id or sku')
    report.add_argument('--csv', metavar='FILE',
                        help='also write its orders to FILE as CSV')
    _url_option(report)
    for name, what in (('pause', 'stop all sales on every node'),
                       ('resume', 'restart sales on every node')):
        _url_option(commands.add_parser(name, help=what))
    status = commands.add_parser(
        'status', help='the drop at a glance: products, nodes')
    status.add_argument('--items', action='store_true',
                        help='also every item: id, sku, size, pairs, level')
    _url_option(status)
    return parser


def _serve_options(parser):
    parser.add_argument('--config', help='cluster file (peers.toml)')
    parser.add_argument('--node', help='this node\'s name in --config')
    parser.add_argument('--db', help='sqlite:///path or postgresql://...')
    parser.add_argument('--host', help=f'default {DEFAULT_HOST}')
    parser.add_argument('--port', type=int, help=f'default {DEFAULT_PORT}')
    parser.add_argument('--ip-pairs', type=int, metavar='N',
                        help=f'pairs per product per client IP (default '
                             f'{IP_PAIRS}; 0: no limit)')
    parser.add_argument('--ip-rate', type=float, metavar='N',
                        help=f'purchase attempts per second per client IP '
                             f'(default {IP_RATE}; 0: no limit)')
    parser.add_argument('--trusted-ips', metavar='LIST',
                        help='IPs exempt from those limits (default '
                             f'{",".join(TRUSTED_IPS)}; "" for none)')
    parser.add_argument('--proxies', metavar='LIST',
                        help='the only IPs whose X-Forwarded-For is '
                             'believed (default none)')


def _url_option(parser):
    parser.add_argument('--url', default=DEFAULT_URL,
                        help=f'the node to talk to (default {DEFAULT_URL})')


def parse_args(argv):
    """Parse argv; no command means `serve`."""
    if not argv or argv[0] not in COMMANDS + ('-h', '--help'):
        argv = ['serve', *argv]
    return build_parser().parse_args(argv)


def serve_config(args):
    """The node's Config from `serve` arguments and the environment."""
    fields = {}
    if args.config or args.node:
        if not (args.config and args.node):
            raise ConfigError('--config and --node go together')
        fields.update(load_cluster(args.config, args.node))
    for name in ('db', 'host', 'port', 'ip_pairs', 'ip_rate',
                 'trusted_ips', 'proxies'):
        value = getattr(args, name)
        if value is not None:
            fields['db_url' if name == 'db' else name] = value
    if not 0 < fields.get('port', DEFAULT_PORT) < 65536:
        raise ConfigError('--port must be between 1 and 65535')
    fields.update(client_limits(fields))
    env = os.environ
    fields['admin_token'] = env.get('SNEAKERS23_ADMIN_TOKEN', '')
    fields['curve_secret'] = env.get('SNEAKERS23_CURVE_SECRET', '')
    fields['drop_rate'] = _drop_rate(env.get('SNEAKERS23_TEST_DROP_RATE'))
    fields['hold_draw'] = env.get('SNEAKERS23_TEST_HOLD_DRAW') == '1'
    config = Config(**fields)
    curve_keys(config)  # a wrong key stops the node before it does anything
    return config


def client_limits(fields):
    """The per-IP limits of `fields` (options or peers.toml), checked:
    IP lists as tuples of addresses."""
    pairs = fields.get('ip_pairs', IP_PAIRS)
    rate = fields.get('ip_rate', IP_RATE)
    if type(pairs) is not int or pairs < 0:
        raise ConfigError('--ip-pairs must be a whole number >= 0')
    if not isinstance(rate, int | float) or not 0 <= rate < 1e6:
        raise ConfigError('--ip-rate must be a number >= 0')
    return {'ip_pairs': pairs, 'ip_rate': float(rate),
            'trusted_ips': _ip_list(fields.get('trusted_ips', TRUSTED_IPS),
                                    'trusted-ips'),
            'proxies': _ip_list(fields.get('proxies', ()), 'proxies')}


def _ip_list(value, name):
    """"a,b" or a TOML list as a tuple of IP addresses."""
    items = value.split(',') if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f'--{name} must be a comma-separated list of IPs')
    ips = tuple(str(item).strip() for item in items if str(item).strip())
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f'--{name}: {ip!r} is not an IP address') \
                from None
    return ips


def _drop_rate(text):
    """The test-only share of replication messages to lose on purpose."""
    try:
        rate = float(text or 0)
    except ValueError:
        rate = -1
    if not 0 <= rate < 1:
        raise ConfigError('SNEAKERS23_TEST_DROP_RATE must be in [0, 1)')
    return rate


def serve(config):
    """Run one node until SIGINT or SIGTERM."""
    app = create_app(config)
    server = make_server(app, config.host, config.port)
    try:
        app.node.start()
    except DB_AWAY as e:
        raise ConfigError(f'cannot use the database '
                          f'{redact(config.db_url)}: {_first_line(e)}') \
            from None
    if app.node.token_note:
        print(app.node.token_note, flush=True)
    stopped = gevent.event.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stopped.set)
    server.start()
    print(f'sneakers23 node {config.node} serving on '
          f'http://{config.host}:{config.port}', flush=True)
    stopped.wait()
    server.stop(timeout=1)
    app.node.stop()


def _first_line(error):
    return (str(error).strip().splitlines() or ['unknown error'])[0]


def seed_command(args):
    """`seed`: create the tables and fill them from the catalogue."""
    database = open_database(args.db or DEFAULT_DB_URL)
    db.initialize(database)
    try:
        db.connect()
        count = seed(args.catalog, reset=args.reset)
    except OperationalError as e:
        raise ConfigError(f'cannot use the database '
                          f'{redact(args.db or DEFAULT_DB_URL)}: '
                          f'{_first_line(e)}') from None
    except IntegrityError as e:
        raise ConfigError(f'{args.catalog} repeats a sku: '
                          f'{_first_line(e)}') from None
    finally:
        db.close()
    if count:
        print(f'seeded {count} products into {redact(database.database)}')
    else:
        print('the database already holds products; use --reset to start '
              'over')


STALE_SOCKET = (http.client.RemoteDisconnected, ConnectionResetError,
                BrokenPipeError)


class NodeClient:
    """A small HTTP client of a running node (keep-alive, JSON)."""

    def __init__(self, url, token=''):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != 'http' or not parts.hostname:
            raise ConfigError(f'--url must look like {DEFAULT_URL}')
        self.url, self.token = url, token
        self._host, self._port = parts.hostname, parts.port or 80
        self._conn = None

    def request(self, method, path, body=None, headers=None):
        """(status, JSON answer) of one request; retries a stale socket."""
        data = None if body is None else json.dumps(body).encode()
        headers = {'Content-Type': 'application/json', **(headers or {})}
        for attempt in (1, 2):
            try:
                return self._send(method, path, data, headers)
            except STALE_SOCKET:
                self.close()  # a kept-alive socket the node closed
                if attempt == 2:
                    raise
            except OSError as e:
                raise ConfigError(f'cannot reach the node at {self.url}: '
                                  f'{e.strerror or e}') from None

    def admin(self, path, body=None):
        """POST to an admin route with the bearer token."""
        auth = {'Authorization': f'Bearer {self.token}'}
        return self.request('POST', path, body or {}, auth)

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send(self, method, path, data, headers):
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self._host, self._port,
                                                    timeout=30)
        self._conn.request(method, path, data, headers)
        answer = self._conn.getresponse()
        raw = answer.read()
        try:
            return answer.status, json.loads(raw or b'null')
        except ValueError:
            return answer.status, {'error': raw[:200].decode(errors='replace')}


def _admin_client(args):
    """A client with the admin token: SNEAKERS23_ADMIN_TOKEN, else the
    token a node on this machine made and kept (TOKEN_FILE)."""
    token = os.environ.get('SNEAKERS23_ADMIN_TOKEN', '')
    source = 'SNEAKERS23_ADMIN_TOKEN'
    if not token:
        token, source = _read_token_file(), TOKEN_FILE
    if not token:
        raise ConfigError(f'set SNEAKERS23_ADMIN_TOKEN to the node\'s admin '
                          f'token (none kept in {TOKEN_FILE} either)')
    client = NodeClient(args.url, token)
    client.token_source = source
    return client


def _report(status, answer, client, success):
    """Print an admin answer; the exit code for it."""
    if 200 <= status < 300:
        print(success(answer))
        return 0
    hint = ''
    if status == 401:
        hint = f' (the token came from {client.token_source})'
    print(f'sneakers23: {status} {answer.get("error", answer)}{hint}',
          file=sys.stderr)
    return 1


def release_command(args):
    """`release PRODUCT [--at WHEN | --cancel]`: by id or sku, through
    the admin API."""
    if args.draw or args.closes:
        return draw_command(args)
    if args.at or args.cancel:
        return schedule_command(args)
    client = _admin_client(args)
    product_id = _find_product(client, args.product)
    status, answer = client.admin(
        f'/admin/api/products/{product_id}/release')
    return _report(status, answer, client, lambda a: (
        f'product {product_id} released'
        + ('' if a.get('changed') else ' (it already was)')))


def schedule_command(args):
    """`release PRODUCT --at WHEN` / `--cancel`."""
    at = None if args.cancel else iso_moment(when_moment(args.at))
    client = _admin_client(args)
    product_id = _find_product(client, args.product)
    status, answer = client.admin(
        f'/admin/api/products/{product_id}/schedule', {'at': at})
    return _report(status, answer, client, lambda a: (
        f"product {product_id} will be released at {a['release_at']}"
        if a['scheduled'] else f'product {product_id} is not scheduled'))


def draw_command(args):
    """`release PRODUCT --draw --closes WHEN [--at WHEN]`."""
    if not (args.draw and args.closes) or args.cancel:
        raise ConfigError('a draw needs --draw and --closes WHEN (and '
                          'maybe --at WHEN), without --cancel')
    now = utcnow()
    body = {'closes': iso_moment(when_moment(args.closes, now, '--closes')),
            'at': args.at and iso_moment(when_moment(args.at, now))}
    client = _admin_client(args)
    product_id = _find_product(client, args.product)
    status, answer = client.admin(
        f'/admin/api/products/{product_id}/draw', body)
    return _report(status, answer, client, lambda a: (
        f"product {product_id} is a draw from {a['opens_at']} to "
        f"{a['closes_at']}; commitment {a['commitment']}"))


def verify_draw_command(args):
    """`verify-draw URL PRODUCT`: recompute the winners from the
    published draw alone; exit 0 when they match, 1 when not."""
    client = NodeClient(args.url.rstrip('/'))
    product_id = _find_product(client, args.product)
    status, document = client.request('GET', f'/api/draws/{product_id}')
    if status != 200:
        raise Refused(f'verify-draw: {args.url} answered {status} for the '
                      f'draw of product {product_id}')
    problem = verify_draw(document)
    if problem:
        raise Refused(f'verify-draw: {problem}')
    print(f"the draw of product {product_id} checks out: "
          f"{len(document['winners'])} winners among "
          f"{len(document['entries'])} entries, the seed matches the "
          f"commitment {document['commitment']}")
    return 0


def when_moment(text, now=None, option='--at'):
    """WHEN of `--at` (or `option`): ISO 8601 with a zone, or +90s /
    +10m / +2h from now; a naive UTC moment, or ConfigError."""
    now = now or utcnow()
    match = re.fullmatch(r'\+(\d{1,7})([smh])', text.strip())
    if match:
        seconds = int(match[1]) * {'s': 1, 'm': 60, 'h': 3600}[match[2]]
        return now + timedelta(seconds=seconds)
    try:
        return parse_moment(text)
    except ValueError:
        raise ConfigError(f'{option} {text!r}: give ISO 8601 with a zone '
                          '(2026-12-01T18:00:00Z) or +90s, +10m, +2h') \
            from None


def sales_command(args):
    """`pause` / `resume`: the kill switch, for every node."""
    client = _admin_client(args)
    status, answer = client.admin('/admin/api/sales',
                                  {'paused': args.command == 'pause'})
    return _report(status, answer, client, lambda a: (
        'sales paused on every node' if a['paused']
        else 'sales resumed on every node'))


def status_command(args):
    """`status`: products (state, sold, left) and nodes (shoppers, lag)."""
    client = _admin_client(args)
    status, view = client.request(
        'GET', '/admin/api/overview',
        headers={'Authorization': f'Bearer {client.token}'})
    if status != 200:
        return _report(status, view, client, str)
    print(f"sales: {'PAUSED' if view['paused'] else 'on'}")
    print(f"{'product':<10} {'state':<12} {'sold':>7} {'left':>9} "
          f"{'sales/s':>8}  release at")
    for p in view['products']:
        print(f"{p['sku']:<10} {p['state']:<12} {_shown(p['sold']):>7} "
              f"{p['left']:>9} {_shown(p['sales_per_s']):>8}  "
              f"{p['release_at'] or ''}")
    print(f"{'node':<10} {'shoppers':>8} {'hub lag':>9}  db           peers")
    for name, n in view['nodes'].items():
        peers = ', '.join(f'{k} {v}' for k, v in n['peers'].items())
        print(f"{name:<10} {n['streams']:>8} {n['hub_lag_ms']:>7} ms  "
              f"{n['db']:<12} {peers}")
    return _print_items(client) if args.items else 0


def _print_items(client):
    """Every item of the store, for `restock` (which takes either id)."""
    status, products = client.request('GET', '/api/products')
    if status != 200:
        return _report(status, products, client, str)
    print(f"{'item':>6}  {'sku':<14} {'size':>5} {'pairs':>9}  level")
    for product in products:
        for i in product['items']:
            print(f"{i['id']:>6}  {i['sku']:<14} {i['size']:>5} "
                  f"{i['count']:>9}  {i['level']}")
    return 0


def report_command(args):
    """`report PRODUCT [--csv FILE]`: when it opened and sold out, pairs
    per size, sales per second; its orders as CSV."""
    client = _admin_client(args)
    product_id = _find_product(client, args.product)
    status, drop = client.request(
        'GET', f'/admin/api/products/{product_id}/orders',
        headers={'Authorization': f'Bearer {client.token}'})
    if status != 200:
        return _report(status, drop, client, str)
    for line in drop_summary(drop):
        print(line)
    if args.csv:
        _write_orders_csv(args.csv, drop['orders'])
        print(f"{len(drop['orders'])} orders written to {args.csv}")
    return 0


def drop_summary(drop):
    """The lines `report` prints for one drop."""
    orders = drop['orders']
    moments = [parse_moment(o['created_at']) for o in orders]
    opened = drop['release_at'] and parse_moment(drop['release_at'])
    lines = [f"{drop['sku']} ({drop['state']}): {len(orders)} pairs sold, "
             f"{drop['left']} left",
             f"opened     {drop['release_at'] or 'not yet'}"]
    if orders and drop['left'] == 0:
        lines.append(f"sold out   {orders[-1]['created_at']}"
                     + (f' ({(moments[-1] - opened).total_seconds():.1f} s'
                        ' after opening)' if opened else ''))
    if orders:
        span = max((moments[-1] - (opened or moments[0])).total_seconds(),
                   1.0)
        busiest = Counter(m.replace(microsecond=0) for m in moments)
        lines.append(f'sales/s    {len(orders) / span:.1f} on average, '
                     f'{max(busiest.values())} in the busiest second')
    sizes = Counter(o['size'] for o in orders)
    lines.append('per size   ' + (', '.join(
        f'{size}: {n}' for size, n in sorted(
            sizes.items(), key=lambda kv: float(kv[0]))) or 'none'))
    return lines


def _write_orders_csv(path, orders):
    fields = ('order_id', 'item_id', 'size', 'node', 'created_at')
    try:
        with open(path, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(orders)
    except OSError as e:
        raise ConfigError(f'cannot write {path}: {e.strerror}') from None


def _shown(value):
    return '?' if value is None else value


def _find_product(client, ref):
    """A product id from an id or a sku."""
    if ref.isdigit():
        return int(ref)
    status, products = client.request('GET', '/api/products')
    for product in products if status == 200 else []:
        if product['sku'].lower() == ref.lower():
            return product['id']
    raise Refused(f'no product with id or sku {ref!r}')


def restock_command(args):
    """`restock ITEM COUNT` (ITEM: an id or an item sku, SHU6000-9)
    through the admin API."""
    if args.count <= 0:
        raise ConfigError('COUNT must be greater than 0')
    client = _admin_client(args)
    item_id = _find_item(client, args.item)
    status, answer = client.admin(f'/admin/api/items/{item_id}/restock',
                                  {'count': args.count})
    return _report(status, answer, client, lambda a: (
        f"item {a['item_id']} now has {a['count']} pairs ({a['level']})"))


def _find_item(client, ref):
    """An item id from an id or an item sku."""
    if ref.isascii() and ref.isdigit():
        return int(ref)
    status, products = client.request('GET', '/api/products')
    for product in products if status == 200 else []:
        for item in product['items']:
            if item['sku'].lower() == ref.lower():
                return item['id']
    raise Refused(f'no item with id or sku {ref!r}')


class RandomSeller:
    """The mock reducer: many new shoppers buying random in-stock sizes."""

    def __init__(self, url, shoppers, rate, until_gone, out=sys.stderr):
        self.url, self.shoppers, self.rate = url, shoppers, rate
        self.until_gone, self.out = until_gone, out
        self.sold = self.sold_out = self.failed = 0
        self.stock = {}
        self.interrupted = False
        self._next_slot = time.monotonic()
        self._done = gevent.event.Event()
        self._workers, self._running = [], None

    def run(self):
        """Sell until the stock is gone (or forever, or `stop()`); returns
        pairs sold."""
        self._running = gevent.getcurrent()
        self.refresh(NodeClient(self.url))
        started = time.monotonic()
        self._workers = [gevent.spawn(self._shop)
                         for _ in range(self.shoppers)]
        reporter = gevent.spawn(self._report_progress)
        try:
            gevent.joinall(self._workers, raise_error=True)
        finally:
            gevent.killall(self._workers + [reporter])
        elapsed = time.monotonic() - started
        print(f'sold {self.sold} pairs in {elapsed:.1f} s; '
              f'{self.left()} left', file=self.out, flush=True)
        return self.sold

    def stop(self):
        """Stop shopping now (Ctrl-C): `run()` returns, or, still asking
        for the stock before any shopper started, raises
        KeyboardInterrupt."""
        self.interrupted = True
        self._done.set()
        if self._workers:
            gevent.killall(self._workers, block=False)
        elif self._running is not None:
            gevent.kill(self._running, KeyboardInterrupt)

    def left(self):
        return sum(self.stock.values())

    def refresh(self, client):
        """Reload what is in stock among released products."""
        status, products = client.request('GET', '/api/products')
        if status != 200:
            raise ConfigError(f'{self.url}/api/products answered {status}')
        self.stock = {item['id']: item['count'] for p in products
                      if p['released'] for item in p['items']
                      if item['count'] > 0}

    def _shop(self):
        client = NodeClient(self.url)
        while not self._done.is_set():
            if not self.stock:
                self._wait_for_stock(client)
                continue
            self._pace()
            if self.stock:  # other shoppers may have emptied it meanwhile
                self._buy(client, random.choice(list(self.stock)))

    def _wait_for_stock(self, client):
        self.refresh(client)
        if not self.stock and self.until_gone:
            self._done.set()
        elif not self.stock:
            gevent.sleep(1)

    def _pace(self):
        if self.rate > 0:
            now = time.monotonic()
            self._next_slot = max(self._next_slot, now) + 1 / self.rate
            gevent.sleep(max(0.0, self._next_slot - now - 1 / self.rate))

    def _buy(self, client, item_id):
        client.close()  # no cookie kept: every purchase is a new shopper
        status, answer = client.request('POST', '/api/purchase',
                                        {'item_id': item_id})
        if status == 201:
            self.sold += 1
            self._take(item_id)
        elif answer.get('error') == SOLD_OUT:
            self.sold_out += 1
            self.stock.pop(item_id, None)
        else:
            self.failed += 1

    def _take(self, item_id):
        if item_id in self.stock:
            self.stock[item_id] -= 1
            if self.stock[item_id] <= 0:
                del self.stock[item_id]

    def _report_progress(self):
        while True:
            gevent.sleep(1)
            print(f'sold {self.sold} · about {self.left()} left · '
                  f'{self.failed} failed', file=self.out, flush=True)


def sell_random_command(args):
    """`sell-random`: the seed's mock reducer."""
    if args.shoppers < 1 or args.rate < 0:
        raise ConfigError('--shoppers must be >= 1 and --rate >= 0')
    seller = RandomSeller(args.url, args.shoppers, args.rate,
                          args.until_gone)
    # Ctrl-C as an event, not a KeyboardInterrupt raised in whichever
    # greenlet runs when it comes: once (a CI run) the seller then said
    # nothing more and had not exited 10 s later.
    ctrl_c = gevent.signal_handler(signal.SIGINT, seller.stop)
    try:
        seller.run()
    except KeyboardInterrupt:
        pass   # before any shopper started
    finally:
        ctrl_c.cancel()
    if seller.interrupted:
        print(f'interrupted after selling {seller.sold} pairs',
              file=sys.stderr)
    return 0


def keygen_command(args):
    """`keygen`: a CURVE key pair to paste into peers.toml."""
    import zmq
    public, secret = zmq.curve_keypair()
    print(f'public_key = "{public.decode()}"')
    print(f'secret_key = "{secret.decode()}"')
    return 0


def serve_command(args):
    serve(serve_config(args))
    return 0


def main(argv=None):
    """Run the command line; returns the exit code."""
    logging.basicConfig(level=os.environ.get('SNEAKERS23_LOG', 'WARNING'),
                        format='%(asctime)s %(name)s %(levelname)s '
                               '%(message)s')
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [FAN_OUT_COMMAND] and len(argv) == 2:
        return fan_out_worker(int(argv[1]))
    args = parse_args(argv)
    commands = {'serve': serve_command, 'seed': seed_command,
                'release': release_command, 'restock': restock_command,
                'sell-random': sell_random_command,
                'keygen': keygen_command, 'pause': sales_command,
                'resume': sales_command, 'status': status_command,
                'report': report_command,
                'verify-draw': verify_draw_command}
    try:
        return commands[args.command](args) or 0
    except ConfigError as e:
        print(f'sneakers23: {e}', file=sys.stderr)
        return 2
    except Refused as e:
        print(f'sneakers23: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
