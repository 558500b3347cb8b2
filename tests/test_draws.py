"""Draws on one node: the published rule and its fairness, the entry and
draw routes, `release --draw` and `verify-draw`, and a shopper's page in
Chromium. Three nodes, and a drawing node killed mid-draw, are in
test_draw_cluster.py."""

import hashlib
import hmac
import json
import os
import random
import re
import subprocess
import sys
from datetime import timedelta

import gevent
import pytest
from conftest import (
    ROOT,
    TOKEN,
    admin_headers,
    call,
    card,
    close_draw_now,
    db_rows,
    define_draw,
    enter,
    wait_until,
    write_database,
)
from gevent.pywsgi import WSGIServer
from playwright.sync_api import expect
from test_dashboard import COOKIE, session_value

import sneakers23

SCRIPT = os.path.join(ROOT, 'sneakers23.py')


# ---------------------------------------------------------------------------
# The rule, and its fairness
# ---------------------------------------------------------------------------

def contract_winners(seed, entries, pairs):
    """The rule as ../shared/CONTRACT.md words it, written again here."""
    rows = sorted([e, i] for e, i in entries)
    digest = hashlib.sha256(
        json.dumps(rows, separators=(',', ':')).encode()).hexdigest()
    key, winners = bytes.fromhex(seed), []
    for item in {i for _, i in entries}:
        mine = sorted((e for e, i in entries if i == item), key=lambda e: (
            hmac.new(key, f'{digest}:{e}'.encode(),
                     hashlib.sha256).hexdigest()))
        winners += mine[:pairs.get(item, 0)]
    return sorted(winners)


def test_the_ranking_is_the_contracts_rule():
    rng = random.Random(23)
    for _ in range(200):
        seed = rng.randbytes(32).hex()
        entries = [(e, rng.choice([5, 6, 7])) for e in
                   rng.sample(range(1, 10_000), rng.randint(0, 40))]
        pairs = {5: rng.randint(0, 5), 6: rng.randint(0, 50), 7: 1}
        assert sneakers23.draw_winners(seed, entries, pairs) == \
            contract_winners(seed, entries, pairs)
    seed = '00ff' * 16
    assert sneakers23.commitment_of(seed) == hashlib.sha256(
        bytes.fromhex(seed)).hexdigest()
    assert sneakers23.entries_digest([(3, 9), (1, 7)]) == hashlib.sha256(
        b'[[1,7],[3,9]]').hexdigest()


ENTRANTS, PAIRS, DRAWS = 10, 3, 4000
# The chi-square distribution with 9 degrees of freedom passes this value
# with probability 0.01 (statistical tables; scipy.stats.chi2.ppf(0.99, 9)
# = 21.666, scipy is not installed here).
CHI2_CRITICAL_9DF = 21.666


def win_counts(pick):
    """Wins of each entrant (by place in the entry list) over DRAWS
    simulated draws of 3 pairs among 10 entrants, each with a new seed
    and new entry ids."""
    rng = random.Random(2323)
    wins = [0] * ENTRANTS
    for _ in range(DRAWS):
        seed = rng.randbytes(32).hex()
        ids = sorted(rng.sample(range(1, 1_000_000), ENTRANTS))
        for winner in pick(seed, [(e, 1) for e in ids], {1: PAIRS}):
            wins[ids.index(winner)] += 1
    return wins


def chi_square(wins):
    """Pearson's statistic for "every entrant wins with p = 3/10".

    In one draw the 10 win indicators are drawn without replacement
    (exactly 3 are 1): each has variance p(1-p) and any two covariance
    -p(1-p)/(n-1), so sum((O - Np)^2) / (N p (1-p) n/(n-1)) follows the
    chi-square distribution with n - 1 = 9 degrees of freedom.
    """
    p = PAIRS / ENTRANTS
    scale = DRAWS * p * (1 - p) * ENTRANTS / (ENTRANTS - 1)
    return sum((w - DRAWS * p) ** 2 for w in wins) / scale


