"""The store page in a real browser: what a shopper sees, live.

Headless Debian chromium (`/usr/bin/chromium`) driven by Playwright; every
test starts its own node on a fresh SQLite database, opens the page and
changes the store through the HTTP API while the page stays open.
"""

import re
from datetime import UTC, datetime, timedelta

import gevent
import pytest
from conftest import (
    LAPTOP,
    LIVE,
    MARK,
    card,
    level_class,
    product_of,
    size_button,
)
from playwright.sync_api import expect

RECONNECT = 10_000    # ms: EventSource retries every 2 s (`retry: 2000`)
PHONE = {'width': 390, 'height': 844}


def expect_sizes(page, product, timeout=LIVE):
    """The card shows one button per item, each at the item's level."""
    entries = card(page, product['id']).locator('.size-container__entry')
    expect(entries).to_have_count(len(product['items']), timeout=timeout)
    for position, item in enumerate(product['items']):
        button = entries.nth(position)
        expect(button).to_have_attribute('value', str(item['id']))
        expect(button).to_have_text(item['size'])
        expect(button).to_have_class(level_class(item['level']))
        if item['level'] == 'out':
            expect(button).to_be_disabled()
        else:
            expect(button).to_be_enabled()
    expect(card(page, product['id'])).not_to_contain_text(
        'coming soon', ignore_case=True)


def expect_out(page, item_id, timeout=LIVE):
    button = size_button(page, item_id)
    expect(button).to_have_class(level_class('out'), timeout=timeout)
    expect(button).to_be_disabled()


def expect_not_reloaded(page):
    assert page.evaluate(MARK) is True, 'the page was reloaded'


def buy_out(node, item_id):
    """Buy every pair of an item, one new shopper (no cookie) per pair."""
    count = node.item(item_id)['count']
    assert 0 < count <= 50, 'pick an item with a small count'
    jobs = [gevent.spawn(node.post, '/api/purchase', {'item_id': item_id})
            for _ in range(count)]
    gevent.joinall(jobs, raise_error=True)
    assert [job.value[0] for job in jobs] == [201] * count
    assert node.item(item_id)['count'] == 0


def test_page_shows_every_product_and_goes_live(sqlite_node, open_page):
    node = sqlite_node
    node.release(2)
    products = node.products()
    page = open_page(node)
    cards = page.locator('.product[data-product-id]')
    expect(cards).to_have_count(len(products))
    shown = [int(i) for i in page.eval_on_selector_all(
        '.product[data-product-id]',
        'cards => cards.map(c => c.dataset.productId)')]
    assert shown == [p['id'] for p in products]
    for product in products:
        if product['released']:
            expect_sizes(page, product)
        else:
            expect(card(page, product['id'])).to_contain_text(
                'coming soon', ignore_case=True)
            expect(card(page, product['id']).locator(
                '.size-container__entry')).to_have_count(0)
    assert sum(p['released'] for p in products) == 1
    expect(page.locator('#connection')).to_have_attribute(
        'data-state', 'live')
    expect(page.locator('#connection')).to_contain_text(
        'live', ignore_case=True)


def test_release_shows_sizes_without_reload(sqlite_node, open_page):
    node = sqlite_node
    page = open_page(node)
    expect(card(page, 3)).to_contain_text('coming soon', ignore_case=True)
    node.release(3)
    product = product_of(node, 3)
    expect_sizes(page, product)
    assert {i['level'] for i in product['items']} == {
        'out', 'low', 'medium', 'high'}
    expect(card(page, 4)).to_contain_text('coming soon', ignore_case=True)
    expect_not_reloaded(page)


def test_sold_out_size_turns_out_and_disabled(sqlite_node, open_page):
    node = sqlite_node
    node.release(5)
    page = open_page(node)
    item_id = 65                # size 12, 8 pairs: low
    expect(size_button(page, item_id)).to_have_class(level_class('low'))
    expect(size_button(page, item_id)).to_be_enabled()
    buy_out(node, item_id)
    expect_out(page, item_id)
    expect(size_button(page, item_id)).not_to_have_class(
        level_class('low'))
    expect_sizes(page, product_of(node, 5))
    expect_not_reloaded(page)


def test_page_goes_offline_and_back_live_on_restart(sqlite_node,
                                                    open_page):
    node = sqlite_node
    page = open_page(node)
    connection = page.locator('#connection')
    node.stop()
    expect(connection).to_have_attribute('data-state', 'offline',
                                         timeout=RECONNECT)
    expect(connection).to_contain_text('offline', ignore_case=True)
    node.start()
    expect(connection).to_have_attribute('data-state', 'live',
                                         timeout=RECONNECT)
    expect(connection).not_to_contain_text('offline', ignore_case=True)
    node.release(7)
    expect_sizes(page, product_of(node, 7))
    buy_out(node, 91)           # size 12 of product 7: a single pair
    expect_out(page, 91)
    expect_not_reloaded(page)


def test_page_catches_up_on_what_it_missed(sqlite_node, open_page):
    """Changes made while the page cannot reach the restarted node show
    once it reconnects (the new epoch answers with a snapshot)."""
    node = sqlite_node
    node.release(5)
    page = open_page(node)
    connection = page.locator('#connection')
    node.stop()
    expect(connection).to_have_attribute('data-state', 'offline',
                                         timeout=RECONNECT)
    page.route('**/events*', lambda route: route.abort())
    node.start()
    node.release(3)
    buy_out(node, 65)
    expect(connection).to_have_attribute('data-state', 'offline')
    expect(card(page, 3)).to_contain_text('coming soon', ignore_case=True)
    page.unroute('**/events*')
    expect(connection).to_have_attribute('data-state', 'live',
                                         timeout=RECONNECT)
    expect_sizes(page, product_of(node, 3))
    expect_out(page, 65)
    expect_sizes(page, product_of(node, 5))
    node.release(4)             # and the stream is live again
    expect_sizes(page, product_of(node, 4))
    expect_not_reloaded(page)


