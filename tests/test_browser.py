"""The store page in a real browser: what a shopper sees, live.

Headless Debian chromium (`/usr/bin/chromium`) driven by Playwright; every
test starts its own node on a fresh SQLite database, opens the page and
changes the store through the HTTP API while the page stays open.
"""

import re
from datetime import UTC, datetime, timedelta

import gevent
import pytest
from axe_playwright_python.sync_playwright import Axe
from conftest import (
    LAPTOP,
    LIVE,
    MARK,
    Cluster,
    call,
    card,
    db_rows,
    level_class,
    product_of,
    seed_database,
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


def buy_button(page, product_id):
    return card(page, product_id).locator('.product__buy')


def choose(page, item_id):
    """Tap a size: it is selected, and its card offers to buy it."""
    size_button(page, item_id).click()
    expect(size_button(page, item_id)).to_have_attribute('aria-pressed',
                                                         'true')
    button = page.locator('.product', has=size_button(page, item_id)) \
        .locator('.product__buy')
    expect(button).to_be_visible()
    return button


def buy_on_page(page, product_id, item):
    """Select `item`, confirm; wait for "Yours" on the card."""
    choose(page, item['id']).click()
    expect_yours(page, product_id, item['size'])


def expect_yours(page, product_id, size, timeout=LIVE):
    expect(card(page, product_id).locator('.product__yours')).to_have_text(
        re.compile(rf'^Yours: size {re.escape(size)}, order #\d+$'),
        timeout=timeout)


def orders_of_page(page, node):
    """The page's shopper's orders, from the node (its cookie, not JS)."""
    cookie = '; '.join(f"{c['name']}={c['value']}"
                       for c in page.context.cookies(node.url))
    status, _, orders = call(node.url, 'GET', '/api/orders',
                             headers={'Cookie': cookie})
    assert status == 200, orders
    return orders


def purchase_requests(page):
    """A list that fills with every POST /api/purchase the page sends."""
    sent = []
    page.on('request', lambda request: sent.append(request)
            if request.url.endswith('/api/purchase') else None)
    return sent


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


@pytest.mark.parametrize('viewport', [PHONE, LAPTOP],
                         ids=['phone', 'laptop'])
def test_one_tap_selects_and_only_the_confirm_buys(sqlite_node, open_page,
                                                   viewport):
    node = sqlite_node
    node.release(2)
    page = open_page(node, viewport)
    sent = purchase_requests(page)
    product = product_of(node, 2)
    first, second, third = product['items'][4:7]
    assert 'out' not in {first['level'], second['level'], third['level']}
    confirm = choose(page, first['id'])
    confirm = choose(page, second['id'])     # a change of mind
    expect(size_button(page, first['id'])).to_have_attribute(
        'aria-pressed', 'false')
    price = card(page, 2).locator('.product__price').inner_text()
    expect(confirm).to_have_text(f'Buy size {second["size"]} · {price}')
    assert sent == [] and orders_of_page(page, node) == []

    confirm.click()

    expect_yours(page, 2, second['size'])
    [order] = orders_of_page(page, node)
    assert (order['product_id'], order['item_id']) == (2, second['id'])
    expect(card(page, 2).locator('.product__yours')).to_have_text(
        f'Yours: size {second["size"]}, order #{order["order_id"]}')
    expect(page.locator('#announcer')).to_contain_text('is yours')
    expect(confirm).to_be_hidden()
    assert len(sent) == 1
    assert node.item(first['id'])['count'] == first['count']
    assert node.item(second['id'])['count'] == second['count'] - 1
    size_button(page, third['id']).click()      # one pair per drop
    expect(card(page, 2).locator('.product__status')).to_contain_text(
        'one pair per shopper')
    expect(confirm).to_be_hidden()
    assert len(sent) == 1 and len(orders_of_page(page, node)) == 1
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
    size_button(page, item['id']).dblclick()    # selects, never buys
    confirm = buy_button(page, 2)
    expect(confirm).to_be_visible()
    assert not answers and not pending
    confirm.dblclick()
    expect_yours(page, 2, item['size'])
    for _ in range(100):        # until every purchase request answered
        if answers and not pending:
            break
        page.wait_for_timeout(50)
    assert answers and not pending
    assert node.item(item['id'])['count'] == item['count'] - 1
    assert len(orders_of_page(page, node)) == 1
    status = card(page, 2).locator('.product__status')
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
    confirm = choose(page, in_stock['id'])
    confirm.click()
    expect(card(page, 1).locator('.product__status')).to_contain_text(
        'sales are paused', timeout=LIVE)
    assert node.item(in_stock['id'])['count'] == in_stock['count']
    node.set_paused(False)
    expect(banner).to_contain_text('back on', timeout=LIVE)
    confirm.click()             # the size stays selected: try again
    expect_yours(page, 1, in_stock['size'])
    expect(card(page, 1).locator('.product__status')).to_have_text('')
    expect_not_reloaded(page)


# ---------------------------------------------------------------------------
# Shoppers on drop day: their pairs, sold out, words, phones, screen readers
# ---------------------------------------------------------------------------

def set_counts(db_url, counts):
    """Give items exactly these pair counts, in the database."""
    for item_id, count in counts.items():
        db_rows(db_url, 'UPDATE availability SET count = ? '
                        'WHERE item_id = ?', (count, item_id))


def item_ids(product_id, sizes=13):
    """The seed catalogue's item ids of one product (13 sizes each)."""
    first = (product_id - 1) * sizes + 1
    return list(range(first, first + sizes))


@pytest.fixture
def two_nodes(tmp_path, sqlite_url):
    """`two_nodes(counts={})`: nodes a and b of one store (one SQLite
    file, replicating), its items given `counts` before they start."""
    cluster = Cluster(tmp_path, sqlite_url, names=('a', 'b'))

    def start(counts=None):
        seed_database(sqlite_url)
        set_counts(sqlite_url, counts or {})
        cluster.start()
        return cluster.nodes['a'], cluster.nodes['b']

    yield start
    cluster.close()


def test_yours_lasts_across_reloads_tabs_and_nodes(two_nodes, open_page):
    a, b = two_nodes()
    a.release(1)
    page = open_page(a, PHONE)
    other_tab = open_page(a, context=page.context)
    item = next(i for i in product_of(a, 1)['items'] if i['count'] > 0)
    pairs = page.locator('#your-pairs')
    expect(pairs).to_be_hidden()

    buy_on_page(page, 1, item)

    [order] = orders_of_page(page, a)
    name = card(page, 1).locator('.product__name').inner_text()
    entry = f'{name} · size {item["size"]} · order #{order["order_id"]}'
    expect(pairs).to_be_visible()
    expect(pairs.locator('li')).to_have_text([entry])
    expect_yours(other_tab, 1, item['size'])    # told, not reloaded
    expect(other_tab.locator('#your-pairs li')).to_have_text([entry])
    expect_not_reloaded(other_tab)
    page.reload()
    expect_yours(page, 1, item['size'])
    expect(pairs.locator('li')).to_have_text([entry])
    on_b = open_page(b, context=page.context)   # the same cookie
    expect_yours(on_b, 1, item['size'])
    expect(on_b.locator('#your-pairs li')).to_have_text([entry])
    assert orders_of_page(on_b, b) == [order]
    expect(card(on_b, 2).locator('.product__yours')).to_have_text('')


@pytest.mark.parametrize('viewport', [PHONE, LAPTOP],
                         ids=['phone', 'laptop'])
def test_selected_size_and_then_the_product_sell_out_elsewhere(
        two_nodes, open_page, viewport):
    """Two pairs left of product 5, both bought on node b while the
    shopper on node a has one of them selected."""
    first, second, *rest = item_ids(5)
    a, b = two_nodes({first: 1, second: 1, **dict.fromkeys(rest, 0)})
    a.release(5)
    page = open_page(a, viewport)
    status = card(page, 5).locator('.product__status')
    badge = card(page, 5).locator('.product__sold-out')
    confirm = choose(page, first)

    assert b.post('/api/purchase', {'item_id': first})[0] == 201

    expect_out(page, first)
    expect(size_button(page, first)).to_have_attribute('aria-pressed',
                                                       'false')
    expect(confirm).to_be_hidden()
    size = size_button(page, first).inner_text()
    expect(status).to_have_text(f'Size {size} sold out before you '
                                'confirmed. Pick another size.')
    expect(page.locator('#announcer')).to_contain_text(
        'sold out before you confirmed')
    expect(badge).to_be_hidden()
    assert orders_of_page(page, a) == []

    assert b.post('/api/purchase', {'item_id': second})[0] == 201

    expect(badge).to_be_visible(timeout=LIVE)
    expect(badge).to_have_text('Sold out')
    expect(status).to_have_text('')        # the refusal is stale now
    name = card(page, 5).locator('.product__name').inner_text()
    expect(page.locator('#announcer')).to_have_text(f'{name} is sold out.')
    expect(card(page, 1).locator('.product__sold-out')).to_be_hidden()
    expect_not_reloaded(page)
    page.reload()
    expect(badge).to_have_text('Sold out')


def test_keyboard_selects_cancels_and_buys(sqlite_node, open_page):
    node = sqlite_node
    node.release(2)
    page = open_page(node)
    item = product_of(node, 2)['items'][4]
    button, confirm = size_button(page, item['id']), buy_button(page, 2)
    button.focus()
    page.keyboard.press('Enter')
    expect(button).to_have_attribute('aria-pressed', 'true')
    expect(confirm).to_be_visible()
    page.keyboard.press('Escape')
    expect(button).to_have_attribute('aria-pressed', 'false')
    expect(confirm).to_be_hidden()
    expect(button).to_be_focused()
    page.keyboard.press('Space')
    expect(confirm).to_be_visible()
    for _ in range(20):         # Tab past the other sizes to the confirm
        page.keyboard.press('Tab')
        if confirm.evaluate('b => b === document.activeElement'):
            break
    expect(confirm).to_be_focused()
    assert orders_of_page(page, node) == []
    page.keyboard.press('Enter')
    expect_yours(page, 2, item['size'])
    expect(button).to_be_focused()          # not lost with the confirm
    assert len(orders_of_page(page, node)) == 1


def fully_visible(page, top):
    """How many product cards lie wholly between `top` and the bottom of
    the viewport."""
    return page.evaluate('''top => [...document.querySelectorAll(
        '.product')].filter(card => {
          const box = card.getBoundingClientRect();
          return box.top >= top && box.bottom <= window.innerHeight;
        }).length''', top)


def smallest_target(page, selector):
    """(width, height) of the smallest visible element of `selector`."""
    boxes = [box for box in (element.bounding_box() for element in
                             page.locator(selector).all()) if box]
    assert boxes, selector
    return (min(box['width'] for box in boxes),
            min(box['height'] for box in boxes))


@pytest.mark.parametrize('viewport', [PHONE, LAPTOP],
                         ids=['phone', 'laptop'])
def test_products_per_screen_and_tap_targets(sqlite_node, open_page,
                                             viewport):
    """Mid-drop: three products out, a pair bought, a size selected."""
    node = sqlite_node
    for product_id in (1, 2, 3):
        node.release(product_id)
    page = open_page(node, viewport)
    buy_on_page(page, 1, product_of(node, 1)['items'][4])
    choose(page, product_of(node, 2)['items'][4]['id'])
    page.wait_for_function('[...document.images].every(i => i.complete)')
    header = page.locator('.site-header').bounding_box()['height']
    at_top = fully_visible(page, 0)
    card(page, 3).evaluate(f'card => window.scrollTo(0, card.offsetTop - '
                           f'{header} - 8)')
    scrolled = fully_visible(page, header)
    sizes = smallest_target(page, '.size-container__entry')
    confirm = smallest_target(page, '.product__buy')
    print(f'{viewport["width"]}x{viewport["height"]}: {at_top} products '
          f'on the first screen, {scrolled} below the sticky header '
          f'further down; smallest size button {sizes[0]:.1f}x'
          f'{sizes[1]:.1f} px, buy button {confirm[0]:.0f}x'
          f'{confirm[1]:.0f} px')
    # Boxes come in fractions of a layout unit (1/64 px): 43.99997 is 44.
    assert round(min(sizes), 2) >= 44 and round(min(confirm), 2) >= 44
    if viewport == PHONE:
        assert at_top >= 2 and scrolled >= 2


def test_levels_are_told_apart_without_colour(sqlite_node, open_page):
    node = sqlite_node
    node.release(3)             # every level: out, low, medium, high
    page = open_page(node)
    words = {'high': 'plenty left', 'medium': 'selling fast',
             'low': 'last pairs', 'out': 'sold out'}
    marks = {}
    for level, word in words.items():
        item = next(i for i in product_of(node, 3)['items']
                    if i['level'] == level)
        button = size_button(page, item['id'])
        expect(button).to_have_attribute('aria-label',
                                         f'Size {item["size"]}, {word}')
        marks[level] = button.evaluate('''button => {
            const mark = getComputedStyle(button, '::after');
            const own = getComputedStyle(button);
            return [mark.content, mark.width, own.textDecorationLine,
                    own.borderTopStyle].join(' ');
        }''')
    print(marks)
    assert len(set(marks.values())) == 4, marks    # no two alike
    assert '"last"' in marks['low']
    legend = page.locator('.legend')
    expect(legend).to_be_visible()
    expect(legend.locator('.legend__level')).to_have_text(
        ['9 Plenty left', '9 Selling fast', '9 Last pairs', '9 Sold out'])


def test_the_live_region_speaks_of_the_shoppers_product(sqlite_node,
                                                        open_page):
    node = sqlite_node
    node.release(2)
    page = open_page(node)
    announcer = page.locator('#announcer')
    live = page.eval_on_selector_all(
        '[aria-live="polite"], [aria-live="assertive"], [role="status"]',
        'elements => elements.map(e => e.id)')
    assert sorted(live) == ['announcer', 'connection', 'sales']
    card(page, 1).locator('.product__name').click()     # on product 1
    item = min((i for i in product_of(node, 2)['items'] if i['count']),
               key=lambda i: i['count'])
    buy_out(node, item['id'])
    expect_out(page, item['id'])
    node.release(3)
    expect_sizes(page, product_of(node, 3))
    expect(announcer).to_have_text('')      # not the shopper's product
    node.release(1)
    name = card(page, 1).locator('.product__name').inner_text()
    expect(announcer).to_have_text(f'{name} is out now: pick your size.')


def store_in_state(state, start_node, sqlite_url, open_page, viewport):
    """A page showing the store in `state`, as a shopper would."""
    if state == 'sold out':
        seed_database(sqlite_url)
        set_counts(sqlite_url, dict.fromkeys(item_ids(5), 0))
    node = start_node(sqlite_url)
    if state == 'coming soon':
        node.schedule(2, (datetime.now(UTC) + timedelta(hours=1))
                      .isoformat())
    else:
        for product_id in (1, 2, 5):
            node.release(product_id)
    page = open_page(node, viewport, reduced_motion='reduce')
    if state in ('released', 'sold out', 'paused'):
        buy_on_page(page, 1, product_of(node, 1)['items'][4])
        choose(page, product_of(node, 2)['items'][5]['id'])
    if state == 'sold out':
        expect(card(page, 5).locator('.product__sold-out')).to_be_visible()
    elif state == 'paused':
        node.set_paused(True)
        buy_button(page, 2).click()
        expect(card(page, 2).locator('.product__status')).to_contain_text(
            'paused', timeout=LIVE)
    elif state == 'offline':
        node.stop()
        expect(page.locator('#connection')).to_have_attribute(
            'data-state', 'offline', timeout=RECONNECT)
    return page


@pytest.mark.parametrize('viewport', [PHONE, LAPTOP],
                         ids=['phone', 'laptop'])
@pytest.mark.parametrize('state', ['coming soon', 'released', 'sold out',
                                   'paused', 'offline'])
def test_accessibility_audit(start_node, sqlite_url, open_page, viewport,
                             state):
    """axe-core on the page: no serious or critical violation."""
    page = store_in_state(state, start_node, sqlite_url, open_page,
                          viewport)
    violations = Axe().run(page).response['violations']
    print(f'{state}: ' + (', '.join(f'{v["id"]} ({v["impact"]}, '
                                    f'{len(v["nodes"])})'
                                    for v in violations) or 'none'))
    grave = [(v['id'], v['impact'], [n['target'] for n in v['nodes']])
             for v in violations if v['impact'] in ('serious', 'critical')]
    assert grave == []
