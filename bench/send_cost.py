#!/usr/bin/env python3
"""What one fan-out send() costs from Python, against the same send() in a
C loop: would a native sender beat the fan-out worker's Python one?

Opens N loopback TCP connections to itself, then in each round sends one
`stock_change`-sized event to every server side, first with the worker's
own loop (`sneakers23._send_each` over raw sockets, as the worker holds
them), then from a C loop (compiled with gcc at run time, called through
ctypes, which lets go of the GIL), draining the client sides after
each. Prints microseconds per send for both, per round and the medians.
No reader waits in epoll here, so the kernel's share is smaller than in
a drop; the difference between the two lines is Python's.

    .venv/bin/python bench/send_cost.py [--streams 9000] [--rounds 7]
"""
import argparse
import ctypes
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import sneakers23  # noqa: E402  (the repository's own module)

C_SOURCE = r'''
#include <sys/socket.h>
long send_many(const int *fds, int n, const char *buf, long len) {
    long whole = 0;
    for (int i = 0; i < n; i++)
        if (send(fds[i], buf, len, MSG_DONTWAIT | MSG_NOSIGNAL) == len)
            whole++;
    return whole;
}
'''
EVENT = (b'id: 18c2f0a1b2c-4711\nevent: stock_change\n'
         b'data: {"product_id": 1, "item_id": 7, "level": "low"}\n\n')


def native_sender(workdir):
    source = os.path.join(workdir, 'send_many.c')
    library = os.path.join(workdir, 'send_many.so')
    with open(source, 'w') as f:
        f.write(C_SOURCE)
    subprocess.run(['gcc', '-O2', '-shared', '-fPIC', '-o', library,
                    source], check=True)
    send_many = ctypes.CDLL(library).send_many
    send_many.restype = ctypes.c_long
    return send_many


def connections(n):
    listener = socket.create_server(('127.0.0.1', 0), backlog=1024)
    clients, servers = [], []
    for _ in range(n):
        clients.append(socket.create_connection(listener.getsockname()))
        server, _ = listener.accept()
        raw = sneakers23._socket.socket(fileno=server.detach())
        raw.setblocking(False)
        servers.append(raw)
    listener.close()
    return clients, servers


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--streams', type=int, default=9000)
    parser.add_argument('--rounds', type=int, default=7)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if 2 * args.streams + 64 > hard:
        parser.error(f'{args.streams} streams need {2 * args.streams + 64}'
                     f' files; this process may open {hard}')
    with tempfile.TemporaryDirectory() as workdir:
        send_many = native_sender(workdir)
        clients, servers = connections(args.streams)
        fds = (ctypes.c_int * len(servers))(*(s.fileno() for s in servers))

        def drain():
            for client in clients:
                client.recv(65536)

        pairs = [(sneakers23.Stream(server, 0, None), EVENT)
                 for server in servers]
        py, native = [], []
        for n in range(1, args.rounds + 1):
            started = time.perf_counter()
            short = sneakers23._send_each(pairs)
            py.append((time.perf_counter() - started) / len(servers))
            drain()
            assert not short, len(short)
            started = time.perf_counter()
            whole = send_many(fds, len(servers), EVENT, len(EVENT))
            native.append((time.perf_counter() - started) / len(servers))
            drain()
            assert whole == len(servers), whole
            print(f'round {n}: Python {py[-1] * 1e6:.2f} us/send, '
                  f'C {native[-1] * 1e6:.2f} us/send')
        p, c = statistics.median(py) * 1e6, statistics.median(native) * 1e6
        print(f'median of {args.rounds} rounds, {args.streams:,} sends '
              f'each: Python {p:.2f} us, C {c:.2f} us; Python adds '
              f'{p - c:.2f} us a send ({(p - c) / p:.0%}), '
              f'{(p - c) * 10000 / 1000:.1f} ms a round of 10,000')


if __name__ == '__main__':
    main()
