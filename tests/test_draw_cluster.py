"""Draws on three real nodes sharing one database (SQLite and
PostgreSQL): a thousand entrants spread over the nodes, and the drawing
node killed with SIGKILL in the middle of the draw."""

import random
import re
import time

import gevent
import gevent.pool
from conftest import (
    NAMES,
    Cluster,
    call,
    close_draw_now,
    db_rows,
    define_draw,
    enter,
    seed_database,
    wait_until,
    write_database,
)
from test_draws import run

import sneakers23

PRODUCT = 2
# 100 pairs over nine sizes of product 2 (its 13 items in size order).
PAIRS = (0, 5, 10, 20, 25, 20, 10, 5, 5, 0, 0, 0, 0)


def prepare(db_url):
    """Seed the store and give product 2 its 100 pairs: {item_id:
    pairs} of the sizes that have some."""
    seed_database(db_url)
    items = [row[0] for row in db_rows(
        db_url, 'SELECT id FROM item WHERE product_id = ? ORDER BY id',
        (PRODUCT,))]
    for item_id, pairs in zip(items, PAIRS, strict=True):
        write_database(db_url, 'UPDATE availability SET count = ? '
                       'WHERE item_id = ?', (pairs, item_id))
    return {i: n for i, n in zip(items, PAIRS, strict=True) if n}


def document(node):
    status, _, doc = node.get(f'/api/draws/{PRODUCT}')
    assert status == 200, doc
    return doc


def drawn_everywhere(nodes, timeout=20):
    """The draw document, once every node in `nodes` publishes it drawn."""
    def check():
        docs = [document(node) for node in nodes]
        return all(d['state'] == 'drawn' for d in docs) and docs
    docs = wait_until(check, timeout, 'every node shows the draw drawn',
                      interval=0.05)
    assert all(doc == docs[0] for doc in docs)
    return docs[0]


class Entrants:
    """Shoppers entering the draw, each through one node or another."""

    def __init__(self, nodes):
        self.nodes = nodes
        self.cookie, self.entry, self.item = {}, {}, {}

    def enter(self, n, item_id, node):
        status, answer, cookie = enter(node.url, PRODUCT, item_id,
                                       self.cookie.get(n))
        assert status == 200, answer
        self.cookie[n], self.entry[n] = cookie, answer['entry_id']
        self.item[n] = item_id

    def withdraw(self, n, node):
        status, _, answer = call(node.url, 'DELETE',
                                 f'/api/draws/{PRODUCT}/entry',
                                 headers={'Cookie': self.cookie[n]})
        assert status == 200, answer
        del self.entry[n], self.item[n]

    def per_item(self):
        counts = {}
        for item_id in self.item.values():
            counts[item_id] = counts.get(item_id, 0) + 1
        return counts

    def orders(self, n):
        status, _, orders = call(self.nodes[n % 3].url, 'GET', '/api/orders',
                                 headers={'Cookie': self.cookie[n]})
        assert status == 200, orders
        return [o for o in orders if o['product_id'] == PRODUCT]


