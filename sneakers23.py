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
import hashlib
import hmac
import http.client
import itertools
import json
import logging
import os
import random
import secrets
import signal
import socket
import sys
import time
import tomllib
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import bottle
import gevent
import gevent.event
import gevent.lock
import gevent.queue
import gevent.threadpool
import peewee
import zmq.green as zmq
from gevent.pywsgi import WSGIHandler, WSGIServer
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
    Model,
    OperationalError,
    SqliteDatabase,
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
DEFAULT_HOST, DEFAULT_PORT = '127.0.0.1', 8023
DEFAULT_URL = f'http://{DEFAULT_HOST}:{DEFAULT_PORT}'

SIZES = tuple(f'{n / 2:g}' for n in range(12, 25))
LEVEL_THRESHOLDS = ((150, 'low'), (500, 'medium'))

SHOPPER_COOKIE = 's23_shopper'
SHOPPER_MAX_AGE = 90 * 24 * 3600
MAX_BODY = 4096
MAX_RESTOCK = 1_000_000
MAX_BATCH = 256
PG_POOL_SIZE = 4
SQLITE_LOCK_WAIT = 5.0
SQLITE_LOCK_RETRY = 0.002
LAG_PROBE_INTERVAL = 0.05
LAG_WINDOW = 10.0

SSE_RETRY_MS = 2000
SSE_KEEPALIVE = 15.0
SSE_BUFFER = 4096
SSE_MAX_PENDING = 256 * 1024
SSE_FAN_OUT_SLICE = 1000
SSE_THREAD_FROM = 2000
SO_SNDBUF = 64 * 1024

HEARTBEAT_INTERVAL = 1.0
PEER_SILENT_AFTER = 3.0
ZAP_ENDPOINT = 'inproc://zeromq.zap.01'


class Sneakers23Error(Exception): pass
class ConfigError(Sneakers23Error): pass
class Unavailable(Sneakers23Error): pass


class ApiError(Sneakers23Error):
    """An error answered to an HTTP client as `{"error": code}`."""

    def __init__(self, status, code):
        super().__init__(code)
        self.status, self.code = status, code


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


def load_cluster(path, node):
    """Read `peers.toml`: the config fields of node `node`."""
    nodes, db_url = _read_cluster_file(path)
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
                public_key=me.get('public_key', ''))


def _read_cluster_file(path):
    """The `nodes` table and database URL of a peers.toml."""
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
    return nodes, db_url


