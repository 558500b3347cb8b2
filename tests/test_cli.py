"""The command line as an operator uses it: real processes, real output."""

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime

import pytest
from conftest import ROOT, TOKEN, admin_headers, db_rows, free_port, wait_until

SCRIPT = os.path.join(ROOT, 'sneakers23.py')

SMALL_CATALOG = '''
[[products]]
sku = "T100"
brand = "Test"
name = "First"
color = "red"
price_cents = 10000
image = "shu6000.svg"
[products.stock]
"6" = 7
"6.5" = 0
"9" = 12
"12" = 3

[[products]]
sku = "T200"
brand = "Test"
name = "Second"
color = "blue"
price_cents = 20000
image = "shu6100.svg"
[products.stock]
"7" = 9
"10.5" = 14

[[products]]
sku = "T300"
brand = "Test"
name = "Third, never released"
color = "green"
price_cents = 30000
image = "shu6200.svg"
[products.stock]
"8" = 5
'''


def run(*args, env=None, timeout=120):
    """Run `python sneakers23.py ARGS`; the finished process."""
    env = {**os.environ, 'SNEAKERS23_ADMIN_TOKEN': TOKEN, **(env or {})}
    return subprocess.run([sys.executable, SCRIPT, *args], env=env,
                          capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture
def small_catalog(tmp_path):
    path = tmp_path / 'catalog.toml'
    path.write_text(SMALL_CATALOG)
    return str(path)


def test_seed_then_sell_random_until_gone(db_url, small_catalog,
                                          start_node):
    seeded = run('seed', '--db', db_url, '--catalog', small_catalog)
    assert seeded.returncode == 0, seeded.stderr
    assert 'seeded 3 products' in seeded.stdout
    node = start_node(db_url)
    assert run('release', 'T100', '--url', node.url).returncode == 0
    assert run('release', '2', '--url', node.url).returncode == 0
    stock_in = sum(i['count'] for p in node.products()[:2]
                   for i in p['items'])
    assert stock_in == 7 + 12 + 3 + 9 + 14

    sold = run('sell-random', '--until-gone', '--url', node.url)

    assert sold.returncode == 0, sold.stderr
    assert f'sold {stock_in} pairs' in sold.stderr
    products = node.products()
    assert [i['count'] for p in products[:2] for i in p['items']] == \
        [0] * 26
    assert sum(i['count'] for i in products[2]['items']) == 5
    assert db_rows(db_url, 'SELECT COUNT(*) FROM orders') == [(stock_in,)]


def test_ctrl_c_stops_sell_random_and_says_what_it_sold(sqlite_node,
                                                       sqlite_url):
    """Ctrl-C (SIGINT) while it sells: the seller stops within seconds,
    exits 0 and says how many pairs it sold, and the database holds those
    pairs (and at most one more per shopper, bought as it stopped)."""
    sqlite_node.release(2)
    orders = db_rows(sqlite_url, 'SELECT COUNT(*) FROM orders')[0][0]
    for progress_lines in (1, 2, 3):
        seller = subprocess.Popen(
            [sys.executable, SCRIPT, 'sell-random', '--rate', '200',
             '--shoppers', '4', '--url', sqlite_node.url],
            stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, 'SNEAKERS23_ADMIN_TOKEN': TOKEN})
        try:
            seen = 0
            while seen < progress_lines:
                line = seller.stderr.readline()
                assert line, 'the seller ended by itself'
                seen += line.startswith('sold ') and ' left · ' in line
            seller.send_signal(signal.SIGINT)
            _, said = seller.communicate(timeout=15)
        finally:
            seller.kill()
        assert seller.returncode == 0, said
        assert 'Traceback' not in said
        stopped = re.search(r'interrupted after selling (\d+) pairs', said)
        assert stopped, said
        now = db_rows(sqlite_url, 'SELECT COUNT(*) FROM orders')[0][0]
        sold = int(stopped.group(1))
        assert sold > 0
        assert sold <= now - orders <= sold + 4
        orders = now