def enter_many(nodes, pairs, count, seed=23):
    """`count` entrants at once, entrant n through node n % 3; the first
    tenth change their size through the next node, a few withdraw through
    a third. Size `few` gets 3 entrants for its 5 pairs; the others get
    many more entrants than pairs."""
    rng = random.Random(seed)
    sizes = sorted(pairs)
    few, many = sizes[-1], sizes[:-1]
    choice = [few if n < 3 else rng.choice(many) for n in range(count)]
    entrants = Entrants(nodes)
    pool = gevent.pool.Pool(40)
    pool.map(lambda n: entrants.enter(n, choice[n], nodes[n % 3]),
             range(count))
    pool.map(lambda n: entrants.enter(n, rng.choice(many),
                                      nodes[(n + 1) % 3]),
             range(3, count // 10))
    pool.map(lambda n: entrants.withdraw(n, nodes[(n + 2) % 3]),
             range(count // 10, count // 10 + 20))
    return entrants


def drawing_time(nodes):
    """What the drawing node logged: (node name, ms, its claim)."""
    for node in nodes:
        for line in node.output:
            found = re.search(r'drew product \d+ \(claim (\d+)\): .* in '
                              r'([\d.]+) ms', line)
            if found:
                return node.name, float(found[2]), int(found[1])
    return None


def test_a_thousand_entrants_on_three_nodes(tmp_path, db_url, sse):
    """1,000 entrants on 100 pairs, entries (and changes, withdrawals)
    spread over three nodes. Checked: every node publishes the same
    drawn document, which `verify-draw` reproduces; exactly min(pairs,
    entries) winners per size; each winner's shopper has exactly one
    order, of their size, and no one else has one; stock is what was left
    (0 where entries exceeded pairs); each of the 1,000 entrants' own
    `/api/orders` tells them the outcome; and every entrant's page
    stream (1,000 `/events` streams, spread over the nodes like the
    entrants) got the `draw` event with the winning entry ids, from which
    the page tells its own entry's outcome."""
    pairs = prepare(db_url)
    cluster = Cluster(tmp_path, db_url)
    try:
        cluster.start(env={name: {'SNEAKERS23_LOG': 'INFO'}
                           for name in NAMES})
        nodes = [cluster.nodes[name] for name in NAMES]
        commitment = define_draw(nodes[0].url, PRODUCT)['commitment']
        entrants = enter_many(nodes, pairs, 1000)
        streams = [sse(nodes[n % len(nodes)].url,
                       f'/events?products={PRODUCT}')
                   for n in range(len(entrants.entry))]
        taken_by = {row[0] for row in db_rows(
            db_url, 'SELECT DISTINCT node FROM entry')}
        assert taken_by == set(NAMES)

        close_draw_now(db_url, PRODUCT)
        doc = drawn_everywhere(nodes)
        assert doc['commitment'] == commitment
        assert sneakers23.verify_draw(doc) is None
        checked = run('verify-draw', nodes[1].url, str(PRODUCT))
        assert checked.returncode == 0, checked.stderr
        print(f'{db_url.split(":")[0]}: drawn by {drawing_time(nodes)}')

        published = {(e['entry_id'], e['item_id']) for e in doc['entries']}
        assert published == {(entrants.entry[n], entrants.item[n])
                             for n in entrants.entry}
        item_of = dict(published)
        entered = entrants.per_item()
        won = {}
        for entry_id in doc['winners']:
            won[item_of[entry_id]] = won.get(item_of[entry_id], 0) + 1
        assert won == {i: min(pairs[i], entered[i]) for i in entered}
        assert any(entered[i] < pairs[i] for i in entered)

        orders = db_rows(db_url, 'SELECT e.id, o.item_id FROM entry e '
                         'JOIN orders o ON o.shopper = e.shopper AND '
                         'o.product_id = e.product_id')
        assert sorted(orders) == sorted((w, item_of[w])
                                        for w in doc['winners'])
        assert db_rows(db_url, 'SELECT count(*) FROM orders WHERE '
                       'product_id = ?', (PRODUCT,))[0][0] == len(orders)
        left = dict(db_rows(db_url, 'SELECT item_id, count FROM '
                            'availability WHERE item_id IN (%s)' % ','.join(
                                str(i) for i in pairs)))
        assert left == {i: pairs[i] - won.get(i, 0) for i in pairs}
        assert {i for i in pairs if entered.get(i, 0) > pairs[i]} == {
            i for i in pairs if left[i] == 0}
        for node in nodes:   # memory agrees with the database
            shown = {i['id']: i['count'] for p in node.products()
                     if p['id'] == PRODUCT for i in p['items']}
            assert {i: shown[i] for i in pairs} == left

        winners = set(doc['winners'])
        outcomes = gevent.pool.Pool(40).map(
            lambda n: (n, entrants.orders(n)), list(entrants.entry))
        for n, own in outcomes:
            if entrants.entry[n] in winners:
                assert [o['item_id'] for o in own] == [entrants.item[n]]
            else:
                assert own == []
        for stream in streams:
            told = stream.wait_for('draw', timeout=10,
                                   where=lambda d: d['state'] == 'drawn')
            assert told[-1]['data']['winners'] == doc['winners']
    finally:
        cluster.close()


def test_the_drawing_node_killed_mid_draw(tmp_path, db_url):
    """Every node holds its first claim's draw just before COMMIT
    (SNEAKERS23_TEST_HOLD_DRAW, tests only): the node whose claim landed
    says so, and is killed with SIGKILL there. Until then and after, no
    node publishes a winner and the database has no order of the draw;
    another node claims it once the claim expires and draws it whole."""
    pairs = prepare(db_url)
    cluster = Cluster(tmp_path, db_url)
    try:
        cluster.start(env={name: {'SNEAKERS23_TEST_HOLD_DRAW': '1',
                                  'SNEAKERS23_LOG': 'INFO'}
                           for name in NAMES})
        nodes = [cluster.nodes[name] for name in NAMES]
        define_draw(nodes[0].url, PRODUCT)
        entrants = enter_many(nodes, pairs, 200, seed=5)
        entered = entrants.per_item()
        expected = sum(min(pairs[i], n) for i, n in entered.items())

        close_draw_now(db_url, PRODUCT)
        holder = wait_until(lambda: next(
            (node for node in nodes if any(
                'draw: holding before COMMIT' in line
                for line in node.output)), None), 15,
            'a node holds the draw before COMMIT', interval=0.05)
        others = [node for node in nodes if node is not holder]
        seen = []

        def watch():
            while True:
                docs = [document(node) for node in others]
                sold = db_rows(db_url, 'SELECT count(*) FROM orders WHERE '
                               'product_id = ?', (PRODUCT,))[0][0]
                seen.append((tuple(len(d['winners']) for d in docs), sold))
                gevent.sleep(0.02)

        watcher = gevent.spawn(watch)
        wait_until(lambda: len(seen) >= 3, 10, 'the watcher looked')
        assert seen[0] == ((0, 0), 0)
        holder.proc.kill()   # SIGKILL, inside the draw's transaction
        holder.proc.wait()
        killed = time.monotonic()
        doc = drawn_everywhere(others, timeout=20)
        took = time.monotonic() - killed
        wait_until(lambda: seen[-1][0] == (expected, expected), 5,
                   'the watcher saw the draw')
        watcher.kill()
        assert all(set(winners) <= {0, expected} and sold in (0, expected)
                   for winners, sold in seen), \
            f'a partial draw was visible: {sorted(set(seen))}'
        assert len(doc['winners']) == expected
        assert sneakers23.verify_draw(doc) is None
        assert db_rows(db_url, 'SELECT count(*) FROM orders WHERE '
                       'product_id = ?', (PRODUCT,))[0][0] == expected
        name, ms, claim = drawing_time(others)
        assert claim >= 2 and name != holder.name
        print(f'{db_url.split(":")[0]}: {holder.name} killed holding the '
              f'draw; {name} drew it (claim {claim}) in {ms} ms, '
              f'{took:.1f} s after the SIGKILL')
    finally:
        cluster.close()