def _split_hostport(text, path, node):
    """Split "host:port" from peers.toml, or explain what is wrong."""
    host, _, port = str(text).rpartition(':')
    if not host or not port.isdigit():
        raise ConfigError(f'{path}: nodes.{node}.http must be "host:port"')
    return host, int(port)


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
    threads at once: its owner greenlet waits for the commit.
    """

    _committer = None

    def commit(self):
        if self.is_closed():
            return super().commit()
        if self._committer is None:
            ThreadCommitSqliteDatabase._committer = (
                gevent.threadpool.ThreadPool(1))
        with peewee.__exception_wrapper__:
            return self._committer.apply(self._state.conn.commit)


def _open_postgresql(parts):
    """PostgreSQL through psycopg2, made cooperative by psycogreen."""
    try:
        import psycogreen.gevent
        from playhouse.pool import PooledPostgresqlDatabase
    except ImportError as e:  # pragma: no cover - pinned in requirements
        raise ConfigError(f'PostgreSQL support is missing: {e}') from None
    psycogreen.gevent.patch_psycopg()
    name = parts.path.lstrip('/')
    if not name:
        raise ConfigError('a PostgreSQL URL needs a database name')
    return PooledPostgresqlDatabase(
        name, user=parts.username, password=parts.password,
        host=parts.hostname or '127.0.0.1', port=parts.port or 5432,
        max_connections=PG_POOL_SIZE + 2, stale_timeout=300,
        connect_timeout=3)


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
        key = (id(db.obj), tuple(type(a) for a in args))
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
    """Runs a node's database work without stalling the gevent hub.

    PostgreSQL work runs in the calling greenlet, made cooperative by
    psycogreen, at most `PG_POOL_SIZE` at a time. SQLite has no
    cooperative driver. Its writes run in one greenlet that owns the
    connection: transactions are short (group commit, prepared queries),
    and when another process holds the write lock the greenlet sleeps and
    retries instead of waiting inside SQLite. A native thread was tried
    for writes: every statement then waited for the GIL to come back from
    the busy hub (14 ms p50 writes at 1,000 writes/s, against 2 ms here).
    Whole-catalogue reads do go to a thread, with a connection of its own
    (WAL lets them run beside the writes), so a reload never stalls.
    """

    def __init__(self, database):
        self.database = database
        self.is_sqlite = isinstance(database, SqliteDatabase)
        self._slots = gevent.lock.BoundedSemaphore(PG_POOL_SIZE)
        if self.is_sqlite:
            self._jobs = gevent.queue.Queue()
            self._owner = gevent.spawn(self._own_connection)
            self._reader = gevent.threadpool.ThreadPool(1)

    def run(self, fn, *args):
        """Call `fn(*args)` with a database connection; return its result."""
        if not self.is_sqlite:
            with self._slots, db.connection_context():
                return fn(*args)
        result = gevent.event.AsyncResult()
        self._jobs.put((fn, args, result))
        return result.get()

    def read(self, fn, *args):
        """Like `run`, for big reads: on SQLite, off the hub's thread."""
        if not self.is_sqlite:
            return self.run(fn, *args)
        return self._reader.apply(self._read_in_thread, (fn, args))

    def close(self):
        """Close the connections (and the SQLite reader thread)."""
        if not self.is_sqlite:
            return db.close_all()
        self.run(db.close)
        self._owner.kill()
        self._reader.apply(db.close)
        self._reader.kill()

    def _own_connection(self):
        while True:
            fn, args, result = self._jobs.get()
            try:
                result.set(self._retry_when_locked(fn, args))
            except Exception as e:  # the caller gets it
                result.set_exception(e)

    def _retry_when_locked(self, fn, args):
        deadline = time.monotonic() + SQLITE_LOCK_WAIT
        while True:
            try:
                if db.is_closed():
                    db.connect()
                    db.execute_sql('PRAGMA busy_timeout = 0')
                return fn(*args)
            except OperationalError as e:
                if 'locked' not in str(e) or time.monotonic() > deadline:
                    raise
                gevent.sleep(SQLITE_LOCK_RETRY)

    def _read_in_thread(self, fn, args):
        if db.is_closed():
            db.connect()
        return fn(*args)


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
    def release(cls, product_id, at):
        """Mark a product released at `at`; True when it was not already."""
        return bool(cls
                    .update(released=True, release_at=at)
                    .where((cls.id == product_id) & (cls.released == False))  # noqa: E712,E501
                    .execute())


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
        """Put `count` more pairs on an item: (count, version)."""
        return _first(cls._add.rows(item_id, count))


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
Availability._add = Prepared(lambda item_id, pairs: (
    Availability
    .update(count=Availability.count + pairs,
            version=Availability.version + 1)
    .where(Availability.item == item_id)
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
    def get_or_make(cls, key, make):
        """The value under `key`, stored first from `make()` if missing."""
        cls.insert(key=key, value=make()).on_conflict_ignore().execute()
        return cls.get_by_id(key).value


MODELS = (Product, Item, Availability, Order, Setting)

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


def released_rows():
    """(product_id, release_at) of every released product."""
    return list(Product
                .select(Product.id, Product.release_at)
                .where(Product.released == True)  # noqa: E712
                .tuples())


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


class ProductState:
    """A product as this node knows it, with its items in size order."""

    __slots__ = ('id', 'sku', 'brand', 'name', 'color', 'price_cents',
                 'image', 'position', 'released', 'release_at', 'items',
                 'json')

    def __init__(self, row, items):
        for name in self.__slots__[:-2]:
            setattr(self, name, getattr(row, name))
        self.items = items
        self.json = None

    def as_json(self):
        release_at = self.release_at and self.release_at.isoformat() + 'Z'
        return {'id': self.id, 'sku': self.sku, 'brand': self.brand,
                'name': self.name, 'color': self.color,
                'price_cents': self.price_cents, 'image': self.image,
                'released': self.released, 'release_at': release_at,
                'items': [item.as_json() for item in self.items]}

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
        self._listeners = []

    def load(self, rows):
        """Replace everything with `catalog_rows()` output."""
        products, items = {}, {}
        for row, item_rows in rows:
            states = [ItemState(*item) for item in item_rows]
            products[row.id] = ProductState(row, states)
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

@dataclass(eq=False)
class Purchase:
    """One shopper's request for one item, on its way to the database."""

    item_id: int
    product_id: int
    shopper: str
    result: gevent.event.AsyncResult = field(
        default_factory=gevent.event.AsyncResult)


@dataclass(eq=False)
class Write:
    """Any other write (a release, a restock) riding the next batch."""

    fn: object
    args: tuple
    result: gevent.event.AsyncResult = field(
        default_factory=gevent.event.AsyncResult)


@dataclass
class Placed:
    order_id: int
    count: int
    version: int


SOLD_OUT, ALREADY_PURCHASED = 'sold_out', 'already_purchased'


def commit_batch(purchases, writes, node):
    """Everything that arrived together, in one transaction (group commit).

    Returns (what each write returned or raised, each purchase's outcome).
    """
    with db.atomic():
        done = [_in_savepoint(w.fn, *w.args) for w in writes]
        return done, place_orders(purchases, node)


def _in_savepoint(fn, *args):
    """`fn(*args)`, or the database error it raised (rolled back alone)."""
    try:
        with db.atomic():
            return fn(*args)
    except DatabaseError as e:
        return e


def place_orders(purchases, node):
    """Place a batch of purchases; one outcome each, in their order.

    Items are locked in id order so that concurrent batches (other
    connections, other nodes) never deadlock.
    """
    by_item = {}
    for p in purchases:
        by_item.setdefault(p.item_id, []).append(p)
    outcomes = {}
    with db.atomic():
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
        self._workers = [gevent.spawn(self._commit_loop)
                         for _ in range(workers)]

    def load(self):
        """(Re)load the whole inventory from the database."""
        self.inventory.load(self.runner.read(catalog_rows))

    def refresh(self):
        """Bring memory up to the database (changes made anywhere)."""
        stock, released = self.runner.read(
            lambda: (stock_rows(), released_rows()))
        for product_id, at in released:
            self.inventory.product_released(product_id, at, local=False)
        for item_id, count, version in stock:
            self.inventory.item_changed(item_id, count, version, local=False)

    def buy(self, item, shopper):
        """Place one order; returns Placed, SOLD_OUT or ALREADY_PURCHASED."""
        purchase = Purchase(item.id, item.product_id, shopper)
        self._queue.put(purchase)
        return purchase.result.get()

    def release(self, product_id):
        """Release a product; True if this call released it."""
        if self.inventory.products[product_id].released:
            return False  # memory follows the database: nothing to write
        at = utcnow()
        self._write(Product.release, product_id, at)
        return self.inventory.product_released(product_id, at)

    def restock(self, item_id, count):
        """Add pairs to an item; its new count, or None if it has none."""
        row = self._write(Availability.add, item_id, count)
        if row is not None:
            self.inventory.item_changed(item_id, *row)
        return row and row[0]

    def stop(self):
        """Stop taking purchases and close the database."""
        gevent.killall(self._workers)
        self.runner.close()

    def _write(self, fn, *args):
        """Run `fn(*args)` in the next batch's transaction; its result."""
        write = Write(fn, args)
        self._queue.put(write)
        return write.result.get()

    def _commit_loop(self):
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                self._commit(batch)
            except Exception as e:
                logger.exception('a batch of %d writes failed', len(batch))
                for job in batch:
                    if not job.result.ready():
                        job.result.set_exception(Unavailable(str(e)))

    def _commit(self, batch):
        purchases = [job for job in batch if isinstance(job, Purchase)]
        writes = [job for job in batch if isinstance(job, Write)]
        done, outcomes = self.runner.run(commit_batch, purchases, writes,
                                         self.node)
        for write, result in zip(writes, done, strict=True):
            if isinstance(result, DatabaseError):
                write.result.set_exception(Unavailable(str(result)))
            else:
                write.result.set(result)
        for purchase, outcome in zip(purchases, outcomes, strict=True):
            if isinstance(outcome, Placed):
                self.inventory.item_changed(
                    purchase.item_id, outcome.count, outcome.version)
            purchase.result.set(outcome)
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
# Event hub: Server-Sent Events
# ---------------------------------------------------------------------------

def format_event(name, data, event_id):
    """Encode one SSE event: the exact bytes every stream receives."""
    payload = json.dumps(data, separators=(',', ':'))
    return f'id: {event_id}\nevent: {name}\ndata: {payload}\n\n'.encode()


def render(name, **context):
    """Render a template from `views/`."""
    return bottle.template(name, template_lookup=[VIEWS_DIR], **context)


def size_html(product):
    """The size selector of a released product, as the page shows it."""
    return render('size_selector', product=product)


def snapshot_of(products):
    """The `snapshot` event body for `products`.

    Released products also carry `size_html`, so that a page which missed
    the release can show the sizes from this one event.
    """
    return {'products': [_product_snapshot(p) for p in products]}


def _product_snapshot(product):
    entry = {'product_id': product.id, 'released': product.released,
             'items': [{'id': i.id, 'level': i.level} for i in product.items]}
    if product.released:
        entry['size_html'] = size_html(product)
    return entry


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


class Stream:
    """One open SSE connection, owned by the hub after its first bytes.

    Tiny on purpose (a socket, a cursor, a filter): no greenlet, no queue.
    Bytes the kernel would not take wait in `pending`, which is bounded.
    """

    __slots__ = ('sock', 'cursor', 'products', 'pending', 'reader',
                 'writer')

    def __init__(self, sock, cursor, products):
        self.sock, self.cursor, self.products = sock, cursor, products
        self.pending = b''
        self.reader = self.writer = None


class EventHub:
    """Fan-out of inventory events to every open SSE stream.

    Each event is encoded once into a ring buffer (kept for `Last-Event-ID`
    replays). One fan-out greenlet writes the new bytes straight to every
    stream's non-blocking socket, the same bytes object to every stream
    that wants the same events. A client that stops reading collects
    unsent bytes up to `SSE_MAX_PENDING`, then is cut off; it reconnects
    with `Last-Event-ID` and gets what it missed, or a snapshot.
    """

    def __init__(self, inventory, buffer_size=SSE_BUFFER):
        self.inventory = inventory
        self.epoch = format(int(time.time() * 1000), 'x')
        self.seq = 0
        self.cut_off = 0
        self._ring = deque(maxlen=buffer_size)
        self._streams = set()
        self._dirty = gevent.event.Event()
        self._shutdown = gevent.event.Event()
        self._loop = gevent.get_hub().loop
        self._fan_out_greenlet = None
        self._sender = gevent.threadpool.ThreadPool(1)
        self._sending, self._closing = False, []

    @property
    def last_event_id(self):
        return f'{self.epoch}-{self.seq}'

    @property
    def open_streams(self):
        return len(self._streams)

    def start(self):
        self._sender.apply(int)  # start its thread now, not mid-drop
        self._fan_out_greenlet = gevent.spawn(self._fan_out_loop)

    def stop(self):
        self._shutdown.set()
        if self._fan_out_greenlet:
            self._fan_out_greenlet.kill()
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

    def publish(self, name, product_id, data):
        """Encode an event once; the fan-out greenlet sends it."""
        self.seq += 1
        payload = format_event(name, data, self.last_event_id)
        self._ring.append((self.seq, product_id, payload))
        self._dirty.set()

    # -- opening a stream ----------------------------------------------

    def opening(self, products=None, last_event_id=None):
        """(cursor, first bytes): `retry:` plus missed events or snapshot."""
        head = f'retry: {SSE_RETRY_MS}\n\n'.encode()
        cursor = self._resume_cursor(last_event_id)
        missed = None if cursor is None else self._since(cursor, products)
        if missed is None:
            return self.seq, head + self._snapshot(products)
        return self.seq, head + missed

    def adopt(self, sock, cursor, products):
        """Own a connected socket whose opening bytes were sent."""
        stream = Stream(sock, cursor, products)
        stream.reader = self._loop.io(sock.fileno(), 1)
        stream.reader.start(self._on_readable, stream)
        self._streams.add(stream)
        if cursor < self.seq:
            self._dirty.set()
        return stream

    def _snapshot(self, products):
        chosen = [p for p in self.inventory.ordered()
                  if products is None or p.id in products]
        return format_event('snapshot', snapshot_of(chosen),
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
                        if products is None or pid in products)

    # -- writing ---------------------------------------------------------

    def _fan_out_loop(self):
        while not self._shutdown.is_set():
            woken = self._dirty.wait(SSE_KEEPALIVE)
            self._dirty.clear()
            try:
                self._fan_out() if woken else self._keep_alive()
            except Exception:
                logger.exception('SSE fan-out failed')

    def _fan_out(self):
        """Send every stream the events after its cursor.

        The hot loop of a drop: streams at the same cursor with the same
        filter share one bytes object, and a send the kernel takes whole
        (the usual case) costs one syscall and nothing else.
        """
        target, chunks, direct = self.seq, {}, []
        for stream in list(self._streams):
            if stream.cursor >= target:
                continue
            key = (stream.cursor, stream.products)
            if key not in chunks:
                chunks[key] = self._since(*key)
            chunk, stream.cursor = chunks[key], target
            if stream.pending or chunk is None:
                self._send(stream, chunk)
            elif chunk:
                direct.append((stream, chunk))
        self._send_direct(direct)

    def _send_direct(self, pairs):
        """Write whole chunks to streams with nothing pending.

        The kernel's share of a loopback send is most of its cost and
        runs without the GIL, so a big fan-out gives half of the streams
        to a native thread (measured: 10,000 streams, 105 ms alone).
        Sockets closed meanwhile stay open until the thread is done, so
        that their numbers cannot go to new connections under it.
        """
        if len(pairs) < SSE_THREAD_FROM:
            return self._after_send(_send_each(pairs))
        half = len(pairs) // 2
        self._sending = True
        try:
            other = self._sender.spawn(_send_each, pairs[half:])
            short = []
            for start in range(0, half, SSE_FAN_OUT_SLICE):
                short += _send_each(pairs[start:min(half, start
                                                    + SSE_FAN_OUT_SLICE)])
                gevent.sleep(0)  # let purchases and requests run
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

    def _send(self, stream, data):
        """Write without ever waiting; keep the rest, bounded."""
        if data is None:  # it fell out of the ring: resume impossible
            return self._close(stream, cut_off=True)
        stream.pending += data
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
        stream.pending = stream.pending[sent:]

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


# ---------------------------------------------------------------------------
# Replication: ZeroMQ PUB/SUB between nodes
# ---------------------------------------------------------------------------

MESSAGE_FIELDS = {'availability': ('item_id', 'count', 'version'),
                  'released': ('product_id',), 'heartbeat': ()}


def encode_message(node, boot, seq, kind, **fields):
    """The two frames of one replication message."""
    body = {'node': node, 'seq': seq, 'type': kind, 'boot': boot, **fields}
    return [b'inv', json.dumps(body, separators=(',', ':')).encode()]


def decode_message(frames):
    """A received message as a dict; ValueError when it is malformed."""
    if len(frames) != 2 or frames[0] != b'inv':
        raise ValueError('not two frames starting with "inv"')
    msg = json.loads(frames[1])
    if not isinstance(msg, dict) or msg.get('type') not in MESSAGE_FIELDS:
        raise ValueError(f'unknown message {frames[1][:80]!r}')
    for name in ('seq', *MESSAGE_FIELDS[msg['type']]):
        if type(msg.get(name)) is not int:
            raise ValueError(f'{msg["type"]} message without int {name}')
    if not isinstance(msg.get('node'), str):
        raise ValueError('message without its origin node')
    return msg


def parse_time(text):
    """An ISO 8601 UTC time from a message, as stored; now if missing."""
    try:
        return datetime.fromisoformat(text.rstrip('Z'))
    except (AttributeError, ValueError):
        return utcnow()


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
        self.messages = 0

    def as_json(self, now):
        if self.last_heard is None:
            state, lag = 'never', None
        else:
            state = 'silent' if self.silent else 'connected'
            lag = round((now - self.last_heard) * 1000)
        return {'address': self.peer.replication, 'state': state,
                'last_seq': self.last_seq, 'lag_ms': lag,
                'messages': self.messages}


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
        self._shutdown = gevent.event.Event()
        self._resync_wanted = gevent.event.Event()
        self._greenlets = []

    def start(self):
        """Bind PUB, subscribe to every peer, start the loops."""
        self._keys = curve_keys(self.config)
        if self._keys:
            self._spawn(self._serve_zap, self._bind_zap())
        self._pub = self._bind_pub()
        for state in self.peers.values():
            self._spawn(self._listen, state)
        for loop in (self._heartbeat, self._watch_peers, self._resync_loop):
            self._spawn(loop)
        self.inventory.listen(self.on_inventory)

    def stop(self):
        self._shutdown.set()
        gevent.killall(self._greenlets)
        self.context.destroy(linger=0)

    def _spawn(self, fn, *args):
        self._greenlets.append(gevent.spawn(fn, *args))

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
                         release_at=product.release_at.isoformat() + 'Z')

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
        if self._keys:
            pub.curve_server = True
            pub.curve_publickey, pub.curve_secretkey = (
                k.encode() for k in self._keys)
            pub.zap_domain = b'sneakers23'
        try:
            pub.bind(self.config.replication)
        except zmq.ZMQError as e:
            raise ConfigError(f'cannot bind replication at '
                              f'{self.config.replication!r}: {e}') from None
        return pub

    def _heartbeat(self):
        while not self._shutdown.wait(HEARTBEAT_INTERVAL):
            try:
                self.publish('heartbeat')
            except Exception:
                logger.exception('replication heartbeat failed')

    # -- receiving ------------------------------------------------------

    def _listen(self, state):
        sub = self._subscribe(state.peer)
        while not self._shutdown.is_set():
            frames = sub.recv_multipart()
            try:
                self.receive(state, decode_message(frames))
            except ValueError as e:
                logger.warning('replication: bad message from %s: %s',
                               state.peer.name, e)
            except Exception:
                logger.exception('replication: applying a message failed')

    def _subscribe(self, peer):
        sub = self.context.socket(zmq.SUB)
        if self._keys:
            sub.curve_serverkey = peer.public_key.encode()
            sub.curve_publickey, sub.curve_secretkey = (
                k.encode() for k in self._keys)
            self._spawn(self._watch_handshakes, peer,
                        sub.get_monitor_socket())
        sub.setsockopt(zmq.SUBSCRIBE, b'inv')
        sub.connect(peer.replication)
        return sub

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
        if msg['type'] == 'availability':
            self.inventory.item_changed(msg['item_id'], msg['count'],
                                        msg['version'], local=False)
        elif msg['type'] == 'released':
            self.inventory.product_released(
                msg['product_id'], parse_time(msg.get('release_at')),
                local=False)

    def request_resync(self, reason):
        """Reload stock from the database soon (coalesced)."""
        logger.info('replication: reloading from the database: %s', reason)
        self._resync_wanted.set()

    def _resync_loop(self):
        while not self._shutdown.is_set():
            self._resync_wanted.wait()
            self._resync_wanted.clear()
            try:
                self.writes.refresh()
                self.resyncs += 1
            except Exception:
                logger.exception('replication: reload failed; retrying')
                self._resync_wanted.set()
                self._shutdown.wait(0.5)

    def _watch_peers(self):
        """Notice peers that went silent: their last changes may be lost."""
        while not self._shutdown.wait(HEARTBEAT_INTERVAL / 4):
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

    def _serve_zap(self, zap):
        """ZAP: only the public keys listed in peers.toml may subscribe."""
        allowed = {s.peer.public_key for s in self.peers.values()}
        while not self._shutdown.is_set():
            version, request_id, _, address, _, mechanism, *creds = (
                zap.recv_multipart())
            key = (z85.encode(creds[0]).decode()
                   if mechanism == b'CURVE' and creds else '')
            ok = key in allowed
            if not ok:
                logger.warning('replication: refused %s with a key not in '
                               'peers.toml (%s)', address.decode(), key)
            zap.send_multipart([version, request_id,
                                b'200' if ok else b'400',
                                b'OK' if ok else b'unknown key', b'', b''])

    def _watch_handshakes(self, peer, monitor):
        """Log a peer whose key is not the one peers.toml lists."""
        failed = (zmq.EVENT_HANDSHAKE_FAILED_AUTH
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        warned = False
        while not self._shutdown.is_set():
            event = recv_monitor_message(monitor)
            if event['event'] & failed and not warned:
                logger.warning('replication: refused %s at %s: its key is '
                               'not the one in peers.toml', peer.name,
                               peer.replication)
            warned = bool(event['event'] & failed) or (
                warned and event['event'] != zmq.EVENT_HANDSHAKE_SUCCEEDED)


# ---------------------------------------------------------------------------
# Web: the Bottle app
# ---------------------------------------------------------------------------

def sign(value, key):
    """`value.signature` with an HMAC-SHA256 of `value`."""
    mac = hmac.new(key.encode(), value.encode(), hashlib.sha256)
    return f'{value}.{mac.hexdigest()[:32]}'


def unsign(signed, key):
    """The value of a signed cookie, or None when the signature is wrong."""
    value, _, _ = (signed or '').rpartition('.')
    if value and hmac.compare_digest(sign(value, key), signed):
        return value
    return None


def price(cents):
    """Price for people: 12000 -> "$120.00"."""
    return f'${cents / 100:,.2f}'


class LagProbe:
    """How late the gevent hub wakes a sleeping greenlet: a stalled hub
    (blocking I/O, long CPU work) shows here, in /healthz."""

    def __init__(self, interval=LAG_PROBE_INTERVAL, window=LAG_WINDOW):
        self.interval = interval
        self._lateness = deque(maxlen=int(window / interval))
        self._shutdown = gevent.event.Event()
        self._greenlet = None

    def start(self):
        self._greenlet = gevent.spawn(self._run)

    def stop(self):
        self._shutdown.set()

    def stats(self):
        """The latest and the worst lateness in the window, in ms."""
        worst = max(self._lateness, default=0.0)
        latest = self._lateness[-1] if self._lateness else 0.0
        return {'latest': round(latest * 1000, 1),
                'max_10s': round(worst * 1000, 1)}

    def _run(self):
        while True:
            asleep = time.perf_counter()
            if self._shutdown.wait(self.interval):
                return
            late = time.perf_counter() - asleep - self.interval
            self._lateness.append(max(0.0, late))


class Node:
    """One running store node: database, memory, events, web app."""

    def __init__(self, config):
        self.config = config
        self.database = open_database(config.db_url)
        db.initialize(self.database)
        self.runner = DatabaseRunner(self.database)
        self.inventory = Inventory()
        self.hub = EventHub(self.inventory)
        self.inventory.listen(self.hub.on_inventory)
        self.writes = WritePath(self.runner, self.inventory, config.node)
        self.replicator = None
        if config.replication:
            self.replicator = Replicator(config, self.inventory, self.writes)
        self.cookie_key = ''
        self.lag = LagProbe()
        self._cache = {}

    def start(self):
        """Prepare the database, load memory, start background work."""
        self.runner.run(self._prepare_database)
        self.writes.load()
        self.hub.start()
        if self.replicator:
            self.replicator.start()
        self.lag.start()

    def stop(self):
        self.lag.stop()
        if self.replicator:
            self.replicator.stop()
        self.hub.stop()
        self.writes.stop()

    def health(self):
        """What `/healthz` shows."""
        peers = self.replicator.health() if self.replicator else {}
        return {'node': self.config.node, 'db': redact(self.config.db_url),
                'peers': peers, 'streams': self.hub.open_streams,
                'products': len(self.inventory.products),
                'event_id': self.hub.last_event_id,
                'hub_lag_ms': self.lag.stats()}

    def _prepare_database(self):
        try:
            self._create_and_seed()
        except DatabaseError:
            if not Product.table_exists():
                raise
            logger.info('another node prepared the database at once')
        self.cookie_key = Setting.get_or_make(
            'cookie_key', lambda: secrets.token_hex(32))

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
    raw = environ['wsgi.input'].read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, 'body too large')
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, 'malformed JSON') from None
    if not isinstance(data, required_type):
        raise ApiError(400, 'body must be a JSON object')
    return data


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
    try:
        return frozenset(int(part) for part in text.split(',')
                         if part.strip())
    except ValueError:
        raise ApiError(400, 'products must be a comma-separated list of '
                            'ids') from None