def favours_the_first(seed, entries, pairs):
    """An unfair draw: one time in ten the three first entries win."""
    if int(seed[:2], 16) < 26:
        return sorted(e for e, _ in entries)[:pairs[1]]
    return sneakers23.draw_winners(seed, entries, pairs)


def test_each_entrant_wins_thirty_percent_of_the_draws():
    wins = win_counts(sneakers23.draw_winners)
    statistic = chi_square(wins)
    print(f'wins per entrant in {DRAWS} draws: {wins}; chi-square '
          f'{statistic:.2f} (critical {CHI2_CRITICAL_9DF} at p = 0.01)')
    assert statistic < CHI2_CRITICAL_9DF
    assert all(abs(w / DRAWS - 0.3) < 0.03 for w in wins), wins
    # The test can tell: a draw slightly favouring early entries fails it.
    assert chi_square(win_counts(favours_the_first)) > CHI2_CRITICAL_9DF


def test_the_ranking_ignores_entry_order_and_node():
    """The rule's inputs are the seed, entry ids and item ids: shuffling
    the entries changes nothing, and no node is among them (the document
    has none; test_draw_cluster.py draws entries taken by three nodes)."""
    rng = random.Random(5)
    seed = rng.randbytes(32).hex()
    entries = [(e, rng.choice([1, 2, 3]))
               for e in rng.sample(range(1, 5000), 300)]
    pairs = {1: 10, 2: 50, 3: 200}
    expected = sneakers23.draw_winners(seed, entries, pairs)
    assert len(expected) == sum(min(pairs[i], sum(1 for _, j in entries
                                                  if j == i))
                                for i in pairs)
    for _ in range(20):
        rng.shuffle(entries)
        assert sneakers23.draw_winners(seed, entries, pairs) == expected
    assert sneakers23.draw_winners(rng.randbytes(32).hex(), entries,
                                   pairs) != expected


# ---------------------------------------------------------------------------
# The routes, on one node in this process
# ---------------------------------------------------------------------------

def product(url, product_id):
    return next(p for p in call(url, 'GET', '/api/products')[2]
                if p['id'] == product_id)


def drawable(url, product_id):
    """Item ids of a product that have pairs."""
    return [i['id'] for i in product(url, product_id)['items']
            if i['count'] > 0]


def document(url, product_id):
    status, _, doc = call(url, 'GET', f'/api/draws/{product_id}')
    assert status == 200, doc
    return doc


def drawn(url, product_id, timeout=10):
    return wait_until(lambda: document(url, product_id)['state'] == 'drawn'
                      and document(url, product_id), timeout,
                      'the draw is drawn')