def test_ctrl_c_while_sell_random_waits_for_a_silent_node():
    """Ctrl-C before any shopper started, while the first request hangs
    on a node that accepted and never answers: it ends at once."""
    silent = socket.create_server(('127.0.0.1', 0))
    port = silent.getsockname()[1]
    seller = subprocess.Popen(
        [sys.executable, SCRIPT, 'sell-random', '--url',
         f'http://127.0.0.1:{port}'],
        stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        silent.settimeout(30)
        conn, _ = silent.accept()   # its handler is in place by now
        seller.send_signal(signal.SIGINT)
        _, said = seller.communicate(timeout=15)
        conn.close()
    finally:
        seller.kill()
        silent.close()
    assert seller.returncode == 0, said
    assert said.strip() == 'interrupted after selling 0 pairs'


def test_sell_random_at_a_rate_ends_with_its_summary(sqlite_url,
                                                     small_catalog,
                                                     start_node):
    """Paced shoppers meet an empty stock at once: no IndexError."""
    seeded = run('seed', '--db', sqlite_url, '--catalog', small_catalog)
    assert seeded.returncode == 0, seeded.stderr
    node = start_node(sqlite_url)
    node.release(1)

    sold = run('sell-random', '--until-gone', '--rate', '150', '--url',
               node.url, timeout=60)

    assert sold.returncode == 0, sold.stderr
    assert 'Traceback' not in sold.stderr
    last = sold.stderr.splitlines()[-1]
    assert last.startswith('sold 22 pairs in ') and last.endswith(
        ' s; 0 left'), sold.stderr
    assert {i['count'] for i in node.products()[0]['items']} == {0}
    assert db_rows(sqlite_url, 'SELECT COUNT(*) FROM orders') == [(22,)]


def test_release_of_an_unknown_product_exits_1(sqlite_node):
    done = run('release', 'NOPE', '--url', sqlite_node.url, timeout=30)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.count('\n') == 1, done.stderr
    assert 'NOPE' in done.stderr and 'Traceback' not in done.stderr
    assert not any(p['released'] for p in sqlite_node.products())


def test_info_log_tells_admin_actions_refusals_and_sales(sqlite_url,
                                                         start_node):
    node = start_node(sqlite_url, env={'SNEAKERS23_LOG': 'INFO'})
    node.release(1)
    item = next(i for i in node.products()[0]['items'] if i['count'] > 5)
    node.restock(item['id'], 3)
    status, _, _ = node.post('/admin/api/products/2/release', {},
                             headers=admin_headers('wrong'))
    assert status == 401
    for _ in range(3):
        status, _, _ = node.post('/api/purchase', {'item_id': item['id']})
        assert status == 201

    def logged(text):
        return [line for line in node.output if text in line]
    wait_until(lambda: logged('purchases in the last second:'), 5,
               'a purchase summary in the log')
    assert logged('released product') and logged('restocked item')
    assert logged('refused')
    summaries = logged('purchases in the last second:')
    assert sum(int(n) for line in summaries
               for n in re.findall(r'\b201=(\d+)', line)) == 3, summaries


def test_release_and_restock_commands(sqlite_node):
    node = sqlite_node
    released = run('release', 'shu6100', '--url', node.url)
    assert released.returncode == 0, released.stderr
    assert released.stdout.strip() == 'product 2 released'
    again = run('release', 'SHU6100', '--url', node.url)
    assert again.stdout.strip() == 'product 2 released (it already was)'
    assert node.products()[1]['released']

    item = node.products()[1]['items'][0]
    restocked = run('restock', str(item['id']), '500', '--url', node.url)
    assert restocked.returncode == 0, restocked.stderr
    total = item['count'] + 500
    assert str(total) in restocked.stdout
    assert node.item(item['id'])['count'] == total


def test_admin_commands_need_the_token(sqlite_node):
    missing = run('release', '1', '--url', sqlite_node.url,
                  env={'SNEAKERS23_ADMIN_TOKEN': ''})
    assert missing.returncode == 2
    assert missing.stderr.count('\n') == 1
    assert 'SNEAKERS23_ADMIN_TOKEN' in missing.stderr
    wrong = run('release', '1', '--url', sqlite_node.url,
                env={'SNEAKERS23_ADMIN_TOKEN': 'wrong'})
    assert wrong.returncode == 1
    assert '401 unauthorized' in wrong.stderr
    assert not sqlite_node.products()[0]['released']


@pytest.mark.parametrize('args, says', [
    (['restock', '3', 'five'], 'invalid int value'),
    (['restock', '3', '0'], 'COUNT must be greater than 0'),
    (['serve', '--port', 'eighty'], 'invalid int value'),
    (['serve', '--port', '70000'], 'between 1 and 65535'),
    (['--db', 'mysql://root@localhost/x'], 'unsupported database URL'),
    (['--db', 'sqlite:////no/such/folder/x.db'], 'no such folder'),
    (['--db', 'postgresql://postgres@127.0.0.1:1/test'],
     'cannot use the database'),
    (['seed', '--db', 'postgresql://postgres@127.0.0.1:1/test'],
     'cannot use the database'),
    (['--config', 'peers.toml', '--node', 'zz'], "node 'zz' is not in"),
    (['--config', 'nope.toml', '--node', 'a'], 'cannot read nope.toml'),
    (['--node', 'a'], '--config and --node go together'),
    (['release', 'NOPE', '--url', 'http://127.0.0.1:1'],
     'cannot reach the node'),
    (['release', '1', '--url', 'ftp://x'], '--url must look like'),
    (['sell-random', '--rate', '-1'], '--rate'),
    (['frobnicate'], 'unrecognized arguments'),
    (['seed', '--db', 'sqlite:///{tmp}/x.db', '--catalog', '{tmp}/no.toml'],
     'cannot read the catalogue'),
    (['seed', '--db', 'sqlite:///{tmp}/x.db', '--catalog', '{tmp}/bad.toml'],
     'product 1: price_cents must be an integer'),
])
def test_bad_arguments_give_one_line_and_exit_2(args, says, tmp_path):
    (tmp_path / 'bad.toml').write_text(
        SMALL_CATALOG.replace('price_cents = 10000', 'price_cents = "10"'))
    args = [arg.format(tmp=tmp_path) for arg in args]
    done = run(*args, timeout=30)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.count('\n') == 1, done.stderr
    assert done.stderr.startswith('sneakers23: ')
    assert says in done.stderr
    assert 'Traceback' not in done.stderr


@pytest.mark.parametrize('command', ['serve', 'seed', 'release', 'restock',
                                     'sell-random', 'keygen', 'status'])
def test_help_on_each_command(command):
    done = run(command, '--help')
    assert done.returncode == 0
    assert done.stdout.startswith('usage: sneakers23.py ' + command)


def test_keygen_prints_a_curve_pair():
    done = run('keygen')
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert [line.split(' = ')[0] for line in lines] == ['public_key',
                                                        'secret_key']
    keys = [line.split(' = ')[1].strip('"') for line in lines]
    assert all(len(key) == 40 for key in keys) and keys[0] != keys[1]


def test_serve_prints_its_line_and_a_token_when_none_is_set(tmp_path):
    port = free_port()
    env = {**os.environ, 'SNEAKERS23_ADMIN_TOKEN': ''}
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, '--db', f'sqlite:///{tmp_path}/s.db',
         '--port', str(port)], env=env, stdout=subprocess.PIPE, text=True,
        cwd=ROOT)
    try:
        token_line = proc.stdout.readline()
        serving_line = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(10)
    assert token_line.startswith('admin token')
    assert len(token_line.split(': ')[-1].strip()) >= 24
    assert serving_line == (f'sneakers23 node a serving on '
                            f'http://127.0.0.1:{port}\n')
    assert proc.returncode == 0