def api_errors(callback):
    """Bottle plugin: an ApiError becomes its JSON answer."""
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except ApiError as e:
            return json_response(e.status, {'error': e.code})
        except Unavailable:
            return json_response(503, {'error': 'unavailable'},
                                 **{'Retry-After': '1'})
    return wrapper


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


class Handler(WSGIHandler):
    """pywsgi's handler, which gives an accepted SSE request to the hub.

    The hub writes to the socket itself from then on, so a stream costs no
    greenlet, no WSGI iterator and no chunked framing: the same bytes go
    to every stream (the response ends when the connection closes).
    """

    def handle_one_response(self):
        super().handle_one_response()
        # A keep-alive client that sends its next request at once finds
        # it already buffered, and pywsgi reads it without yielding: under
        # a flood of GETs one connection held the hub for 680 ms (seen in
        # /healthz hub_lag_ms), delaying every stream. Yield per request.
        gevent.sleep(0)

    def process_result(self):
        wanted = self.environ.get(STREAM_REQUEST)
        if wanted is None or self.code != 200 or self.command != 'GET':
            return super().process_result()
        hub = self.server.application.node.hub
        cursor, opening = hub.opening(*wanted)
        self.socket.sendall(SSE_HEAD + opening)
        raw = _socket.socket(fileno=self.socket.detach())
        raw.setblocking(False)
        self.socket, self.close_connection = None, True
        hub.adopt(raw, cursor, wanted[0])


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
    app.install(api_errors)
    app.default_error_handler = error_page
    _routes(app, node)
    return app


