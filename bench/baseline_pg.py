"""The PostgreSQL baseline: the purchase transaction straight through psycopg2.

The same SQL as a sneakers23 purchase (a conditional decrement of one
hot item plus its order row, one transaction each), driven by plain
threads (no gevent), each with its own connection, for a fixed time.
Prints one JSON object with the committed transactions per second.

    python bench/baseline_pg.py --db postgresql://... --item ID
"""

import argparse
import json
import secrets
import threading
import time
from datetime import UTC, datetime

import psycopg2

TAKE = ('UPDATE availability SET count = count - 1, version = version + 1 '
        'WHERE item_id = %s AND count > 0 RETURNING count, version')
ORDER = ('INSERT INTO orders (item_id, product_id, shopper, node, '
         'created_at) VALUES (%s, %s, %s, %s, %s)')


def worker(dsn, item_id, product_id, deadline, start, tally, lock):
    conn = psycopg2.connect(dsn)
    cur = conn.cursor()
    done = sold_out = 0
    start.wait()
    while time.monotonic() < deadline[0]:
        cur.execute(TAKE, (item_id,))
        if cur.fetchone() is None:
            sold_out += 1
        else:
            cur.execute(ORDER, (item_id, product_id,
                                secrets.token_urlsafe(16), 'baseline',
                                datetime.now(UTC).replace(tzinfo=None)))
            done += 1
        conn.commit()
    conn.close()
    with lock:
        tally['tx'] += done
        tally['sold_out'] += sold_out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--db', required=True, help='postgresql://...')
    parser.add_argument('--item', type=int, required=True)
    parser.add_argument('--product', type=int, required=True)
    parser.add_argument('--threads', type=int, default=8)
    parser.add_argument('--duration', type=float, default=10)
    args = parser.parse_args()
    tally, lock = {'tx': 0, 'sold_out': 0}, threading.Lock()
    start, deadline = threading.Event(), [0.0]
    threads = [threading.Thread(target=worker, args=(
        args.db, args.item, args.product, deadline, start, tally, lock))
        for _ in range(args.threads)]
    for t in threads:
        t.start()
    time.sleep(0.5)   # every connection open before the clock starts
    began = time.monotonic()
    deadline[0] = began + args.duration
    start.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    print(json.dumps({'tx': tally['tx'], 'sold_out': tally['sold_out'],
                      'seconds': elapsed, 'threads': args.threads,
                      'tx_per_s': tally['tx'] / elapsed}))


if __name__ == '__main__':
    main()
