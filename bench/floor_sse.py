"""The SSE floor: what this machine itself allows, with no web stack.

Plain sockets and no framework: GET /events gets the SSE head and is
kept; POST /api/purchase answers 201, then one ~100-byte `stock_change`
event is written to every kept socket, the sockets shared out in slices
of 64 between two native threads (the kernel's share of a loopback send
runs without the GIL), as sneakers23's fan-out worker does. No filter,
no ring, no cut-offs: measured with the same C client in the same run,
its p99 is the part of the target that belongs to the machine (the
kernel's loopback sends and the client receiving them on the same two
cores), not to the store. GET /healthz answers `{}`.

    python bench/floor_sse.py --port P
"""

import argparse
import signal
import socket
import sys
import threading

HEAD = (b'HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n'
        b'Cache-Control: no-cache\r\n\r\nretry: 2000\n\n')
SLICE = 64


def answer(status, body):
    return (f'HTTP/1.1 {status}\r\nContent-Type: application/json\r\n'
            f'Content-Length: {len(body)}\r\n\r\n{body}').encode()


def event(seq):
    return (f'id: {seq}\nevent: stock_change\ndata: {{"product_id":1,'
            f'"item_id":{seq},"level":"low"}}\n\n').encode()


def send_slices(streams, slices, data):
    for start in slices:
        for sock in streams[start:start + SLICE]:
            try:
                sock.send(data)
            except OSError:
                pass


def fan_out(streams, data):
    slices = iter(range(0, len(streams), SLICE))
    other = threading.Thread(target=send_slices, args=(streams, slices, data))
    other.start()
    send_slices(streams, slices, data)
    other.join()


def read_request(conn):
    data = b''
    while b'\r\n\r\n' not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--port', type=int, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(('127.0.0.1', args.port))
    listener.listen(4096)
    streams, seq = [], 0
    while True:
        conn, _ = listener.accept()
        request = read_request(conn)
        if request is None:
            conn.close()
        elif request.startswith(b'GET /events'):
            conn.sendall(HEAD)
            conn.setblocking(False)
            streams.append(conn)
        elif request.startswith(b'POST'):
            conn.sendall(answer('201 Created', '{}'))
            conn.close()
            seq += 1
            fan_out(streams, event(seq))
        else:
            conn.sendall(answer('200 OK', '{}'))
            conn.close()


if __name__ == '__main__':
    main()