def _routes(app, node):
    """Attach every route of the contract to `app`."""
    app.route('/', 'GET', lambda: _page(node))
    app.route('/api/products', 'GET', lambda: _products(node))
    app.route('/events', 'GET', lambda: _events(node))
    app.route('/api/purchase', 'POST', lambda: _purchase(node))
    app.route('/admin/api/products/<product_id:int>/release', 'POST',
              lambda product_id: _release(node, product_id))
    app.route('/admin/api/items/<item_id:int>/restock', 'POST',
              lambda item_id: _restock(node, item_id))
    app.route('/healthz', 'GET', lambda: _health(node))
    app.route('/static/<path:path>', 'GET', _static)


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
    bottle.request.environ[STREAM_REQUEST] = (products, last_id)
    return ''  # Handler hands the connection to the hub


def _purchase(node):
    item_id = positive_int(json_body(), 'item_id')
    item = node.inventory.items.get(item_id)
    if item is None:
        raise ApiError(404, 'not_found')
    if not node.inventory.products[item.product_id].released:
        raise ApiError(403, 'not_released')
    if item.count <= 0:
        raise ApiError(409, SOLD_OUT)  # from memory, no database trip
    outcome = node.writes.buy(item, _shopper(node))
    if not isinstance(outcome, Placed):
        raise ApiError(409, outcome)
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


