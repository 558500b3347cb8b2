"""The in-memory inventory: what every read is served from."""

import pytest
from conftest import item_row, product_row

import sneakers23
from sneakers23 import Inventory, level_of


@pytest.fixture
def inventory():
    inventory = Inventory()
    inventory.load([(product_row(1, released=True),
                     [item_row(10, 1, 150), item_row(11, 1, 0)]),
                    (product_row(2), [item_row(20, 2, 700)])])
    return inventory


@pytest.mark.parametrize('count, level', [
    (-1, 'out'), (0, 'out'), (1, 'low'), (149, 'low'), (150, 'medium'),
    (499, 'medium'), (500, 'high'), (10**6, 'high')])
def test_level_of(count, level):
    assert level_of(count) == level


def test_newer_versions_apply_and_older_ones_do_not(inventory):
    told = []
    inventory.listen(lambda *event: told.append(event))
    assert inventory.item_changed(10, 149, 2) is True
    assert inventory.item_changed(10, 150, 2) is False  # duplicate
    assert inventory.item_changed(10, 151, 1) is False  # older
    assert inventory.items[10].count == 149
    kind, product, item, old_level, local = told[0]
    assert (kind, product.id, item.id, old_level, local) == (
        'availability', 1, 10, 'medium', True)
    assert len(told) == 1


def test_remote_changes_are_flagged(inventory):
    told = []
    inventory.listen(lambda *event: told.append(event))
    inventory.item_changed(20, 5, 9, local=False)
    inventory.product_released(2, sneakers23.utcnow(), local=False)
    assert [(kind, local) for kind, *_, local in told] == [
        ('availability', False), ('released', False)]


def test_release_happens_once(inventory):
    at = sneakers23.utcnow()
    assert inventory.product_released(2, at) is True
    assert inventory.product_released(2, at) is False
    assert inventory.products[2].released
    assert inventory.product_released(99, at) is False


def test_json_follows_changes(inventory):
    before = inventory.products[1].json_bytes()
    inventory.item_changed(10, 3, 5)
    after = inventory.products[1].json_bytes()
    assert before != after and b'"count":3' in after
    assert inventory.released_stock() == 3


def test_a_failing_listener_does_not_stop_the_others(inventory):
    told = []
    inventory.listen(lambda *event: 1 / 0)
    inventory.listen(lambda *event: told.append(event))
    inventory.item_changed(10, 1, 2)
    assert len(told) == 1


def test_an_older_pause_setting_never_undoes_a_newer_one():
    """A reload that read the setting before a resume must not pause the
    store again (the setting's version decides, as counts' versions do)."""
    inventory = sneakers23.Inventory()
    seen = []
    inventory.listen(lambda kind, *rest: seen.append(kind))
    assert inventory.sales_changed(True, 1)
    assert inventory.sales_changed(False, 2)
    assert not inventory.sales_changed(True, 1, local=False)  # stale
    assert inventory.paused is False and inventory.sales_version == 2
    assert not inventory.sales_changed(False, 3)   # same value, newer
    assert inventory.sales_version == 3
    assert seen == ['sales', 'sales']