def start_without_token(db, port):
    """`serve` with no SNEAKERS23_ADMIN_TOKEN: (process, its token line)."""
    env = {**os.environ, 'SNEAKERS23_ADMIN_TOKEN': ''}
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, '--db', db, '--port', str(port)], env=env,
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    token_line = proc.stdout.readline()
    assert proc.stdout.readline().startswith('sneakers23 node a serving')
    return proc, token_line


def test_the_token_a_node_made_lasts_across_restarts(tmp_path):
    """Without SNEAKERS23_ADMIN_TOKEN a node makes a token once, keeps it
    owner-only, uses it again after a restart, and the command line finds
    it; a wrong token's 401 says where the token came from."""
    db, port = f'sqlite:///{tmp_path}/s.db', free_port()
    url = f'http://127.0.0.1:{port}'
    token_file = os.environ['SNEAKERS23_TOKEN_FILE']
    tokens = []
    for _ in range(2):
        proc, line = start_without_token(db, port)
        try:
            tokens.append(line.rsplit(': ', 1)[-1].strip())
            assert token_file in line
            released = run('release', '1', '--url', url,
                           env={'SNEAKERS23_ADMIN_TOKEN': ''})
            assert released.returncode == 0, released.stderr
        finally:
            proc.terminate()
            proc.wait(10)
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 24
    assert os.stat(token_file).st_mode & 0o777 == 0o600
    with open(token_file) as f:
        assert f.read().strip() == tokens[0]
    proc, _ = start_without_token(db, port)
    try:
        wrong = run('release', '2', '--url', url,
                    env={'SNEAKERS23_ADMIN_TOKEN': 'wrong'})
        assert wrong.returncode == 1
        assert '401 unauthorized' in wrong.stderr
        assert 'SNEAKERS23_ADMIN_TOKEN' in wrong.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_restock_by_item_sku(sqlite_node):
    item = sqlite_node.products()[0]['items'][3]
    done = run('restock', item['sku'].lower(), '7', '--url',
               sqlite_node.url)
    assert done.returncode == 0, done.stderr
    assert sqlite_node.item(item['id'])['count'] == item['count'] + 7
    nope = run('restock', 'SHU0000-9', '7', '--url', sqlite_node.url)
    assert nope.returncode == 1
    assert nope.stderr.count('\n') == 1 and 'SHU0000-9' in nope.stderr