def _raw_header(name):
    """A request header as WSGI gives it (latin-1), never a decode error."""
    return bottle.request.environ.get(name, '')


def _require_admin(node):
    header = _raw_header('HTTP_AUTHORIZATION')
    scheme, _, token = header.partition(' ')
    good = node.config.admin_token.encode()
    if scheme.lower() != 'bearer' or not hmac.compare_digest(
            token.strip().encode(), good):
        raise ApiError(401, 'unauthorized')


def _release(node, product_id):
    _require_admin(node)
    if product_id not in node.inventory.products:
        raise ApiError(404, 'not_found')
    changed = node.writes.release(product_id)
    return {'product_id': product_id, 'released': True, 'changed': changed}


def _restock(node, item_id):
    _require_admin(node)
    count = positive_int(json_body(), 'count', MAX_RESTOCK)
    if item_id not in node.inventory.items:
        raise ApiError(404, 'not_found')
    total = node.writes.restock(item_id, count)
    if total is None:
        raise ApiError(404, 'not_found')
    return {'item_id': item_id, 'count': total, 'level': level_of(total)}


def _health(node):
    return node.health()


def _static(path):
    response = bottle.static_file(path, root=STATIC_DIR)
    if isinstance(response, bottle.HTTPError):
        raise ApiError(404, 'not_found')
    response.set_header('Cache-Control', 'public, max-age=60')
    return response


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