def test_one_entry_per_shopper_changed_or_withdrawn_until_the_close(
        app_server):
    local = app_server()
    url, db_url = local.url, local.node.config.db_url
    answer = define_draw(url, 2)
    assert answer['state'] == 'draw_open'
    shown = product(url, 2)
    assert shown['state'] == 'draw_open'
    assert shown['draw']['commitment'] == answer['commitment']
    sizes = drawable(url, 2)
    status, first, alice = enter(url, 2, sizes[0])
    assert status == 200 and first['item_id'] == sizes[0]
    status, changed, _ = enter(url, 2, sizes[1], alice)
    assert (status, changed['entry_id'], changed['item_id']) == (
        200, first['entry_id'], sizes[1])
    _, bob_entry, bob = enter(url, 2, sizes[1])
    _, _, carol = enter(url, 2, sizes[2])
    entries = product(url, 2)['draw']['entries']
    assert (entries[str(sizes[0])], entries[str(sizes[1])],
            entries[str(sizes[2])]) == (0, 2, 1)
    assert call(url, 'GET', '/api/entries', headers={'Cookie': alice})[2] \
        == [{'entry_id': first['entry_id'], 'product_id': 2,
             'item_id': sizes[1], 'size': changed_size(url, sizes[1])}]
    withdrawn = call(url, 'DELETE', '/api/draws/2/entry',
                     headers={'Cookie': carol})
    assert withdrawn[0] == 200
    assert call(url, 'DELETE', '/api/draws/2/entry',
                headers={'Cookie': carol})[0] == 404
    assert call(url, 'GET', '/api/entries', headers={'Cookie': carol})[2] \
        == []
    before = document(url, 2)
    assert (before['seed'], before['entries'], before['winners']) == (
        None, [], [])
    count_before = next(i['count'] for i in product(url, 2)['items']
                        if i['id'] == sizes[1])

    close_draw_now(db_url, 2)
    doc = drawn(url, 2)
    assert sneakers23.verify_draw(doc) is None
    assert sorted(doc['winners']) == sorted([first['entry_id'],
                                             bob_entry['entry_id']])
    for cookie in (alice, bob):
        orders = call(url, 'GET', '/api/orders', headers={'Cookie': cookie})
        assert [o['item_id'] for o in orders[2]] == [sizes[1]]
    assert call(url, 'GET', '/api/orders', headers={'Cookie': carol})[2] \
        == []
    assert next(i['count'] for i in product(url, 2)['items']
                if i['id'] == sizes[1]) == count_before - 2
    assert product(url, 2)['state'] == 'drawn'
    # Closed: nothing more is taken, nothing changes.
    status, refused, _ = enter(url, 2, sizes[0], alice)
    assert (status, refused) == (409, {'error': 'draw_closed'})
    assert document(url, 2) == doc


def changed_size(url, item_id):
    return next(i['size'] for p in call(url, 'GET', '/api/products')[2]
                for i in p['items'] if i['id'] == item_id)


def store_rows(db_url):
    return db_rows(db_url, 'SELECT (SELECT count(*) FROM orders), '
                   '(SELECT count(*) FROM entry), (SELECT count(*) FROM '
                   'draw), (SELECT sum(version) FROM availability), '
                   '(SELECT count(*) FROM product WHERE released)')


def test_bad_draw_requests_answer_4xx_and_change_nothing(app_server):
    local = app_server()
    url, db_url = local.url, local.node.config.db_url
    call(url, 'POST', '/admin/api/products/1/release', {},
         headers=admin_headers())
    define_draw(url, 2)
    _, _, alice = enter(url, 2, drawable(url, 2)[0])
    other = drawable(url, 3)[0]
    before = store_rows(db_url)
    admin = admin_headers()
    future = '2099-01-01T00:00:00Z'
    for method, path, body, headers, status, error in (
            ('POST', '/admin/api/products/3/draw', {'closes': future}, {},
             401, 'unauthorized'),
            ('POST', '/admin/api/products/3/draw', {}, admin, 400, None),
            ('POST', '/admin/api/products/3/draw', {'closes': 'soon'},
             admin, 400, None),
            ('POST', '/admin/api/products/3/draw',
             {'closes': '2020-01-01T00:00:00Z'}, admin, 409, 'in_the_past'),
            ('POST', '/admin/api/products/3/draw',
             {'closes': future, 'at': '2100-01-01T00:00:00Z'}, admin,
             400, None),
            ('POST', '/admin/api/products/1/draw', {'closes': future},
             admin, 409, 'already_released'),
            ('POST', '/admin/api/products/2/draw', {'closes': future},
             admin, 409, 'draw_exists'),
            ('POST', '/admin/api/products/99/draw', {'closes': future},
             admin, 404, 'not_found'),
            ('POST', '/admin/api/products/2/release', {}, admin, 409,
             'draw'),
            ('POST', '/admin/api/products/2/schedule', {'at': future},
             admin, 409, 'draw'),
            ('POST', '/api/draws/2/entry', {'item_id': other}, {}, 404,
             'not_found'),
            ('POST', '/api/draws/3/entry', {'item_id': other}, {}, 404,
             'not_found'),
            ('POST', '/api/draws/2/entry', {'item_id': 'x'}, {}, 400, None),
            ('POST', '/api/draws/2/entry', {}, {}, 400, None),
            ('DELETE', '/api/draws/2/entry', None, {}, 404, 'not_found'),
            ('DELETE', '/api/draws/3/entry', None, {'Cookie': alice}, 404,
             'not_found'),
            ('GET', '/api/draws/3', None, {}, 404, 'not_found'),
            ('GET', '/api/draws/x', None, {}, 404, 'not_found'),
            ('POST', '/api/purchase', {'item_id': drawable(url, 2)[0]}, {},
             403, 'not_released')):
        got, _, answer = call(url, method, path, body, headers=headers)
        assert got == status, (path, body, answer)
        assert isinstance(answer, dict) and answer.get('error'), answer
        if error:
            assert answer['error'] == error, (path, answer)
    assert store_rows(db_url) == before