# ---------------------------------------------------------------------------
# Drop day: release --at / --cancel, pause, resume (issue 10)
# ---------------------------------------------------------------------------

MOMENT = re.compile(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)')


def state_of(node, product_id):
    product = next(p for p in node.products() if p['id'] == product_id)
    return product['state'], product['release_at']


def as_epoch(text):
    return datetime.fromisoformat(text.replace('Z', '+00:00')).timestamp()


def test_release_at_schedules_and_the_product_turns_released(sqlite_node):
    node = sqlite_node
    began = time.time()
    done = run('release', 'shu6100', '--at', '+3s', '--url', node.url,
               timeout=30)
    assert done.returncode == 0, done.stderr
    printed = MOMENT.search(done.stdout)
    assert printed, done.stdout
    moment = as_epoch(printed[0])
    assert began + 2 <= moment <= time.time() + 4   # about 3 s ahead
    state, release_at = state_of(node, 2)
    assert state == 'scheduled' and as_epoch(release_at) == moment

    wait_until(lambda: state_of(node, 2)[0] == 'released', moment
               - time.time() + 3, 'product 2 released')
    assert time.time() >= moment
    assert as_epoch(state_of(node, 2)[1]) == moment


def test_release_cancel_unschedules(sqlite_node):
    node = sqlite_node
    done = run('release', '1', '--at', '+2h', '--url', node.url,
               timeout=30)
    assert done.returncode == 0, done.stderr
    assert state_of(node, 1)[0] == 'scheduled'
    done = run('release', '1', '--cancel', '--url', node.url, timeout=30)
    assert done.returncode == 0, done.stderr
    assert state_of(node, 1) == ('coming_soon', None)


def test_release_at_a_bad_moment_is_refused(sqlite_node):
    """A bad argument: exit 2; a moment the node refuses: exit 1; one
    line on stderr either way, nothing scheduled."""
    for when, code in [('yesterday', 2), ('2026-12-01T18:00:00', 2),
                       ('+5 minutes', 2), ('2020-01-01T00:00:00Z', 1)]:
        done = run('release', '1', '--at', when, '--url', sqlite_node.url,
                   timeout=30)
        assert done.returncode == code, (when, done.stdout, done.stderr)
        assert done.stderr.count('\n') == 1, (when, done.stderr)
        assert done.stderr.startswith('sneakers23: '), done.stderr
        assert 'Traceback' not in done.stderr
        if code == 1:
            assert 'past' in done.stderr, done.stderr
    assert state_of(sqlite_node, 1) == ('coming_soon', None)


def test_pause_and_resume_commands(sqlite_node):
    node = sqlite_node
    done = run('pause', '--url', node.url, timeout=30)
    assert done.returncode == 0, done.stderr
    assert node.get('/healthz')[2]['paused'] is True
    done = run('resume', '--url', node.url, timeout=30)
    assert done.returncode == 0, done.stderr
    assert node.get('/healthz')[2]['paused'] is False


# ---------------------------------------------------------------------------
# Drop day: status (issue 10)
# ---------------------------------------------------------------------------

def named_node(start_node, db, tmp_path, name):
    """A node called `name` (a one-node peers.toml)."""
    port = free_port()
    config = tmp_path / 'peers.toml'
    config.write_text(f'database = "{db}"\n\n[nodes.{name}]\n'
                      f'http = "127.0.0.1:{port}"\n'
                      f'replication = "tcp://127.0.0.1:{free_port()}"\n')
    return start_node(db, port=port, args=['--config', str(config),
                                           '--node', name])