COMMANDS = ('serve', 'seed', 'release', 'restock', 'sell-random', 'keygen')


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
    _url_option(release)
    restock = commands.add_parser('restock', help='add stock to an item')
    restock.add_argument('item', type=int, help='item id')
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
    return parser


def _serve_options(parser):
    parser.add_argument('--config', help='cluster file (peers.toml)')
    parser.add_argument('--node', help='this node\'s name in --config')
    parser.add_argument('--db', help='sqlite:///path or postgresql://...')
    parser.add_argument('--host', help=f'default {DEFAULT_HOST}')
    parser.add_argument('--port', type=int, help=f'default {DEFAULT_PORT}')


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
    for name in ('db', 'host', 'port'):
        value = getattr(args, name)
        if value is not None:
            fields['db_url' if name == 'db' else name] = value
    if not 0 < fields.get('port', DEFAULT_PORT) < 65536:
        raise ConfigError('--port must be between 1 and 65535')
    env = os.environ
    fields['admin_token'] = env.get('SNEAKERS23_ADMIN_TOKEN', '')
    fields['curve_secret'] = env.get('SNEAKERS23_CURVE_SECRET', '')
    fields['drop_rate'] = _drop_rate(env.get('SNEAKERS23_TEST_DROP_RATE'))
    config = Config(**fields)
    curve_keys(config)  # a wrong key stops the node before it does anything
    return config


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
    if not config.admin_token:
        config.admin_token = secrets.token_urlsafe(24)
        print(f'admin token (set SNEAKERS23_ADMIN_TOKEN to choose one): '
              f'{config.admin_token}', flush=True)
    app = create_app(config)
    server = make_server(app, config.host, config.port)
    try:
        app.node.start()
    except OperationalError as e:
        raise ConfigError(f'cannot use the database '
                          f'{redact(config.db_url)}: {_first_line(e)}') \
            from None
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
    token = os.environ.get('SNEAKERS23_ADMIN_TOKEN', '')
    if not token:
        raise ConfigError('set SNEAKERS23_ADMIN_TOKEN to the node\'s admin '
                          'token')
    return NodeClient(args.url, token)


