"""The database layer: the truth about stock and orders."""

import sqlite3

import gevent
import gevent.threadpool
import pytest
from conftest import PG_URL, fresh_postgres
from gevent import monkey

import sneakers23
from sneakers23 import (
    ALREADY_PURCHASED,
    SOLD_OUT,
    Availability,
    IntegrityError,
    Item,
    Order,
    Placed,
    Product,
    Purchase,
    db,
    place_orders,
    place_orders_at_once,
)


@pytest.fixture
def database(db_url):
    """The models bound to a fresh, seeded database."""
    database = sneakers23.open_database(db_url)
    db.initialize(database)
    with database.connection_context():
        sneakers23.seed(sneakers23.CATALOG_PATH)
        yield database
    if hasattr(database, 'close_all'):
        database.close_all()


@pytest.fixture(params=['sqlite', 'postgres', 'postgres-one-statement'])
def place(request, tmp_path):
    """A fresh, seeded database and the way the node sells a batch there:
    statement by statement in a transaction (place_orders), or on
    PostgreSQL as one autocommitted statement (place_orders_at_once)."""
    url = (f'sqlite:///{tmp_path}/store.db' if request.param == 'sqlite'
           else fresh_postgres())
    database = sneakers23.open_database(url)
    db.initialize(database)
    with database.connection_context():
        sneakers23.seed(sneakers23.CATALOG_PATH)
        if request.param.endswith('one-statement'):
            sneakers23.install_deadline_trigger()
            yield lambda batch, node: place_orders_at_once(
                batch, node, sneakers23.time.monotonic() + 5)
        else:
            yield place_orders
    if hasattr(database, 'close_all'):
        database.close_all()


def stock(item_id):
    return Availability.get(Availability.item == item_id).count


def test_seed_writes_every_size_of_every_product(database):
    products = list(Product.select().order_by(Product.position))
    assert len(products) >= 8
    assert [p.sku for p in products[:2]] == ['SHU6000', 'SHU6100']
    for product in products:
        sizes = [i.size for i in product.items.order_by(Item.id)]
        assert sizes == list(sneakers23.SIZES)
    assert Availability.select().count() == 13 * len(products)
    assert not Product.select().where(Product.released).exists()
    assert sneakers23.seed(sneakers23.CATALOG_PATH) == 0  # already seeded


def test_batch_sells_until_zero_and_never_below(place):
    item = Item.get(Item.sku == 'SHU6000-12')
    Availability.update(count=3).where(Availability.item == item).execute()
    batch = [Purchase(item.id, item.product_id, f'shopper-{n}')
             for n in range(5)]

    outcomes = place(batch, 'a')

    assert [type(o).__name__ for o in outcomes[:3]] == ['Placed'] * 3
    assert outcomes[3:] == [SOLD_OUT, SOLD_OUT]
    assert {(o.count, o.version) for o in outcomes[:3]} == {(0, 2)}
    assert len({o.order_id for o in outcomes[:3]}) == 3
    assert stock(item.id) == 0
    assert Order.select().where(Order.item == item).count() == 3


def test_second_pair_of_a_product_rolls_back_only_itself(place):
    first, second = (Item.select().join(Availability)
                     .where((Item.product == 1) & (Availability.count > 1))
                     .order_by(Item.id).limit(2))
    before = stock(first.id), stock(second.id)
    batch = [Purchase(first.id, 1, 'same-shopper'),
             Purchase(second.id, 1, 'same-shopper'),
             Purchase(second.id, 1, 'another-shopper')]

    outcomes = place(batch, 'a')

    assert isinstance(outcomes[0], Placed)
    assert outcomes[1] == ALREADY_PURCHASED
    assert isinstance(outcomes[2], Placed)
    assert stock(first.id) == before[0] - 1
    assert stock(second.id) == before[1] - 1
    assert Order.select().count() == 2


def test_versions_grow_with_every_change(database):
    item = Item.get(Item.sku == 'SHU6000-9')
    version = Availability.get(Availability.item == item).version
    _, after_sale = Availability.take(item.id, 1)
    count, after_restock = Availability.add(item.id, 10)
    assert (after_sale, after_restock) == (version + 1, version + 2)
    assert count == stock(item.id)


def test_count_cannot_go_negative_in_the_database(database):
    item = Item.get(Item.sku == 'SHU6000-9')
    with pytest.raises(IntegrityError), db.atomic():
        (Availability.update(count=-1)
         .where(Availability.item == item).execute())
    assert stock(item.id) >= 0


def test_release_is_recorded_once(database):
    at = sneakers23.utcnow()
    assert Product.release(1, at) is True
    assert Product.release(1, sneakers23.utcnow()) is False
    product = Product.get_by_id(1)
    assert product.released and product.release_at == at