def test_entries_from_one_ip_are_limited(app_server):
    """Loopback not trusted: at most --ip-pairs shoppers per IP per draw
    (changing one's own entry is not another shopper)."""
    local = app_server(trusted_ips=(), ip_pairs=2)
    url = local.url
    define_draw(url, 2)
    sizes = drawable(url, 2)
    _, _, alice = enter(url, 2, sizes[0])
    assert enter(url, 2, sizes[0])[0] == 200
    status, answer, _ = enter(url, 2, sizes[0])
    assert (status, answer) == (429, {'error': 'too_many_requests'})
    assert enter(url, 2, sizes[1], alice)[0] == 200
    assert sum(product(url, 2)['draw']['entries'].values()) == 2


def test_live_counts_reach_the_stream_coalesced(app_server, sse):
    local = app_server()
    url = local.url
    stream = sse(url, '/events?products=2')
    define_draw(url, 2)
    sizes = drawable(url, 2)[:4]
    jobs = [gevent.spawn(enter, url, 2, sizes[n % 4]) for n in range(200)]
    gevent.joinall(jobs, raise_error=True)
    assert all(job.value[0] == 200 for job in jobs)
    final = stream.wait_for('draw', where=lambda d: sum(
        d['entries'].values()) == 200)[-1]['data']
    assert final['state'] == 'open'
    assert {k: v for k, v in final['entries'].items() if v} == {
        str(i): 50 for i in sizes}
    events = stream.named('draw')
    assert 'draw_html' in events[0]['data']   # the panel, once opened
    assert len(events) < 200 / 4, len(events)   # not one per entry


def test_a_draw_opens_at_its_moment(app_server, sse):
    """Before: `scheduled` (the page counts down to the opening), entries
    refused; at the moment the draw opens by itself and its panel goes
    to the pages."""
    local = app_server()
    url = local.url
    stream = sse(url, '/events?products=2')
    at = sneakers23.utcnow() + timedelta(seconds=1)
    answer = define_draw(url, 2, at=sneakers23.iso_moment(at))
    assert answer['state'] == 'scheduled'
    shown = product(url, 2)
    assert (shown['state'], shown['release_at']) == (
        'scheduled', sneakers23.iso_moment(at))
    assert enter(url, 2, drawable(url, 2)[0])[:2] == (
        409, {'error': 'draw_closed'})
    assert stream.wait_for('scheduled')[0]['data'] == {
        'product_id': 2, 'release_at': sneakers23.iso_moment(at)}
    wait_until(lambda: product(url, 2)['state'] == 'draw_open', 5,
               'the draw opens')
    opened = stream.wait_for('draw')[0]['data']
    assert opened['state'] == 'open' and 'class="draw"' in \
        opened['draw_html']
    assert enter(url, 2, drawable(url, 2)[0])[0] == 200