def test_status_shows_products_and_nodes(sqlite_url, small_catalog,
                                         start_node, tmp_path):
    seeded = run('seed', '--db', sqlite_url, '--catalog', small_catalog)
    assert seeded.returncode == 0, seeded.stderr
    node = named_node(start_node, sqlite_url, tmp_path, 'north')
    node.release(1)
    item = next(i for i in node.products()[0]['items'] if i['count'] > 2)
    for _ in range(2):
        status, _, answer = node.post('/api/purchase',
                                      {'item_id': item['id']})
        assert status == 201, answer

    done = run('status', '--url', node.url, timeout=30)

    assert done.returncode == 0, (done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    for sku, state, sold, left in [('T100', 'released', 2, 20),
                                   ('T200', 'coming_soon', 0, 23),
                                   ('T300', 'coming_soon', 0, 5)]:
        [line] = [line for line in lines if sku in line]
        numbers = re.findall(r'\b\d+\b', line.replace(sku, ''))
        assert state.replace('_', ' ') in line.replace('_', ' '), line
        assert str(sold) in numbers and str(left) in numbers, line
    assert any(re.search(r'\bnorth\b', line) for line in lines), done.stdout


def test_status_items_lists_every_item_for_restock(sqlite_node):
    done = run('status', '--items', '--url', sqlite_node.url, timeout=30)

    assert done.returncode == 0, (done.stdout, done.stderr)
    rows = [line.split() for line in done.stdout.splitlines()]
    listed = {int(row[0]): row[1:] for row in rows
              if len(row) == 5 and row[0].isdigit()}
    items = [i for p in sqlite_node.products() for i in p['items']]
    assert len(listed) == len(items)
    for item in items:
        assert listed[item['id']] == [item['sku'], item['size'],
                                      str(item['count']), item['level']]


def test_status_with_a_wrong_token_or_no_node(sqlite_node):
    wrong = run('status', '--url', sqlite_node.url, timeout=30,
                env={'SNEAKERS23_ADMIN_TOKEN': 'wrong'})
    assert wrong.returncode == 1, (wrong.stdout, wrong.stderr)
    assert wrong.stderr.count('\n') == 1 and '401' in wrong.stderr
    gone = run('status', '--url', f'http://127.0.0.1:{free_port()}',
               timeout=30)
    assert gone.returncode == 2, (gone.stdout, gone.stderr)
    assert gone.stderr.count('\n') == 1, gone.stderr
    assert 'Traceback' not in gone.stderr


def test_report_sums_up_a_sold_out_drop_and_writes_its_orders(
        sqlite_url, small_catalog, start_node, tmp_path):
    """T100 (22 pairs: 7 of size 6, 12 of 9, 3 of 12) sold out by
    sell-random: the report says so, per size, and the CSV holds every
    order the database has."""
    seeded = run('seed', '--db', sqlite_url, '--catalog', small_catalog)
    assert seeded.returncode == 0, seeded.stderr
    node = start_node(sqlite_url)
    node.release(1)
    sold = run('sell-random', '--until-gone', '--url', node.url)
    assert sold.returncode == 0, sold.stderr
    csv_path = tmp_path / 'orders.csv'

    done = run('report', 'T100', '--csv', str(csv_path), '--url', node.url)

    assert done.returncode == 0, (done.stdout, done.stderr)
    out = done.stdout
    assert 'T100 (released): 22 pairs sold, 0 left' in out, out
    assert re.search(r'^sold out +\S+Z \(\d+\.\d s after opening\)$', out,
                     re.MULTILINE), out
    assert 'per size   6: 7, 9: 12, 12: 3' in out, out
    assert re.search(r'^sales/s +\d+\.\d on average, \d+ in the busiest '
                     r'second$', out, re.MULTILINE), out
    with open(csv_path, newline='') as f:
        rows = list(csv.DictReader(f))
    ids = {row[0] for row in db_rows(sqlite_url,
                                     'SELECT id FROM orders WHERE '
                                     'product_id = 1')}
    assert {int(row['order_id']) for row in rows} == ids and len(ids) == 22
    assert {row['size'] for row in rows} == {'6', '9', '12'}
    unknown = run('report', 'NOPE', '--url', node.url)
    assert unknown.returncode == 1 and unknown.stderr.count('\n') == 1
