"""The database layer: the truth about stock and orders."""

import pytest

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


def test_batch_sells_until_zero_and_never_below(database):
    item = Item.get(Item.sku == 'SHU6000-12')
    Availability.update(count=3).where(Availability.item == item).execute()
    batch = [Purchase(item.id, item.product_id, f'shopper-{n}')
             for n in range(5)]

    outcomes = place_orders(batch, 'a')

    assert [type(o).__name__ for o in outcomes[:3]] == ['Placed'] * 3
    assert outcomes[3:] == [SOLD_OUT, SOLD_OUT]
    assert [o.count for o in outcomes[:3]] == [2, 1, 0]
    assert stock(item.id) == 0
    assert Order.select().where(Order.item == item).count() == 3


def test_second_pair_of_a_product_rolls_back_only_itself(database):
    first, second = (Item.select().join(Availability)
                     .where((Item.product == 1) & (Availability.count > 1))
                     .order_by(Item.id).limit(2))
    before = stock(first.id), stock(second.id)
    batch = [Purchase(first.id, 1, 'same-shopper'),
             Purchase(second.id, 1, 'same-shopper'),
             Purchase(second.id, 1, 'another-shopper')]

    outcomes = place_orders(batch, 'a')

    assert isinstance(outcomes[0], Placed)
    assert outcomes[1] == ALREADY_PURCHASED
    assert isinstance(outcomes[2], Placed)
    assert stock(first.id) == before[0] - 1
    assert stock(second.id) == before[1] - 1
    assert Order.select().count() == 2


def test_versions_grow_with_every_change(database):
    item = Item.get(Item.sku == 'SHU6000-9')
    version = Availability.get(Availability.item == item).version
    _, after_sale = Availability.take_one(item.id)
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