def _report(status, answer, success):
    """Print an admin answer; the exit code for it."""
    if 200 <= status < 300:
        print(success(answer))
        return 0
    print(f'sneakers23: {status} {answer.get("error", answer)}',
          file=sys.stderr)
    return 1


def release_command(args):
    """`release PRODUCT`: by id or sku, through the admin API."""
    client = _admin_client(args)
    product_id = _find_product(client, args.product)
    status, answer = client.admin(
        f'/admin/api/products/{product_id}/release')
    return _report(status, answer, lambda a: f'product {product_id} released'
                   + ('' if a.get('changed') else ' (it already was)'))


def _find_product(client, ref):
    """A product id from an id or a sku."""
    if ref.isdigit():
        return int(ref)
    status, products = client.request('GET', '/api/products')
    for product in products if status == 200 else []:
        if product['sku'].lower() == ref.lower():
            return product['id']
    raise ConfigError(f'no product with id or sku {ref!r}')


def restock_command(args):
    """`restock ITEM COUNT` through the admin API."""
    if args.count <= 0:
        raise ConfigError('COUNT must be greater than 0')
    client = _admin_client(args)
    status, answer = client.admin(f'/admin/api/items/{args.item}/restock',
                                  {'count': args.count})
    return _report(status, answer, lambda a: f"item {a['item_id']} now has "
                   f"{a['count']} pairs ({a['level']})")