# ---------------------------------------------------------------------------
# The command line: release --draw, verify-draw
# ---------------------------------------------------------------------------

def run(*args):
    env = {**os.environ, 'SNEAKERS23_ADMIN_TOKEN': TOKEN}
    return subprocess.run([sys.executable, SCRIPT, *args], env=env,
                          capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


class DocumentServer:
    """A tiny HTTP server publishing one (altered) draw document."""

    def __init__(self, product_id):
        self.document = None
        self.path = f'/api/draws/{product_id}'
        self.server = WSGIServer(('127.0.0.1', 0), self.app, log=None)
        self.server.start()
        self.url = f'http://127.0.0.1:{self.server.server_port}'

    def app(self, environ, start_response):
        if environ['PATH_INFO'] != self.path:
            start_response('404 Not Found', [])
            return [b'']
        start_response('200 OK', [('Content-Type', 'application/json')])
        return [json.dumps(self.document).encode()]


def test_release_draw_and_verify_draw_from_the_command_line(sqlite_node):
    node = sqlite_node
    sizes = drawable(node.url, 2)
    write_database(node.db_url, 'UPDATE availability SET count = 3, '
                   'version = version + 1 WHERE item_id = ?', (sizes[0],))
    made = run('release', 'SHU6100', '--draw', '--closes', '+10m',
               '--url', node.url)
    assert made.returncode == 0, made.stderr
    assert 'product 2 is a draw from' in made.stdout
    assert product(node.url, 2)['state'] == 'draw_open'
    wrong = run('release', 'SHU6200', '--closes', '+10m', '--url', node.url)
    assert wrong.returncode == 2 and 'needs --draw' in wrong.stderr
    for n in range(40):
        assert enter(node.url, 2, sizes[n % 2])[0] == 200
    early = run('verify-draw', node.url, '2')
    assert early.returncode == 1 and 'not drawn yet' in early.stderr

    close_draw_now(node.db_url, 2)
    doc = drawn(node.url, 2)
    checked = run('verify-draw', node.url, 'SHU6100')
    assert checked.returncode == 0, checked.stderr
    assert (f"{len(doc['winners'])} winners among 40 entries"
            in checked.stdout)

    fake = DocumentServer(2)
    try:
        loser = next(e['entry_id'] for e in doc['entries']
                     if e['entry_id'] not in doc['winners'])
        fake.document = {**doc, 'winners': sorted(
            [loser] + doc['winners'][1:])}
        altered = run('verify-draw', fake.url, '2')
        assert altered.returncode == 1
        assert re.fullmatch(r'sneakers23: verify-draw: the published '
                            r'winners are not the drawn ones .*\n',
                            altered.stderr), altered.stderr
        fake.document = {**doc, 'seed': '00' * 32}
        reseeded = run('verify-draw', fake.url, '2')
        assert (reseeded.returncode, reseeded.stderr) == (
            1, 'sneakers23: verify-draw: the seed does not match the '
               'commitment\n')
        fake.document = doc
        assert run('verify-draw', fake.url, '2').returncode == 0
    finally:
        fake.server.stop()


# ---------------------------------------------------------------------------
# A shopper's page (Chromium)
# ---------------------------------------------------------------------------

def test_a_shopper_enters_changes_withdraws_and_learns_the_result(
        sqlite_node, open_page):
    """Two shoppers want the one pair of a size: one page says "You won
    size … — order #…" (and shows it in Your pairs), the other "Not this
    time"."""
    node = sqlite_node
    sizes = drawable(node.url, 2)
    only = sizes[1]
    write_database(node.db_url, 'UPDATE availability SET count = 1, '
                   'version = version + 1 WHERE item_id = ?', (only,))
    define_draw(node.url, 2)
    size = changed_size(node.url, only)
    first = changed_size(node.url, sizes[0])
    alice, bob = open_page(node), open_page(node)
    panel = card(alice, 2).locator('.draw')
    expect(panel).to_be_visible()

    panel.locator(f'.draw__size[value="{sizes[0]}"]').click()
    expect(panel.locator('.draw__mine')).to_have_text(
        re.compile(rf'^Entered: size {re.escape(first)} · entry #\d+$'))
    entry = panel.locator('.draw__mine').inner_text().split('#')[1]
    expect(panel.locator(f'.draw__count[data-item-id="{sizes[0]}"]')) \
        .to_have_text('1')
    panel.locator(f'.draw__size[value="{only}"]').click()
    expect(panel.locator('.draw__mine')).to_have_text(
        f'Entered: size {size} · entry #{entry}')
    expect(panel.locator(f'.draw__size[value="{only}"]')).to_have_attribute(
        'aria-pressed', 'true')
    expect(panel.locator(f'.draw__count[data-item-id="{sizes[0]}"]')) \
        .to_have_text('0')
    panel.locator('.draw__withdraw').click()
    expect(panel.locator('.draw__mine')).to_have_text('')
    expect(panel.locator(f'.draw__count[data-item-id="{only}"]')) \
        .to_have_text('0')
    panel.locator(f'.draw__size[value="{only}"]').click()
    expect(panel.locator('.draw__mine')).to_have_text(
        re.compile(rf'^Entered: size {re.escape(size)} · entry #\d+$'))
    card(bob, 2).locator(f'.draw__size[value="{only}"]').click()
    expect(card(bob, 2).locator('.draw__mine')).to_have_text(
        re.compile(r'^Entered: '))
    expect(panel.locator(f'.draw__count[data-item-id="{only}"]')) \
        .to_have_text('2')

    close_draw_now(node.db_url, 2)
    results = [card(page, 2).locator('.draw__result')
               for page in (alice, bob)]
    for result in results:   # a winner's order number comes a moment
        expect(result).to_have_text(re.compile(   # after the result
            r'^(Not this time|You won size .+ — order #\d+)$'),
            timeout=10_000)
    texts = sorted(result.inner_text() for result in results)
    assert texts[0] == 'Not this time'
    won = re.fullmatch(rf'You won size {re.escape(size)} — order #(\d+)',
                       texts[1])
    assert won, texts
    winner = alice if results[0].inner_text() == texts[1] else bob
    expect(winner.locator('#your-pairs')).to_be_visible()
    expect(winner.locator('.your-pairs__list')).to_contain_text(
        f'size {size} · order #{won[1]}')


@pytest.fixture
def dashboard(open_page, sqlite_node):
    """The dashboard of a signed-in operator on `sqlite_node`, live."""
    cookie = {'name': COOKIE, 'value': session_value(sqlite_node),
              'domain': '127.0.0.1', 'path': '/admin', 'httpOnly': True,
              'sameSite': 'Strict'}
    page = open_page(sqlite_node, path='/admin', cookies=[cookie])
    expect(page.locator('body')).to_have_attribute('data-signed-in', 'true')
    return page


def test_the_dashboard_releases_a_product_as_a_draw(sqlite_node, dashboard):
    """Draw (empty moments: open now, close in 10 minutes): the product
    turns `draw open` on the dashboard and in the API."""
    node, page = sqlite_node, dashboard
    article = page.locator('article.product[data-product-id="3"]')
    expect(article.locator('.state')).to_have_text('coming soon')
    article.locator('button.draw').click()
    page.locator('#confirm-ok').click()
    expect(page.locator('#result')).to_contain_text('is a draw until')
    expect(article.locator('.state')).to_have_text('draw open',
                                                   timeout=5_000)
    expect(article.locator('.countdown')).to_contain_text('0 entries')
    expect(article.locator('button.draw')).to_be_hidden()
    expect(article.locator('button.release-now')).to_be_hidden()
    assert product(node.url, 3)['state'] == 'draw_open'