def test_a_refused_buyer_leaves_the_pair_to_the_next(place):
    item = Item.get(Item.sku == 'SHU6000-12')
    other = Item.get(Item.sku == 'SHU6000-11')
    Availability.update(count=2).where(Availability.item == item).execute()
    place([Purchase(other.id, 1, 'has-one')], 'a')
    batch = [Purchase(item.id, 1, 'has-one'),     # already has a pair
             Purchase(item.id, 1, 'twice'),
             Purchase(item.id, 1, 'twice'),       # same batch, same shopper
             Purchase(item.id, 1, 'third'),
             Purchase(item.id, 1, 'fourth')]      # nothing left for them

    outcomes = place(batch, 'a')

    assert outcomes[0] == ALREADY_PURCHASED
    assert isinstance(outcomes[1], Placed)
    assert outcomes[2] == ALREADY_PURCHASED
    assert isinstance(outcomes[3], Placed)
    assert outcomes[4] == SOLD_OUT
    assert stock(item.id) == 0
    shoppers = {o.shopper for o in Order.select().where(Order.item == item)}
    assert shoppers == {'twice', 'third'}


def test_a_batch_past_its_deadline_commits_nothing(database):
    """The guarantee behind every 503: a late COMMIT fails, on PostgreSQL
    by the deferred trigger (the COMMIT itself is refused), on SQLite by
    the check just before COMMIT."""
    sneakers23.install_deadline_trigger()
    item = Item.get(Item.sku == 'SHU6000-9')
    Availability.update(count=5).where(Availability.item == item).execute()
    before = stock(item.id)
    batch = [Purchase(item.id, item.product_id, 'late-shopper')]
    deadline = sneakers23.time.monotonic() + 5

    real_monotonic = sneakers23.time.monotonic
    sneakers23.time.monotonic = lambda: real_monotonic() + 10  # too late
    try:
        with pytest.raises((sneakers23.DeadlinePassed,
                            sneakers23.DatabaseError)):
            sneakers23.commit_batch(batch, [], 'a', deadline)
    finally:
        sneakers23.time.monotonic = real_monotonic

    assert stock(item.id) == before
    assert not Order.select().where(Order.shopper == 'late-shopper').exists()


def test_a_write_that_fails_is_rolled_back_alone(database):
    """One write of a batch fails in the database: it alone is undone and
    answered with its error; the writes and purchases beside it commit."""
    item = Item.get(Item.sku == 'SHU6000-9')
    Availability.update(count=5).where(Availability.item == item).execute()

    def restock_then_fail():
        Availability.add(item.id, 100)   # undone with the failure
        db.execute_sql('INSERT INTO no_such_table VALUES (1)')

    writes = [sneakers23.Write(restock_then_fail, ()),
              sneakers23.Write(Availability.add, (item.id, 2))]
    purchases = [Purchase(item.id, item.product_id, 'beside-a-failure')]
    done, outcomes = sneakers23.commit_batch(
        purchases, writes, 'a', sneakers23.time.monotonic() + 5)

    assert isinstance(done[0], sneakers23.DatabaseError)
    assert done[1][0] == 7
    assert isinstance(outcomes[0], Placed) and outcomes[0].count == 6
    assert stock(item.id) == 6
    assert Order.select().where(Order.shopper == 'beside-a-failure').exists()


@pytest.fixture
def pg_database():
    """The models bound to a fresh, seeded PostgreSQL database."""
    database = sneakers23.open_database(fresh_postgres())
    db.initialize(database)
    with database.connection_context():
        sneakers23.seed(sneakers23.CATALOG_PATH)
        yield database
    database.close_all()


def test_a_late_commit_is_refused_by_the_postgres_trigger(pg_database):
    """The trigger alone, as a stalled server would meet it: the COMMIT
    arrives after the moment the node set."""
    sneakers23.install_deadline_trigger()
    item = Item.get(Item.sku == 'SHU6000-10')
    Availability.update(count=5).where(Availability.item == item).execute()
    before = stock(item.id)
    with pytest.raises(sneakers23.DatabaseError, match='deadline passed'):
        with db.atomic():
            sneakers23.set_commit_deadline(
                sneakers23.time.monotonic() - 0.001)
            Availability.take(item.id, 1)
    assert stock(item.id) == before
    with db.atomic():  # in time: committed
        sneakers23.set_commit_deadline(sneakers23.time.monotonic() + 5)
        Availability.take(item.id, 1)
    assert stock(item.id) == before - 1