class RandomSeller:
    """The mock reducer: many new shoppers buying random in-stock sizes."""

    def __init__(self, url, shoppers, rate, until_gone, out=sys.stderr):
        self.url, self.shoppers, self.rate = url, shoppers, rate
        self.until_gone, self.out = until_gone, out
        self.sold = self.sold_out = self.failed = 0
        self.stock = {}
        self._next_slot = time.monotonic()
        self._done = gevent.event.Event()

    def run(self):
        """Sell until the stock is gone (or forever); returns pairs sold."""
        self.refresh(NodeClient(self.url))
        started = time.monotonic()
        workers = [gevent.spawn(self._shop) for _ in range(self.shoppers)]
        reporter = gevent.spawn(self._report_progress)
        try:
            gevent.joinall(workers, raise_error=True)
        finally:
            gevent.killall(workers + [reporter])
        elapsed = time.monotonic() - started
        print(f'sold {self.sold} pairs in {elapsed:.1f} s; '
              f'{self.left()} left', file=self.out, flush=True)
        return self.sold

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
    try:
        seller.run()
    except KeyboardInterrupt:
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
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    commands = {'serve': serve_command, 'seed': seed_command,
                'release': release_command, 'restock': restock_command,
                'sell-random': sell_random_command,
                'keygen': keygen_command}
    try:
        return commands[args.command](args) or 0
    except ConfigError as e:
        print(f'sneakers23: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
