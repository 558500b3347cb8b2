"""A client that runs on one "laptop" of tests/lan.py (inside its network
namespace) and does HTTP for the test, which cannot reach that network.

JSON lines on stdin, one answer line per request on stdout (`id` ties them;
requests run at once, each on a thread):

    {"id": 1, "op": "http", "method": "POST", "url": "...", "body": {...},
     "headers": {...}, "timeout": 10}
      -> {"id": 1, "status": 201, "body": {...}, "ms": 12.3}
         (status 0 and "error" when no answer came)
    {"id": 2, "op": "sse", "url": ".../events"}   # keeps reading, on its own
      -> {"id": 2, "opened": true}
    {"id": 3, "op": "levels", "stream": 2}
      -> {"id": 3, "levels": {"ITEM_ID": "low", ...}, "events": N,
          "connected": true}

Standard library only, no gevent: it must not depend on the code under test.
"""

import http.client
import json
import sys
import threading
import time
import urllib.parse

_write = threading.Lock()
_streams = {}


def answer(message):
    with _write:
        sys.stdout.write(json.dumps(message) + '\n')
        sys.stdout.flush()


def http_call(request):
    url = urllib.parse.urlsplit(request['url'])
    body = request.get('body')
    headers = dict(request.get('headers') or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers.setdefault('Content-Type', 'application/json')
    start = time.monotonic()
    conn = http.client.HTTPConnection(url.hostname, url.port,
                                      timeout=request.get('timeout', 10))
    try:
        conn.request(request.get('method', 'GET'),
                     url.path + (f'?{url.query}' if url.query else ''),
                     body=data, headers=headers)
        reply = conn.getresponse()
        raw = reply.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors='replace')
        return {'status': reply.status, 'body': parsed,
                'ms': round((time.monotonic() - start) * 1000, 1)}
    except OSError as e:
        return {'status': 0, 'error': f'{type(e).__name__}: {e}',
                'ms': round((time.monotonic() - start) * 1000, 1)}
    finally:
        conn.close()


class Stream:
    """One SSE client that follows every item's level, and reconnects
    with Last-Event-ID like a browser."""

    def __init__(self, url):
        self.url = urllib.parse.urlsplit(url)
        self.levels, self.events, self.connected = {}, 0, False
        self.last_id = None
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            try:
                self.read()
            except (OSError, http.client.HTTPException, ValueError):
                pass
            self.connected = False
            time.sleep(0.5)

    def read(self):
        conn = http.client.HTTPConnection(self.url.hostname, self.url.port,
                                          timeout=30)
        # A first connection asks for a snapshot (an id from no epoch of
        # the node's), as a page starts from the levels it was rendered with.
        headers = {'Last-Event-ID': self.last_id or '0-0'}
        conn.request('GET', self.url.path + (f'?{self.url.query}'
                                             if self.url.query else ''),
                     headers=headers)
        reply = conn.getresponse()
        if reply.status != 200:
            raise OSError(f'status {reply.status}')
        self.connected = True
        event, data = None, ''
        while True:
            line = reply.fp.readline()
            if not line:
                raise OSError('stream closed')
            line = line.decode().rstrip('\n')
            if line.startswith('id: '):
                self.last_id = line[4:]
            elif line.startswith('event: '):
                event = line[7:]
            elif line.startswith('data: '):
                data = line[6:]
            elif not line and event:
                self.apply(event, json.loads(data))
                event, data = None, ''

    def apply(self, event, data):
        self.events += 1
        if event == 'stock_change':
            self.levels[str(data['item_id'])] = data['level']
        elif event == 'released':
            for item in data['items']:
                self.levels[str(item['id'])] = item['level']
        elif event == 'snapshot':
            for product in data['products']:
                for item in product['items']:
                    self.levels[str(item['id'])] = item['level']


def serve(request):
    op = request['op']
    if op == 'http':
        return http_call(request)
    if op == 'sse':
        _streams[request['id']] = Stream(request['url'])
        return {'opened': True}
    if op == 'levels':
        stream = _streams[request['stream']]
        return {'levels': dict(stream.levels), 'events': stream.events,
                'connected': stream.connected}
    return {'error': f'unknown op {op}'}


def handle(request):
    try:
        result = serve(request)
    except Exception as e:  # the test must hear about it, not hang
        result = {'error': f'{type(e).__name__}: {e}'}
    answer({'id': request['id'], **result})


def main():
    answer({'id': 0, 'ready': True})
    for line in sys.stdin:
        threading.Thread(target=handle, args=(json.loads(line),),
                         daemon=True).start()


if __name__ == '__main__':
    main()