def test_one_statement_past_its_deadline_commits_nothing(pg_database,
                                                         monkeypatch):
    """The purchases' one statement commits on the server as it ends:
    the deadline trigger refuses that COMMIT too once the moment the
    node set has passed."""
    sneakers23.install_deadline_trigger()
    item = Item.get(Item.sku == 'SHU6000-10')
    Availability.update(count=5).where(Availability.item == item).execute()
    before = stock(item.id)
    past = sneakers23.datetime.now(sneakers23.UTC).isoformat()
    monkeypatch.setattr(sneakers23, 'wall_moment', lambda deadline: past)
    with pytest.raises(sneakers23.DatabaseError, match='deadline passed'):
        place_orders_at_once([Purchase(item.id, item.product_id, 'late')],
                             'a', sneakers23.time.monotonic() + 5)
    assert stock(item.id) == before
    assert not Order.select().where(Order.shopper == 'late').exists()

    monkeypatch.undo()
    outcomes = place_orders_at_once(
        [Purchase(item.id, item.product_id, 'in-time')], 'a',
        sneakers23.time.monotonic() + 5)
    assert isinstance(outcomes[0], Placed)
    assert (outcomes[0].count, stock(item.id)) == (before - 1, before - 1)


def test_prepared_queries_follow_the_database_in_use(pg_database,
                                                     tmp_path):
    """Compiled SQL is kept per database object: alternating new SQLite
    and PostgreSQL database objects, each gets its own dialect (ids of
    dead objects are reused: a cache keyed by id() once sent SQLite's SQL
    to PostgreSQL)."""
    sqlite_url = f'sqlite:///{tmp_path}/store.db'
    db.initialize(sneakers23.open_database(sqlite_url))
    with db.obj.connection_context():
        sneakers23.seed(sneakers23.CATALOG_PATH)
    for n in range(1, 21):
        for url in (PG_URL, sqlite_url):
            database = sneakers23.open_database(url)
            db.initialize(database)
            with database.connection_context():
                assert Availability.add(1, 1)[0] == 120 + n, url
            if hasattr(database, 'close_all'):
                database.close_all()
            del database


def test_a_database_error_while_preparing_stops_the_start(tmp_path,
                                                          monkeypatch):
    """Only a concurrent seed (IntegrityError: another node seeded at the
    same moment) is forgiven at start; any other database error stops the
    node instead of leaving it serving an unseeded store."""
    url = f'sqlite:///{tmp_path}/store.db'
    database = sneakers23.open_database(url)
    db.initialize(database)
    with database.connection_context():
        sneakers23.create_tables()   # tables there, no products

    def broken_seed(*args, **kwargs):
        raise sneakers23.OperationalError('disk I/O error')

    monkeypatch.setattr(sneakers23, 'seed', broken_seed)
    node = sneakers23.Node(sneakers23.Config(db_url=url, port=0))
    try:
        with pytest.raises(sneakers23.OperationalError, match='disk I/O'):
            node.start()
    finally:
        node.stop()


def test_the_deadline_trigger_is_made_once(pg_database):
    """A node starting mid-drop must not lock the hot table: the trigger
    is created only when it is missing, so its oid stays the same."""
    def trigger_oid():
        return db.execute_sql(
            "SELECT oid FROM pg_trigger WHERE tgname = "
            "'availability_deadline'").fetchall()

    sneakers23.install_deadline_trigger()
    first = trigger_oid()
    sneakers23.install_deadline_trigger()
    assert len(first) == 1 and trigger_oid() == first


def test_a_commit_on_its_thread_lets_the_hub_run_and_hands_back_errors():
    """SQLite's COMMIT runs on a native thread while the hub serves
    others; its result or its error comes back to the waiting greenlet."""
    native_event = monkey.get_original('threading', 'Event')
    start_thread = monkey.get_original('_thread', 'start_new_thread')
    pool = gevent.threadpool.ThreadPool(1)
    try:
        served = native_event()
        helper = gevent.spawn(served.set)   # runs only if the hub does
        # The "COMMIT" waits (without the GIL) for a greenlet to run.
        assert sneakers23._call_in_thread_first(
            pool, lambda: served.wait(10)) is True
        helper.join()

        def disk_full():
            raise sqlite3.OperationalError('database or disk is full')
        with pytest.raises(sqlite3.OperationalError, match='disk is full'):
            sneakers23._call_in_thread_first(pool, disk_full)

        # From another thread than the pool's hub: run in place.
        done, answer = native_event(), []

        def elsewhere():
            answer.append(sneakers23._call_in_thread_first(pool,
                                                           lambda: 42))
            done.set()
        start_thread(elsewhere, ())
        assert pool.apply(done.wait, (10,)) and answer == [42]
    finally:
        pool.kill()
