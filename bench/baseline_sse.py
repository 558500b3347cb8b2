"""The SSE baseline: a straightforward gevent + Bottle server.

One gevent Queue per client: GET /events registers a queue, yields
`retry:`, then yields whatever is put into the queue. POST /api/purchase
formats one ~100-byte `stock_change` event and puts it into every queue,
answering 201. GET /healthz answers a small JSON object.

    python bench/baseline_sse.py --port P
"""

from gevent import monkey

monkey.patch_all()

import argparse
import json
import signal
import time

import bottle
import gevent
import gevent.event
import gevent.queue
from gevent.pywsgi import WSGIServer

app = bottle.Bottle()
queues = set()
state = {'seq': 0, 'epoch': format(int(time.time() * 1000), 'x')}


@app.get('/events')
def events():
    bottle.response.set_header('Content-Type', 'text/event-stream')
    bottle.response.set_header('Cache-Control', 'no-cache')
    bottle.response.set_header('X-Accel-Buffering', 'no')
    queue = gevent.queue.Queue()
    queues.add(queue)

    def stream():
        try:
            yield b'retry: 2000\n\n'
            while True:
                yield queue.get()
        finally:
            queues.discard(queue)
    return stream()


@app.post('/api/purchase')
def purchase():
    data = json.loads(bottle.request.body.read() or b'{}')
    item_id = int(data.get('item_id', 0))
    state['seq'] += 1
    body = json.dumps({'product_id': 1, 'item_id': item_id,
                       'level': 'low'}, separators=(',', ':'))
    event = (f"id: {state['epoch']}-{state['seq']}\n"
             f'event: stock_change\ndata: {body}\n\n').encode()
    for queue in list(queues):
        queue.put(event)
    bottle.response.status = 201
    bottle.response.content_type = 'application/json'
    return json.dumps({'order_id': state['seq'], 'item_id': item_id,
                       'product_id': 1})


@app.get('/healthz')
def healthz():
    return {'node': 'baseline', 'streams': len(queues)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, required=True)
    args = parser.parse_args()
    server = WSGIServer((args.host, args.port), app, log=None,
                        backlog=4096)
    server.start()
    print(f'baseline serving on http://{args.host}:{args.port}', flush=True)
    stopped = gevent.event.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stopped.set)
    stopped.wait()
    server.stop(timeout=1)


if __name__ == '__main__':
    main()
