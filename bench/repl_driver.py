"""Drive paced stock changes at one node, for the replication benchmark.

Every change moves an item across the low/medium boundary, so that each
one makes exactly one `stock_change` event on every node: restock +1
(149 -> 150, medium) then a purchase (150 -> 149, low), and again. One
plain thread per item (no gevent), each with its own keep-alive
connection; change k of the run is due at start + k / rate, the items
taking turns. Prints one JSON object: every change as [item_id, level it makes,
CLOCK_MONOTONIC ns just before sending, status, ns when answered].

    SNEAKERS23_ADMIN_TOKEN=... python bench/repl_driver.py \\
        --port P --items 3,7,12 --rate 1000 --duration 5
"""

import argparse
import json
import os
import socket
import sys
import threading
import time


class Connection:
    """A minimal HTTP/1.1 keep-alive client on one socket."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b''
        self.answered = 0

    def request(self, method, path, body=None, headers=()):
        """Send one request: (send time ns, status, body bytes)."""
        data = b'' if body is None else json.dumps(body).encode()
        head = [f'{method} {path} HTTP/1.1', f'Host: {self.host}',
                *headers, '', '']
        if body is not None:
            head[2:2] = ['Content-Type: application/json',
                         f'Content-Length: {len(data)}']
        raw = '\r\n'.join(head).encode() + data
        sent = time.monotonic_ns()
        self.sock.sendall(raw)
        status, answer = self._response()
        self.answered = time.monotonic_ns()
        return sent, status, answer

    def close(self):
        self.sock.close()

    def _recv(self):
        # ACK at once: the server writes headers and body in two sends,
        # and Nagle would hold the body until a delayed ACK (~40 ms).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError('the node closed the connection')
        self.buf += chunk

    def _response(self):
        """(status, body) of the next response."""
        while b'\r\n\r\n' not in self.buf:
            self._recv()
        head, _, self.buf = self.buf.partition(b'\r\n\r\n')
        lines = head.decode('latin-1').split('\r\n')
        status = int(lines[0].split()[1])
        fields = dict(line.lower().split(': ', 1) for line in lines[1:]
                      if ': ' in line)
        if fields.get('transfer-encoding') == 'chunked':
            body = b''
            while True:
                while b'\r\n' not in self.buf:
                    self._recv()
                size, _, self.buf = self.buf.partition(b'\r\n')
                size = int(size.split(b';')[0], 16)
                while len(self.buf) < size + 2:
                    self._recv()
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    return status, body
        length = int(fields.get('content-length', 0))
        while len(self.buf) < length:
            self._recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body


def call_json(host, port, method, path, body=None, token=None):
    """(status, JSON or raw bytes) of one request on a fresh connection,
    with the admin token when one is given."""
    conn = Connection(host, port)
    try:
        headers = [f'Authorization: Bearer {token}'] if token else []
        headers.append('Connection: close')
        _, status, raw = conn.request(method, path, body, headers)
    finally:
        conn.close()
    try:
        return status, json.loads(raw or b'null')
    except ValueError:
        return status, raw


def drive(host, port, item, slots, token, out):
    """Alternate restock +1 and purchase of `item` at its time slots."""
    conn = Connection(host, port)
    auth = f'Authorization: Bearer {token}'
    for k, due in enumerate(slots):
        delay = (due - time.monotonic_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        if k % 2 == 0:
            sent, status, _ = conn.request(
                'POST', f'/admin/api/items/{item}/restock', {'count': 1},
                [auth])
            out.append([item, 'medium', sent, status, conn.answered])
        else:
            sent, status, _ = conn.request('POST', '/api/purchase',
                                           {'item_id': item})
            out.append([item, 'low', sent, status, conn.answered])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, required=True)
    parser.add_argument('--items', required=True,
                        help='comma-separated item ids, each at 149 pairs')
    parser.add_argument('--rate', type=float, default=1000)
    parser.add_argument('--duration', type=float, default=5)
    args = parser.parse_args()
    token = os.environ.get('SNEAKERS23_ADMIN_TOKEN', '')
    items = [int(i) for i in args.items.split(',')]
    total = int(args.rate * args.duration)
    total -= total % (2 * len(items))   # every item ends where it began
    start = time.monotonic_ns() + 200_000_000
    step = 1e9 / args.rate
    results = [[] for _ in items]
    threads = [threading.Thread(
        target=drive, args=(args.host, args.port, item,
                            [start + int(k * step)
                             for k in range(n, total, len(items))],
                            token, results[n]), daemon=True)
        for n, item in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    changes = sorted((c for r in results for c in r), key=lambda c: c[2])
    json.dump({'changes': changes, 'planned': total,
               'rate_planned': args.rate}, sys.stdout)
    sys.stdout.write('\n')


if __name__ == '__main__':
    main()