def test_buying_from_the_page(sqlite_node, open_page):
    node = sqlite_node
    node.release(2)
    page = open_page(node)
    product = product_of(node, 2)
    first, second = product['items'][4], product['items'][5]
    assert first['level'] != 'out' and second['level'] != 'out'
    status = card(page, 2).locator('.product__status')
    size_button(page, first['id']).click()
    expect(status).to_contain_text('is yours')
    expect(status).to_contain_text(first['size'])
    assert node.item(first['id'])['count'] == first['count'] - 1
    size_button(page, second['id']).click()
    expect(status).to_contain_text('one pair per shopper')
    expect(status).not_to_contain_text('is yours')
    assert node.item(second['id'])['count'] == second['count']
    assert node.item(first['id'])['count'] == first['count'] - 1
    expect_not_reloaded(page)


def test_double_click_buys_one_pair_and_says_so(sqlite_node, open_page):
    """A shopper who double-clicks a size gets one pair and is told so."""
    node = sqlite_node
    node.release(2)
    page = open_page(node)
    item = product_of(node, 2)['items'][4]
    pending, answers = set(), []

    def sent(request):
        if request.url.endswith('/api/purchase'):
            pending.add(request)

    def done(request):
        if request in pending:
            pending.discard(request)
            answers.append(request)

    page.on('request', sent)
    page.on('requestfinished', done)
    page.on('requestfailed', done)
    size_button(page, item['id']).dblclick()
    status = card(page, 2).locator('.product__status')
    expect(status).not_to_have_text('')
    for _ in range(100):        # until every purchase request answered
        if answers and not pending:
            break
        page.wait_for_timeout(50)
    assert answers and not pending
    assert node.item(item['id'])['count'] == item['count'] - 1
    expect(status).to_contain_text('yours')
    expect(status).not_to_contain_text('not yours')


@pytest.mark.parametrize('viewport', [PHONE, LAPTOP],
                         ids=['phone', 'laptop'])
def test_no_horizontal_scroll(sqlite_node, open_page, viewport):
    node = sqlite_node
    node.release(1)
    node.release(6)
    page = open_page(node, viewport)
    expect_sizes(page, product_of(node, 1))
    page.wait_for_function('Array.from(document.images)'
                           '.every(i => i.complete)')
    width = page.evaluate('[document.documentElement.scrollWidth, '
                          'window.innerWidth]')
    assert width[0] <= width[1], f'horizontal scroll: {width}'
    png = page.screenshot(full_page=True)
    assert png[12:16] == b'IHDR'
    shot_width = int.from_bytes(png[16:20], 'big')
    assert shot_width == viewport['width'], 'the page is wider than the view'


# ---------------------------------------------------------------------------
# Drop day: a countdown to a scheduled release, paused sales
# ---------------------------------------------------------------------------

def test_countdown_on_a_wrong_clock_flips_to_sizes_at_the_moment(
        sqlite_node, browser):
    """The browser's clock is 3 minutes slow: the countdown still counts
    to the store's moment, and the sizes come with `released`."""
    node = sqlite_node
    context = browser.new_context(viewport=LAPTOP)
    context.add_init_script(
        '{ const real = Date.now.bind(Date);'
        '  Date.now = () => real() - 180000; }')
    try:
        page = context.new_page()
        page.goto(node.url)
        expect(page.locator('#connection')).to_have_attribute(
            'data-state', 'live', timeout=LIVE)
        page.evaluate(f'{MARK} = true')
        moment = datetime.now(UTC) + timedelta(seconds=4)
        at = moment.isoformat().replace('+00:00', 'Z')
        node.schedule(5, at)
        countdown = card(page, 5).locator('.countdown')
        expect(card(page, 5)).to_have_attribute('data-release-at', at,
                                                timeout=LIVE)
        # 3 minutes off would read "in 3:0x"; the store's clock: "0:0x"
        expect(countdown).to_have_text(re.compile(r'in 0:0[0-5]$'),
                                       timeout=LIVE)
        expect_sizes(page, product_of(node, 5), timeout=LIVE + 4_000)
        late = (datetime.now(UTC) - moment).total_seconds()
        print(f'sizes on the page {late:.2f} s after the moment')
        assert late < 3, late   # the contract's 1 s, with room for CI
        expect(countdown).to_have_count(0)
        expect_not_reloaded(page)
    finally:
        context.close()


def test_sales_paused_shows_and_goes(sqlite_node, open_page):
    node = sqlite_node
    node.release(1)
    page = open_page(node)
    banner = page.locator('#sales')
    expect(banner).to_be_hidden()
    node.set_paused(True)
    expect(banner).to_be_visible(timeout=LIVE)
    expect(banner).to_contain_text('Sales paused')
    in_stock = next(i for i in product_of(node, 1)['items']
                    if i['count'] > 0)
    size_button(page, in_stock['id']).click()
    expect(card(page, 1).locator('.product__status')).to_contain_text(
        'sales are paused', timeout=LIVE)
    assert node.item(in_stock['id'])['count'] == in_stock['count']
    node.set_paused(False)
    expect(banner).to_contain_text('back on', timeout=LIVE)
    size_button(page, in_stock['id']).click()
    expect(card(page, 1).locator('.product__status')).to_contain_text(
        'is yours', timeout=LIVE)
    expect_not_reloaded(page)
