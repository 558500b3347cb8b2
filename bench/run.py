#!/usr/bin/env python3
"""Benchmarks of sneakers23, each figure beside its baseline.

    .venv/bin/python bench/run.py                   # everything, ~6-8 min
    .venv/bin/python bench/run.py sse reads         # some of them
    .venv/bin/python bench/run.py --quick           # a smoke test

Benchmarks (by name): sse, purchases_sqlite, sold_out, reads,
purchases_pg, replication, cold_start, drop (--nodes 3: on PostgreSQL),
curve. Every server and load generator runs as its own process on this
machine; each baseline is measured in
the same run, with the same client. Nothing here asserts a timing: it
prints a table (figure, sneakers23, baseline, ratio, target, the load
generator's CPU time) and writes everything to bench/results/latest.json.

`purchases_pg` drops and recreates the sneakers23 tables in the
PostgreSQL database it is given (--pg, default `sneakers23_bench` on the
local server, created when missing, so that it never collides with the
test suite's database): never point it at a database in use.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_PY = os.path.join(ROOT, '.venv', 'bin', 'python')
if (os.path.exists(VENV_PY) and not os.environ.get('SNEAKERS23_BENCH_VENV')
        and os.path.realpath(sys.prefix) != os.path.realpath(
            os.path.join(ROOT, '.venv'))):
    os.environ['SNEAKERS23_BENCH_VENV'] = '1'  # re-run under the venv
    os.execv(VENV_PY, [VENV_PY, *sys.argv])

import argparse
import bisect
import json
import platform
import re
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime

from repl_driver import call_json

PY = VENV_PY if os.path.exists(VENV_PY) else sys.executable
NODE = os.path.join(ROOT, 'sneakers23.py')
RESULTS = os.path.join(HERE, 'results')
TOKEN = 'bench-admin-token'
PG_URL = os.environ.get(
    'SNEAKERS23_BENCH_PG',
    'postgresql://postgres@127.0.0.1:5432/sneakers23_bench')
HOT_STOCK = 1_000_000
CLK_TCK = os.sysconf('SC_CLK_TCK')
NAMES = ('sse', 'purchases_sqlite', 'sold_out', 'reads', 'purchases_pg',
         'replication', 'cold_start', 'drop', 'curve')
SQLITE_GROUP = ('purchases_sqlite', 'sold_out', 'reads')


@dataclass
class Settings:
    streams: int = 10_000
    rounds: int = 5
    wrk_seconds: int = 10
    wrk_threads: int = 2
    wrk_conns: int = 500
    repl_rate: int = 1000
    repl_seconds: float = 5
    repl_items: int = 16
    cold_products: int = 10_000
    cold_starts: int = 3
    pg_wait: float = 60
    drop_streams: int = 10_000
    drop_buyers: int = 500
    drop_pairs: int = 200       # per size: 2,600 pairs over 13 sizes
    drop_lead: float = 3.0      # s from scheduling to the release
    curve_max_streams: int = 15_000


QUICK = Settings(streams=1000, rounds=2, wrk_seconds=5, repl_seconds=2,
                 cold_products=1000, pg_wait=20, drop_streams=1000,
                 drop_buyers=100, drop_pairs=50, curve_max_streams=2500)


def say(text):
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

class Procs:
    """Every process the benchmark starts, each in its own group."""

    def __init__(self, logdir):
        self.logdir, self.live, self.sessions = logdir, [], set()

    def start(self, cmd, name, env=None, **kwargs):
        kwargs.setdefault('stdin', subprocess.DEVNULL)
        log = None
        if 'stdout' not in kwargs:
            log = open(os.path.join(self.logdir, f'{name}.log'), 'ab')
            kwargs['stdout'] = log
            kwargs.setdefault('stderr', subprocess.STDOUT)
        try:
            proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                    **kwargs)
        finally:
            if log:
                log.close()
        proc.name = name
        self.live.append(proc)
        self.sessions.add(proc.pid)
        return proc

    def log_tail(self, name, lines=15):
        path = os.path.join(self.logdir, f'{name}.log')
        try:
            with open(path, errors='replace') as f:
                return ''.join(f.readlines()[-lines:])
        except OSError:
            return ''

    def stop(self, proc, grace=5.0):
        """SIGTERM the process group, SIGKILL it after `grace` seconds."""
        if proc in self.live:
            self.live.remove(proc)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            if proc.returncode is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()

    def stop_all(self):
        for proc in reversed(list(self.live)):
            self.stop(proc, grace=2)

    def reap(self, proc, timeout):
        """Wait for `proc`; (exit code, CPU seconds it used)."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                if proc in self.live:
                    self.live.remove(proc)
                return proc.returncode, usage.ru_utime + usage.ru_stime
            if time.monotonic() > deadline:
                self.stop(proc)
                raise TimeoutError(f'{proc.name} took over {timeout:.0f} s')
            time.sleep(0.02)

    def run(self, cmd, name, timeout, env=None):
        """Run to the end: (exit code, stdout text, CPU seconds)."""
        with tempfile.TemporaryFile() as out:
            proc = self.start(cmd, name, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
            code, cpu = self.reap(proc, timeout)
            out.seek(0)
            return code, out.read().decode(errors='replace'), cpu


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def family(pid):
    """`pid` and its child processes (a node's fan-out worker)."""
    pids = [pid]
    try:
        for task in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{task}/children') as f:
                pids += [int(child) for child in f.read().split()]
    except OSError:
        pass
    return pids


def status_kb(pid, field):
    """A /proc/PID/status figure in kB, summed over the process and its
    children (0 for one that is gone)."""
    total = 0
    for member in family(pid):
        try:
            with open(f'/proc/{member}/status') as f:
                for line in f:
                    if line.startswith(field + ':'):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def rss_kb(pid):
    return status_kb(pid, 'VmRSS')


def cpu_seconds(pid):
    """User + system CPU time of a running process and its children."""
    total = 0
    for member in family(pid):
        try:
            with open(f'/proc/{member}/stat') as f:
                fields = f.read().rpartition(')')[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def cpu_busy(seconds=1.0):
    """Share of all CPUs busy over `seconds`, whoever the work is for."""
    total, busy = cpu_busy_ticks()
    time.sleep(seconds)
    total2, busy2 = cpu_busy_ticks()
    return (busy2 - busy) / max(1, total2 - total)


def wait_quiet(ctx, name):
    """Wait (up to --wait-quiet s) for a machine free of others' work."""
    deadline = time.monotonic() + ctx.args.wait_quiet
    busy = cpu_busy()
    while busy > 0.15 and time.monotonic() < deadline:
        busy = cpu_busy()
    ctx.busy[name] = round(busy, 3)
    if busy > 0.15:
        ctx.note(f'{name}: the machine was {busy:.0%} busy with other '
                 'work just before it: its figures are pessimistic')


class ForeignCpu:
    """CPU time used by processes this run did not start, sampled twice
    a second from /proc: how much other work shared the machine."""

    def __init__(self, procs):
        self.procs, self.total = procs, 0.0
        self.ignore = set()   # command names that count as ours
        self._seen = self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self):
        mine = {os.getsid(0), *self.procs.sessions}
        found = {}
        for pid in os.listdir('/proc'):
            if not pid.isdigit():
                continue
            try:
                with open(f'/proc/{pid}/stat') as f:
                    text = f.read()
            except OSError:
                continue
            comm, fields = text[text.find('(') + 1:text.rfind(')')], \
                text.rpartition(')')[2].split()
            if int(fields[3]) not in mine and comm not in self.ignore:
                found[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        return found

    def _run(self):
        while not self._stop.wait(0.5):
            now = self._sample()
            self.total += sum(max(0.0, ticks - self._seen.get(pid, 0.0))
                              for pid, ticks in now.items())
            self._seen = now

    def stop(self):
        self._stop.set()
        self._thread.join()


def cpu_ticks():
    """The machine's CPU ticks so far, from /proc/stat: user, nice,
    system, idle, iowait, irq, softirq, steal."""
    with open('/proc/stat') as f:
        return [int(x) for x in f.readline().split()[1:9]]


def cpu_busy_ticks():
    """(all ticks, busy ticks: neither idle nor iowait) so far."""
    ticks = cpu_ticks()
    return sum(ticks), sum(ticks) - ticks[3] - ticks[4]


def widest_inside(samples, start_ns, end_ns):
    """The first and last of the samples (monotonic ns first) taken
    between two moments, or None when fewer than two were."""
    inside = [s for s in samples if start_ns <= s[0] <= end_ns]
    return (inside[0], inside[-1]) if len(inside) >= 2 else None


def busy_between(samples, start_ns, end_ns):
    """The machine's busy share (%) between two moments, from samples of
    (monotonic ns, all ticks, busy ticks), else None."""
    pair = widest_inside(samples, start_ns, end_ns)
    if pair is None or pair[1][1] == pair[0][1]:
        return None
    (_, all0, busy0), (_, all1, busy1) = pair
    return 100 * (busy1 - busy0) / (all1 - all0)


def run_queue_ns(pids):
    """{pid: ns its main thread has spent runnable but waiting for a core}
    (/proc/PID/schedstat, the second field); a pid gone is left out."""
    found = {}
    for pid in pids:
        try:
            with open(f'/proc/{pid}/schedstat') as f:
                found[pid] = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return found


def waited_between(samples, start_ns, end_ns):
    """The largest share (%) of the time between two moments that a
    node's main thread spent waiting for a core, from samples of
    (monotonic ns, run_queue_ns()), else None."""
    pair = widest_inside(samples, start_ns, end_ns)
    if pair is None:
        return None
    (t0, waits0), (t1, waits1) = pair
    shares = [100 * (waits1[pid] - waits0[pid]) / (t1 - t0)
              for pid in waits1 if pid in waits0]
    return max(shares) if shares else None


def pressure():
    """avg10 of /proc/pressure/{cpu,memory} (some), when there."""
    found = {}
    for kind in ('cpu', 'memory'):
        try:
            with open(f'/proc/pressure/{kind}') as f:
                found[kind] = f.readline().split()[1].split('=')[1]
        except (OSError, IndexError):
            pass
    return found


def node_env():
    return {**os.environ, 'SNEAKERS23_ADMIN_TOKEN': TOKEN,
            'PYTHONUNBUFFERED': '1'}


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

def api(port, method, path, body=None, admin=False):
    """(status, JSON) of one request on a fresh connection."""
    return call_json('127.0.0.1', port, method, path, body,
                     TOKEN if admin else None)


def healthz_once(port):
    try:
        return api(port, 'GET', '/healthz')[0] == 200
    except OSError:
        return False


def wait_ready(procs, proc, port, timeout=60.0, poll=0.01):
    """Poll GET /healthz until 200; returns when it answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f'{proc.name} exited with {proc.returncode}'
                               f':\n{procs.log_tail(proc.name)}')
        if healthz_once(port):
            return time.monotonic()
        time.sleep(poll)
    raise TimeoutError(f'{proc.name} not ready after {timeout:.0f} s')


def products(port):
    status, data = api(port, 'GET', '/api/products')
    if status != 200:
        raise RuntimeError(f'/api/products answered {status}')
    return data


def item_counts(port):
    return {i['id']: i['count'] for p in products(port) for i in p['items']}


def release(port, product_id):
    status, answer = api(port, 'POST',
                         f'/admin/api/products/{product_id}/release',
                         {}, admin=True)
    if status != 200:
        raise RuntimeError(f'release {product_id}: {status} {answer}')


def restock_to(port, item_id, current, target):
    """Add pairs until the item holds `target` (restock only adds)."""
    while current < target:
        add = min(target - current, 1_000_000)
        status, answer = api(port, 'POST',
                             f'/admin/api/items/{item_id}/restock',
                             {'count': add}, admin=True)
        if status != 200:
            raise RuntimeError(f'restock {item_id}: {status} {answer}')
        current = answer['count']
    return current


def items_below(port, limit, how_many, exclude=()):
    """(product_id, item_id, count) of items holding fewer than `limit`."""
    found = [(p['id'], i['id'], i['count']) for p in products(port)
             for i in p['items'] if i['count'] < limit
             and i['id'] not in exclude]
    if len(found) < how_many:
        raise RuntimeError(f'only {len(found)} items below {limit}')
    return found[:how_many]


def start_node(ctx, name, db_url, port=None, extra=()):
    port = port or free_port()
    cmd = [PY, NODE, 'serve', '--db', db_url, '--port', str(port), *extra]
    proc = ctx.procs.start(cmd, name, env=node_env())
    wait_ready(ctx.procs, proc, port)
    wait_fan_out(port)
    return proc, port


def wait_fan_out(port, timeout=30.0):
    """Start the node's fan-out worker (one stream does) and wait until
    it runs (it reports its memory): a node measured before would count
    the worker's start as the cost of its first streams."""
    with socket.create_connection(('127.0.0.1', port)) as stream:
        stream.sendall(b'GET /events HTTP/1.1\r\nHost: bench\r\n\r\n')
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fan_out = api(port, 'GET', '/healthz')[1].get('fan_out', {})
            if fan_out.get('process') != 'worker' or fan_out.get('rss_bytes'):
                return
            time.sleep(0.05)
    raise TimeoutError(f'the fan-out worker of :{port} did not start')


# ---------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------

def wrk(ctx, name, url, script, env_extra=None, server=None):
    """One wrk run: its JSON summary, its CPU and the server's CPU."""
    s = ctx.settings
    cmd = ['wrk', f'-t{s.wrk_threads}', f'-c{s.wrk_conns}',
           f'-d{s.wrk_seconds}s', '-s', os.path.join(HERE, script), url]
    server_cpu = cpu_seconds(server.pid) if server else None
    code, out, cpu = ctx.procs.run(cmd, name, s.wrk_seconds + 60,
                                   env={**os.environ, **(env_extra or {})})
    match = re.search(r'^WRKJSON (\{.*\})$', out, re.M)
    if code != 0 or not match:
        raise RuntimeError(f'wrk failed ({code}):\n{out[-2000:]}')
    result = json.loads(match.group(1))
    seconds = result['duration_us'] / 1e6
    result.update(
        seconds=seconds, rps=result['requests'] / seconds,
        ok=result['requests'] - result['non_2xx_3xx'],
        ok_per_s=(result['requests'] - result['non_2xx_3xx']) / seconds,
        client_cpu=cpu,
        command=' '.join(cmd[:-2] + [f'bench/{script}', url]))
    if server:
        result['server_cpu'] = cpu_seconds(server.pid) - server_cpu
    errors = sum(result[k] for k in ('connect_errors', 'read_errors',
                                     'write_errors', 'timeouts'))
    say(f'  {name}: {result["requests"]} requests in {seconds:.1f} s = '
        f'{result["rps"]:,.0f}/s, {result["non_2xx_3xx"]} non-2xx, '
        f'{errors} socket errors; wrk CPU {cpu:.1f} s')
    if errors:
        ctx.note(f'{name}: wrk saw {errors} socket errors (of which '
                 f'{result["timeouts"]} answers slower than its 2 s '
                 'timeout); they are not counted as answered')
    return result


# ---------------------------------------------------------------------------
# The benchmark context and its results
# ---------------------------------------------------------------------------

class Context:
    def __init__(self, settings, args, workdir):
        self.settings, self.args, self.workdir = settings, args, workdir
        self.procs = Procs(workdir)
        self.rows, self.notes, self.results = [], [], {}
        self._client = None
        self.busy, self.foreign = {}, {}
        self.monitor = None
        self.sqlite = None   # the node shared by SQLITE_GROUP

    def row(self, figure, ours, base, unit, target='', cpu='',
            higher_is_better=True, target_ratio=None, target_value=None):
        """One line of the table."""
        ratio = ours / base if ours is not None and base else None
        if unit == '%':   # shares: compared as their difference
            ratio = None
        met = ''
        if target_ratio is not None and ratio is not None:
            met = 'met' if ratio >= target_ratio else 'MISSED'
        elif target_value is not None and ours is not None:
            ok = ours >= target_value if higher_is_better else \
                ours <= target_value
            met = 'met' if ok else 'MISSED'
        self.rows.append({
            'figure': figure, 'sneakers23': ours, 'baseline': base,
            'unit': unit, 'ratio': ratio, 'target': target,
            'target_met': met or None, 'client_cpu': cpu})

    def note(self, text):
        self.notes.append(text)
        say(f'  note: {text}')

    def client(self):
        """The C SSE client, compiled once per run."""
        if self._client is None:
            os.makedirs(RESULTS, exist_ok=True)
            source = os.path.join(HERE, 'sse_client.c')
            binary = os.path.join(RESULTS, 'sse_client')
            subprocess.run(['gcc', '-O2', '-Wall', '-o', binary, source],
                           check=True)
            self._client = binary
        return self._client

    def sqlite_node(self):
        """One SQLite node for the HTTP benchmarks, and its /healthz rate."""
        if self.sqlite is None:
            path = os.path.join(self.workdir, 'http.db')
            proc, port = start_node(self, 'node-sqlite', f'sqlite:///{path}')
            self.sqlite = {'proc': proc, 'port': port, 'path': path}
            say('  baseline: wrk GET /healthz on the same node')
            self.sqlite['healthz'] = wrk(
                self, 'wrk-healthz', f'http://127.0.0.1:{port}/healthz',
                'get.lua', server=proc)
            self.results['healthz_sqlite'] = self.sqlite['healthz']
        return self.sqlite

    def stop_sqlite_node(self):
        if self.sqlite:
            self.procs.stop(self.sqlite['proc'])
            self.sqlite = None


def cpu_text(ours, base=None):
    if base is None:
        return f'{ours:.2f} s'
    return f'{ours:.2f} s | {base:.2f} s'


# ---------------------------------------------------------------------------
# SSE fan-out
# ---------------------------------------------------------------------------

def parse_fields(line):
    return {k: float(v) for k, v in re.findall(r'(\w+)=(-?[\d.]+)', line)}


def fan_out(ctx, name, proc, port, items):
    """Open N streams, trigger one stock_change per item, time them."""
    s = ctx.settings
    time.sleep(0.5)
    rss_before = rss_kb(proc.pid)
    cmd = [ctx.client(), '--port', str(port), '--streams', str(s.streams),
           '--window', '500', '--timeout', '20', '--gap', '0.5']
    for item in items:
        cmd += ['--item', str(item)]
    client = ctx.procs.start(cmd, f'client-{name}', stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE,
                             stderr=open(os.path.join(
                                 ctx.workdir, f'client-{name}.log'), 'ab'))
    try:
        ready = client.stdout.readline().decode()
        if not ready.startswith('ready'):
            raise RuntimeError(f'the SSE client said {ready!r}:\n'
                               + ctx.procs.log_tail(f'client-{name}'))
        fields = parse_fields(ready)
        time.sleep(1.0)
        rss_after = rss_kb(proc.pid)
        _, health = api(port, 'GET', '/healthz')
        say(f'  {name}: {int(fields["connected"])} streams open '
            f'(the server counts {health.get("streams")}) in '
            f'{fields["connect_ms"] / 1000:.1f} s; RSS {rss_before} -> '
            f'{rss_after} kB')
        client.stdin.write(b'go\n')
        client.stdin.flush()
        output = client.stdout.read().decode()
        _, cpu = ctx.procs.reap(client, 120)
    finally:
        ctx.procs.stop(client)
    rounds = [parse_fields(line) for line in output.splitlines()
              if line.startswith('round')]
    all_line = next(line for line in output.splitlines()
                    if line.startswith('all'))
    total = parse_fields(all_line)
    tail = parse_fields(output.splitlines()[-1])
    for line in output.splitlines():
        say(f'    {line}')
    return {
        'streams': s.streams, 'connected': int(fields['connected']),
        'connect_failed': int(fields['failed']),
        'connect_s': fields['connect_ms'] / 1000,
        'server_streams': health.get('streams'),
        'rss_before_kb': rss_before, 'rss_after_kb': rss_after,
        'kb_per_stream': (rss_after - rss_before) / s.streams,
        'rounds': rounds, 'received': int(total['received']),
        'expected': s.streams * len(items),
        'p50_ms': total['p50'], 'p90_ms': total['p90'],
        'p99_ms': total['p99'], 'max_ms': total['max'],
        'last_stream_ms': statistics.median(r['max'] for r in rounds),
        'worst_round_p99_ms': max(r['p99'] for r in rounds),
        'statuses': [int(r['status']) for r in rounds],
        'client_cpu': cpu, 'client_cpu_rounds': tail.get(
            'cpu_rounds_ms', 0) / 1000}


def fan_out_script(ctx, name, script, items):
    """fan_out on another SSE server of bench/ (`script --port P`)."""
    proc = ctx.procs.start([PY, os.path.join(HERE, script),
                            '--port', str(port := free_port())],
                           f'{name}-sse')
    try:
        wait_ready(ctx.procs, proc, port)
        return fan_out(ctx, name, proc, port, items)
    finally:
        ctx.procs.stop(proc)


def bench_sse(ctx):
    s = ctx.settings
    say(f'sse: one stock_change to {s.streams:,} streams, {s.rounds} '
        'rounds, sneakers23 then the baseline')
    path = os.path.join(ctx.workdir, 'sse.db')
    proc, port = start_node(ctx, 'node-sse', f'sqlite:///{path}')
    try:
        chosen = items_below(port, 150, s.rounds)
        for product_id in {p for p, _, _ in chosen}:
            release(port, product_id)
        for _, item, count in chosen:
            if restock_to(port, item, count, 150) != 150:
                raise RuntimeError(f'item {item} is not at 150')
        ours = fan_out(ctx, 'sneakers23', proc, port,
                       [i for _, i, _ in chosen])
        counts = item_counts(port)
        ours['items_after'] = {i: counts[i] for _, i, _ in chosen}
    finally:
        ctx.procs.stop(proc)
    items = [i for _, i, _ in chosen]
    base = fan_out_script(ctx, 'baseline', 'baseline_sse.py', items)
    # The machine's share: bare sends of the same bytes, same client.
    floor = fan_out_script(ctx, 'floor', 'floor_sse.py', items)
    ctx.results['sse'] = {'sneakers23': ours, 'baseline': base,
                          'floor': floor}
    if set(ours['statuses']) != {201}:
        ctx.note(f'sse: trigger purchases answered {ours["statuses"]}')
    if any(c != 149 for c in ours['items_after'].values()):
        ctx.note(f'sse: items after the rounds: {ours["items_after"]}')
    for r, label in ((ours, 'sneakers23'), (base, 'baseline'),
                     (floor, 'floor')):
        if r['received'] != r['expected'] or r['connect_failed']:
            ctx.note(f'sse {label}: {r["received"]} of {r["expected"]} '
                     f'deliveries, {r["connect_failed"]} streams failed '
                     'to open')
    n = f'{s.streams:,}'
    cpu = cpu_text(ours['client_cpu'], base['client_cpu'])
    ctx.row(f'stock_change to {n} SSE streams, p50', ours['p50_ms'],
            base['p50_ms'], 'ms', cpu=cpu)
    ctx.row(f'stock_change to {n} SSE streams, p99', ours['p99_ms'],
            base['p99_ms'], 'ms', '<= 100 ms', cpu=cpu,
            higher_is_better=False, target_value=100)
    ctx.row(f'  the worst of the {s.rounds} rounds, p99',
            ours['worst_round_p99_ms'], base['worst_round_p99_ms'], 'ms',
            '<= 100 ms every round', cpu=cpu, higher_is_better=False,
            target_value=100)
    ctx.row(f'  last of {n} streams (median of {s.rounds} rounds)',
            ours['last_stream_ms'], base['last_stream_ms'], 'ms', cpu=cpu)
    ctx.row(f'  p99 against the floor: bare sends (floor_sse.py) to {n}',
            ours['p99_ms'], floor['p99_ms'], 'ms',
            cpu=cpu_text(ours['client_cpu'], floor['client_cpu']))
    ctx.row('memory per open SSE stream', ours['kb_per_stream'],
            base['kb_per_stream'], 'KB', '<= 12 KB',
            higher_is_better=False, target_value=12)
    ctx.note(f'sse: C client CPU while triggering and receiving '
             f'{ours["client_cpu_rounds"]:.2f} s (sneakers23) / '
             f'{base["client_cpu_rounds"]:.2f} s (baseline) / '
             f'{floor["client_cpu_rounds"]:.2f} s (floor); the totals '
             'in the table include opening the streams')


# ---------------------------------------------------------------------------
# Purchases, sold-out answers, reads
# ---------------------------------------------------------------------------

def hot_item(port):
    """Release product 1's first item and stock it to HOT_STOCK."""
    first = products(port)[0]
    item = first['items'][0]
    release(port, first['id'])
    restock_to(port, item['id'], item['count'], HOT_STOCK)
    return first['id'], item['id']


def bench_purchases_sqlite(ctx):
    say('purchases_sqlite: wrk purchases of one hot item, node on SQLite')
    node = ctx.sqlite_node()
    port = node['port']
    _, item = hot_item(port)
    result = wrk(ctx, 'wrk-purchase-sqlite',
                 f'http://127.0.0.1:{port}/api/purchase', 'purchase.lua',
                 {'ITEM_ID': str(item)}, server=node['proc'])
    time.sleep(0.5)
    sold = HOT_STOCK - item_counts(port)[item]
    with sqlite3.connect(f'file:{node["path"]}?mode=ro', uri=True) as db:
        orders = db.execute('SELECT count(*) FROM orders WHERE item_id = ?',
                            (item,)).fetchone()[0]
    result.update(sold=sold, orders=orders)
    check_sold(ctx, 'purchases_sqlite', result)
    hub_stall(ctx, port, 'purchases_sqlite', result)
    base = node['healthz']
    ctx.results['purchases_sqlite'] = result
    ctx.row('purchases/s, one hot item, SQLite (201s) vs /healthz',
            result['ok_per_s'], base['rps'], 'req/s', '>= 0.6x',
            cpu_text(result['client_cpu'], base['client_cpu']),
            target_ratio=0.6)


def hub_stall(ctx, port, name, result):
    """The node's worst hub lag of the last 10 s (the wrk run): how long
    its gevent hub could not run, from /healthz."""
    lag = api(port, 'GET', '/healthz')[1]['hub_lag_ms']['max_10s']
    result['hub_lag_max_ms'] = lag
    ctx.note(f'{name}: the node\'s hub ran a 50 ms timer at most {lag} ms '
             'late during the run (/healthz hub_lag_ms)')


def check_sold(ctx, name, result):
    """Pairs sold = order rows; 201s counted by wrk = those, less any
    still in flight when wrk stopped (at most one per connection)."""
    gap = result['sold'] - result['ok']
    if result['sold'] != result['orders'] or not (
            0 <= gap <= ctx.settings.wrk_conns):
        ctx.note(f'{name}: sold {result["sold"]} pairs, {result["orders"]} '
                 f'order rows, wrk counted {result["ok"]} 201s')
    else:
        ctx.note(f'{name}: {result["sold"]} pairs sold = {result["orders"]}'
                 f' order rows; wrk counted {result["ok"]} 201s ({gap} '
                 'answered after wrk stopped counting)')


def bench_sold_out(ctx):
    say('sold_out: wrk purchases of an item at 0 (released) vs /healthz')
    node = ctx.sqlite_node()
    port = node['port']
    catalogue = products(port)
    candidates = [(p['id'], i['id'], i['count']) for p in catalogue[1:]
                  for i in p['items']]
    product_id, item, count = min(candidates, key=lambda c: c[2])
    release(port, product_id)
    for _ in range(count):   # sell what is left, one new shopper each
        api(port, 'POST', '/api/purchase', {'item_id': item})
    if item_counts(port)[item] != 0:
        raise RuntimeError(f'item {item} is not sold out')
    result = wrk(ctx, 'wrk-sold-out', f'http://127.0.0.1:{port}'
                 '/api/purchase', 'purchase.lua', {'ITEM_ID': str(item)},
                 server=node['proc'])
    if result['non_2xx_3xx'] != result['requests']:
        ctx.note(f'sold_out: {result["ok"]} answers were not 409')
    base = node['healthz']
    ctx.results['sold_out'] = result
    ctx.row('sold-out answers/s (409) vs /healthz', result['rps'],
            base['rps'], 'req/s', '>= 0.8x',
            cpu_text(result['client_cpu'], base['client_cpu']),
            target_ratio=0.8)


def bench_reads(ctx):
    say('reads: wrk GET / and GET /api/products vs /healthz')
    node = ctx.sqlite_node()
    port = node['port']
    base = node['healthz']
    ctx.results['reads'] = {}
    for path, name in (('/', 'page'), ('/api/products', 'products')):
        result = wrk(ctx, f'wrk-{name}', f'http://127.0.0.1:{port}{path}',
                     'get.lua', server=node['proc'])
        if result['non_2xx_3xx']:
            ctx.note(f'reads: {result["non_2xx_3xx"]} non-2xx answers to '
                     f'GET {path}')
        ctx.results['reads'][name] = result
        ctx.row(f'GET {path} req/s vs /healthz', result['rps'],
                base['rps'], 'req/s', '>= 0.6x',
                cpu_text(result['client_cpu'], base['client_cpu']),
                target_ratio=0.6)


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------

def pg_ensure_database(psycopg2, url):
    """Create the benchmark's own database when it is missing."""
    try:
        psycopg2.connect(url).close()
        return
    except psycopg2.OperationalError as e:
        if 'does not exist' not in str(e):
            raise
    from psycopg2.extensions import make_dsn, parse_dsn
    name = parse_dsn(url)['dbname']
    conn = psycopg2.connect(make_dsn(url, dbname='postgres'))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    say(f'  created the database {name}')


def pg_others(psycopg2, url):
    """Sessions other than ours on the benchmark's database."""
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute('SELECT count(*) FROM pg_stat_activity WHERE datname ='
                    ' current_database() AND pid <> pg_backend_pid()')
        others = cur.fetchone()[0]
    conn.close()
    return others


def pg_query(psycopg2, url, sql, args=()):
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def pg_seed(ctx, url):
    code, out, _ = ctx.procs.run([PY, NODE, 'seed', '--reset', '--db', url],
                                 'seed-pg', 120)
    if code != 0:
        raise RuntimeError(f'seed --reset on PostgreSQL failed: {out}')


def bench_purchases_pg(ctx):
    try:
        import psycopg2
    except ImportError:
        ctx.note('purchases_pg skipped: psycopg2 is not installed')
        return
    url = ctx.args.pg
    say(f'purchases_pg: NOTE: this drops and recreates the sneakers23 '
        f'tables in {url}; never run it while the tests use that database')
    try:
        pg_ensure_database(psycopg2, url)
        deadline = time.monotonic() + ctx.settings.pg_wait
        while (others := pg_others(psycopg2, url)) and not ctx.args.force_pg:
            if time.monotonic() > deadline:
                ctx.note(f'purchases_pg skipped: {others} other sessions '
                         f'use {url} (tests running?); --force-pg to run '
                         'anyway')
                return
            time.sleep(1)
    except psycopg2.OperationalError as e:
        ctx.note(f'purchases_pg skipped: cannot reach {url}: '
                 f'{str(e).strip().splitlines()[0]}')
        return
    ctx.monitor.ignore = {'postgres'}   # the server works for us here
    try:
        run_pg(ctx, psycopg2, url)
    finally:
        ctx.monitor.ignore = set()


def run_pg(ctx, psycopg2, url):
    """The baseline, then the node, each on freshly seeded tables."""
    s = ctx.settings
    # The baseline: 8 plain threads, one connection each, fresh tables.
    pg_seed(ctx, url)
    item, product = pg_query(psycopg2, url, 'SELECT id, product_id FROM '
                             'item ORDER BY id LIMIT 1')[0]
    pg_query(psycopg2, url, 'UPDATE availability SET count = %s WHERE '
             'item_id = %s', (HOT_STOCK, item))
    say('  baseline: the same transaction from 8 psycopg2 threads')
    code, out, base_cpu = ctx.procs.run(
        [PY, os.path.join(HERE, 'baseline_pg.py'), '--db', url, '--item',
         str(item), '--product', str(product), '--threads', '8',
         '--duration', str(s.wrk_seconds)], 'baseline-pg',
        s.wrk_seconds + 60)
    if code != 0:
        raise RuntimeError(f'baseline_pg failed: {out[-2000:]}')
    base = json.loads(out.strip().splitlines()[-1])
    base['cpu'] = base_cpu
    orders = pg_query(psycopg2, url, 'SELECT count(*) FROM orders')[0][0]
    say(f'  baseline-pg: {base["tx"]} transactions in '
        f'{base["seconds"]:.1f} s = {base["tx_per_s"]:,.0f}/s ({orders} '
        f'order rows); its CPU {base_cpu:.1f} s')
    # The node, on fresh tables again.
    pg_seed(ctx, url)
    proc, port = start_node(ctx, 'node-pg', url)
    try:
        _, hot = hot_item(port)
        result = wrk(ctx, 'wrk-purchase-pg', f'http://127.0.0.1:{port}'
                     '/api/purchase', 'purchase.lua', {'ITEM_ID': str(hot)},
                     server=proc)
        time.sleep(0.5)
        result['sold'] = HOT_STOCK - item_counts(port)[hot]
        hub_stall(ctx, port, 'purchases_pg', result)
    finally:
        ctx.procs.stop(proc)
    result['orders'] = pg_query(psycopg2, url, 'SELECT count(*) FROM orders '
                                'WHERE item_id = %s', (hot,))[0][0]
    check_sold(ctx, 'purchases_pg', result)
    ctx.results['purchases_pg'] = {'sneakers23': result, 'baseline': base}
    ctx.row('purchases/s, one hot item, PostgreSQL vs psycopg2 x8',
            result['ok_per_s'], base['tx_per_s'], 'tx/s', '>= 1.0x',
            f'{result["client_cpu"]:.2f} s | ({base_cpu:.2f} s)',
            target_ratio=1.0)
    ctx.note('purchases_pg: client CPU of the baseline is the baseline '
             'process itself (it is both the client and the work); '
             'PostgreSQL\'s processes are not counted as other work')


# ---------------------------------------------------------------------------
# Replication
# ---------------------------------------------------------------------------

EVENT = re.compile(rb'event: stock_change\ndata: (\{[^\n]*\})\n\n')


def read_dump(path):
    """(arrival ns, item_id, level) of every stock_change in a dump."""
    with open(path, 'rb') as f:
        raw = f.read()
    data, ends, times, pos = bytearray(), [], [], 0
    while pos + 12 <= len(raw):
        stamp, length = struct.unpack_from('<QI', raw, pos)
        pos += 12
        data += raw[pos:pos + length]
        pos += length
        ends.append(len(data))
        times.append(stamp)
    events = []
    for match in EVENT.finditer(data):
        body = json.loads(match.group(1))
        arrived = times[bisect.bisect_left(ends, match.end())]
        events.append((arrived, body['item_id'], body['level']))
    return events


def match_events(changes, events):
    """Pair each event with its change, per item and in order.

    Every change makes exactly one event; when one is missing, the next
    change of the same level that was sent before the event arrived is
    taken. Returns (ms from each request sent to its event on the other
    node, ms from its answer to that event, changes unmatched, events
    unmatched).
    """
    by_item = {}
    for item, level, sent, _, answered in changes:
        by_item.setdefault(item, []).append((level, sent, answered))
    cursor = dict.fromkeys(by_item, 0)
    latencies, after_answer, extra = [], [], 0
    for arrived, item, level in events:
        todo, j = by_item.get(item, []), cursor.get(item, 0)
        while j < len(todo) and todo[j][0] != level:
            j += 1
        if j < len(todo) and todo[j][1] <= arrived:
            latencies.append((arrived - todo[j][1]) / 1e6)
            after_answer.append((arrived - todo[j][2]) / 1e6)
            cursor[item] = j + 1
        else:
            extra += 1
    return (latencies, after_answer, len(changes) - len(latencies),
            extra)


def percentile(values, p):
    """Nearest-rank percentile of `values` (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return None
    k = max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))
    return ordered[int(k)]


def wait_until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f'{what} after {timeout:.0f} s')


def bench_replication(ctx):
    s = ctx.settings
    say(f'replication: {s.repl_rate} changes/s on node a for '
        f'{s.repl_seconds:g} s, one SSE stream on node c')
    folder = os.path.join(ctx.workdir, 'cluster')
    os.makedirs(folder, exist_ok=True)
    ports = {n: (free_port(), free_port()) for n in 'ac'}
    config = os.path.join(folder, 'peers.toml')
    with open(config, 'w') as f:
        f.write('database = "sqlite:///cluster.db"\n')
        for n, (http, repl) in ports.items():
            f.write(f'\n[nodes.{n}]\nhttp = "127.0.0.1:{http}"\n'
                    f'replication = "tcp://127.0.0.1:{repl}"\n')
    db_url = f'sqlite:///{os.path.join(folder, "cluster.db")}'
    code, out, _ = ctx.procs.run([PY, NODE, 'seed', '--db', db_url],
                                 'seed-cluster', 120)
    if code != 0:
        raise RuntimeError(f'seeding the cluster failed: {out}')
    nodes = {}
    try:
        for n in 'ac':
            nodes[n] = ctx.procs.start(
                [PY, NODE, '--config', config, '--node', n], f'node-{n}',
                env=node_env())
        for n in 'ac':
            wait_ready(ctx.procs, nodes[n], ports[n][0])
            wait_fan_out(ports[n][0])
        a, c = ports['a'][0], ports['c'][0]
        wait_until(lambda: all(
            p['state'] == 'connected' for port in (a, c)
            for p in api(port, 'GET', '/healthz')[1]['peers'].values()),
            15, 'the two nodes do not hear each other')
        chosen = items_below(a, 149, s.repl_items)
        for product_id in {p for p, _, _ in chosen}:
            release(a, product_id)
        for _, item, count in chosen:
            restock_to(a, item, count, 149)
        ids = [i for _, i, _ in chosen]
        wait_until(lambda: all(item_counts(c)[i] == 149 for i in ids), 10,
                   'node c does not show the prepared counts')
        time.sleep(1.0)   # no stray event from the preparation
        result = tap_and_drive(ctx, a, c, ids)
        result['items_after_c'] = {i: item_counts(c)[i] for i in ids}
    finally:
        for proc in nodes.values():
            ctx.procs.stop(proc)
    ctx.results['replication'] = result
    if result['unmatched_changes'] or result['extra_events']:
        ctx.note(f'replication: {result["unmatched_changes"]} changes '
                 f'without their event on c, {result["extra_events"]} '
                 'events without a change')
    if result['bad_status']:
        ctx.note(f'replication: {result["bad_status"]} driver requests '
                 'did not answer 200/201')
    ctx.note(f'replication: {result["changes"]} changes on {len(ids)} '
             f'items at {result["rate"]:,.0f}/s achieved (planned '
             f'{s.repl_rate}/s); p50 {result["p50_ms"]:.2f} ms, max '
             f'{result["max_ms"]:.2f} ms; node a answered the requests '
             f'in p50 {result["answer_p50_ms"]:.2f} / p99 '
             f'{result["answer_p99_ms"]:.2f} ms, and c\'s event came '
             f'p50 {result["after_answer_p50_ms"]:.2f} / p99 '
             f'{result["after_answer_p99_ms"]:.2f} ms after that answer; '
             'driver CPU '
             f'{result["driver_cpu"]:.2f} s, tap CPU '
             f'{result["tap_cpu"]:.2f} s')
    ctx.row(f'replication a -> c SSE, {result["rate"]:,.0f} changes/s, '
            'p99', result['p99_ms'], None, 'ms', '<= 10 ms',
            cpu_text(result['driver_cpu'] + result['tap_cpu']),
            higher_is_better=False, target_value=10)
    ctx.row('  same, p50', result['p50_ms'], None, 'ms')
    ctx.row("  of which after a's answer (replication only), p99",
            result['after_answer_p99_ms'], None, 'ms')


def tap_and_drive(ctx, a, c, ids):
    """A one-stream C client on c records arrivals; drive changes on a."""
    s = ctx.settings
    dump = os.path.join(ctx.workdir, 'replication.dump')
    tap = ctx.procs.start([ctx.client(), '--port', str(c), '--streams',
                           '1', '--dump', dump], 'tap',
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        ready = tap.stdout.readline().decode()
        if 'connected=1' not in ready:
            raise RuntimeError(f'the SSE tap on c said {ready!r}')
        code, out, driver_cpu = ctx.procs.run(
            [PY, os.path.join(HERE, 'repl_driver.py'), '--port', str(a),
             '--items', ','.join(map(str, ids)), '--rate',
             str(s.repl_rate), '--duration', str(s.repl_seconds)],
            'driver', s.repl_seconds + 60, env=node_env())
        if code != 0:
            raise RuntimeError(f'the driver failed: {out[-2000:]}')
        time.sleep(1.0)   # the last events on their way to c
        tap.stdin.write(b'stop\n')
        tap.stdin.flush()
        tap.stdout.read()
        _, tap_cpu = ctx.procs.reap(tap, 30)
    finally:
        ctx.procs.stop(tap)
    changes = json.loads(out.strip().splitlines()[-1])['changes']
    events = read_dump(dump)
    latencies, after_answer, unmatched, extra = match_events(changes,
                                                             events)
    answer_ms = [(ch[4] - ch[2]) / 1e6 for ch in changes]
    span = (changes[-1][2] - changes[0][2]) / 1e9 if len(changes) > 1 \
        else 0
    return {
        'changes': len(changes), 'events': len(events),
        'rate': (len(changes) - 1) / span if span else 0,
        'planned_rate': s.repl_rate, 'items': ids,
        'bad_status': sum(1 for ch in changes if ch[3] not in (200, 201)),
        'unmatched_changes': unmatched, 'extra_events': extra,
        'p50_ms': percentile(latencies, 50),
        'p90_ms': percentile(latencies, 90),
        'p99_ms': percentile(latencies, 99),
        'max_ms': max(latencies, default=None),
        'answer_p50_ms': percentile(answer_ms, 50),
        'answer_p99_ms': percentile(answer_ms, 99),
        'after_answer_p50_ms': percentile(after_answer, 50),
        'after_answer_p99_ms': percentile(after_answer, 99),
        'driver_cpu': driver_cpu, 'tap_cpu': tap_cpu}


# ---------------------------------------------------------------------------
# Cold start
# ---------------------------------------------------------------------------

def write_catalogue(path, count):
    """A catalogue of `count` products x 13 sizes, half of them released."""
    sizes = [f'{n / 2:g}' for n in range(12, 25)]
    with open(path, 'w') as f:
        for n in range(count):
            f.write(f'[[products]]\nsku = "BENCH{n:05d}"\nbrand = "Bench"\n'
                    f'name = "Runner {n}"\ncolor = "black/white"\n'
                    f'price_cents = {9000 + n % 50 * 100}\n'
                    f'image = "shu6000.svg"\n'
                    f'released = {"true" if n % 2 else "false"}\n\n'
                    '[products.stock]\n')
            for k, size in enumerate(sizes):
                f.write(f'"{size}" = {(n * 37 + k * 101) % 900}\n')
            f.write('\n')


def bulk_seed(ctx, path, count):
    """Fallback when `seed` is too slow: its schema, rows by executemany."""
    tiny = os.path.join(ctx.workdir, 'tiny.toml')
    write_catalogue(tiny, 1)
    code, out, _ = ctx.procs.run([PY, NODE, 'seed', '--reset', '--db',
                                  f'sqlite:///{path}', '--catalog', tiny],
                                 'seed-tiny', 60)
    if code != 0:
        raise RuntimeError(f'seed of the schema failed: {out}')
    sizes = [f'{n / 2:g}' for n in range(12, 25)]
    with sqlite3.connect(path) as db:
        for table in ('availability', 'item', 'product'):
            db.execute(f'DELETE FROM {table}')
        db.executemany(
            'INSERT INTO product (id, sku, brand, name, color, price_cents,'
            ' image, position, released) VALUES (?,?,?,?,?,?,?,?,?)',
            [(n + 1, f'BENCH{n:05d}', 'Bench', f'Runner {n}', 'black/white',
              9000 + n % 50 * 100, 'shu6000.svg', n, n % 2)
             for n in range(count)])
        db.executemany(
            'INSERT INTO item (id, product_id, sku, size) VALUES (?,?,?,?)',
            [(n * 13 + k + 1, n + 1, f'BENCH{n:05d}-{size}', size)
             for n in range(count) for k, size in enumerate(sizes)])
        db.executemany(
            'INSERT INTO availability (item_id, count, version) '
            'VALUES (?,?,1)',
            [(n * 13 + k + 1, (n * 37 + k * 101) % 900)
             for n in range(count) for k in range(13)])


def bench_cold_start(ctx):
    s = ctx.settings
    say(f'cold_start: {s.cold_products:,} products x 13 sizes, from '
        'process start to the first /healthz 200')
    folder = os.path.join(ctx.workdir, 'cold')
    os.makedirs(folder, exist_ok=True)
    catalogue = os.path.join(folder, 'catalog.toml')
    path = os.path.join(folder, 'cold.db')
    write_catalogue(catalogue, s.cold_products)
    began = time.monotonic()
    try:
        code, out, _ = ctx.procs.run(
            [PY, NODE, 'seed', '--reset', '--db', f'sqlite:///{path}',
             '--catalog', catalogue], 'seed-cold', 150)
        if code != 0:
            raise RuntimeError(f'seed failed: {out}')
        how = 'seed'
    except TimeoutError:
        ctx.note('cold_start: `seed` took over 150 s; rows bulk-inserted '
                 'with sqlite3 instead')
        bulk_seed(ctx, path, s.cold_products)
        how = 'sqlite3 executemany'
    seed_s = time.monotonic() - began
    say(f'  seeded with {how} in {seed_s:.1f} s')
    starts = []
    for n in range(s.cold_starts):
        port = free_port()
        started = time.monotonic()
        proc = ctx.procs.start([PY, NODE, 'serve', '--db',
                                f'sqlite:///{path}', '--port', str(port)],
                               f'node-cold-{n}', env=node_env())
        try:
            ready = wait_ready(ctx.procs, proc, port, timeout=120)
            wait_fan_out(port)   # its memory counts too
            rss = rss_kb(proc.pid)
            _, health = api(port, 'GET', '/healthz')
        finally:
            ctx.procs.stop(proc)
        starts.append({'seconds': ready - started, 'rss_kb': rss,
                       'products': health.get('products')})
        say(f'  start {n + 1}: {ready - started:.2f} s, RSS '
            f'{rss / 1024:.0f} MB, {health.get("products")} products')
    seconds = statistics.median(x['seconds'] for x in starts)
    rss_mb = statistics.median(x['rss_kb'] for x in starts) / 1024
    ctx.results['cold_start'] = {'products': s.cold_products,
                                 'seed_seconds': seed_s, 'seeded_by': how,
                                 'starts': starts, 'median_s': seconds}
    if any(x['products'] != s.cold_products for x in starts):
        ctx.note('cold_start: the node did not load every product')
    ctx.row(f'cold start, {s.cold_products:,} products x 13 sizes '
            f'(median of {s.cold_starts})', seconds, None, 's', '<= 3 s',
            higher_is_better=False, target_value=3)
    ctx.row('  its RSS once ready', rss_mb, None, 'MB')


# ---------------------------------------------------------------------------
# A whole drop: watchers, buyers and fan-out at once
# ---------------------------------------------------------------------------

DROP_SIZES = [f'{n / 2:g}' for n in range(12, 25)]
KIND_RELEASED, KIND_STOCK = 1, 2
# Counts at which a level is first shown (level_of: < 150 low, < 500 medium)
LEVEL_AT = {'medium': 499, 'low': 149, 'out': 0}


def drop_catalogue(path, pairs):
    """The drop: one product (13 sizes x `pairs`, not released) and a
    second one nobody watches."""
    with open(path, 'w') as f:
        for n, sku in enumerate(('DROP23', 'OTHER23')):
            f.write(f'[[products]]\nsku = "{sku}"\nbrand = "Bench"\n'
                    f'name = "Drop {n}"\ncolor = "black"\n'
                    f'price_cents = 12000\nimage = "shu6000.svg"\n'
                    'released = false\n\n[products.stock]\n')
            for size in DROP_SIZES:
                f.write(f'"{size}" = {pairs}\n')
            f.write('\n')


def drop_client_binary(ctx):
    binary = os.path.join(RESULTS, 'drop_client')
    if not getattr(ctx, '_drop_client', None):
        os.makedirs(RESULTS, exist_ok=True)
        subprocess.run(['gcc', '-O2', '-Wall', '-o', binary,
                        os.path.join(HERE, 'drop_client.c')], check=True)
        ctx._drop_client = binary
    return binary


def peak_rss_kb(pid):
    return status_kb(pid, 'VmHWM')


def iso_at(wall_ns):
    moment = datetime.fromtimestamp(wall_ns / 1e9, UTC)
    return moment.isoformat(timespec='milliseconds').replace('+00:00', 'Z')


def share(total, parts, n):
    """Part n of `total` split over `parts` as evenly as whole numbers go
    (10,000 over 3 nodes: 3,334 + 3,333 + 3,333)."""
    return total // parts + (n < total % parts)


def drop_once(ctx, label, watchers, buyers, only_item=False, nodes=1):
    """One drop on fresh nodes (one on SQLite, or three of one peers.toml
    on PostgreSQL): `watchers` streams of the product, its release
    scheduled a few seconds ahead, `buyers` new shoppers from the moment
    the sizes appear (at once when there are no watchers) until every
    size is sold out; watchers and buyers split evenly over the nodes.
    Returns what was measured."""
    s = ctx.settings
    started, db = drop_nodes(ctx, label, nodes)
    clients = []
    try:
        product = products(started[0]['port'])[0]
        item_ids = [i['id'] for i in product['items']]
        for n, node in enumerate(started):
            clients.append(start_drop_client(
                ctx, label, node, product['id'], share(watchers, nodes, n),
                share(buyers, nodes, n),
                item_ids[:1] if only_item else item_ids))
        time.sleep(1.0)
        profiler = start_profile(ctx, label, started[0]['proc'])
        try:
            release_mono = schedule_drop(ctx, started[0]['port'],
                                         product['id'], watchers)
            for client in clients:
                client['proc'].stdin.write(b'go\n')
                client['proc'].stdin.flush()
            hub_lag, ticks, waits = watch_nodes(started, clients,
                                                release_mono)
            for client in clients:
                client['done'] = parse_fields(
                    client['proc'].stdout.readline().decode())
                _, client['cpu'] = ctx.procs.reap(client['proc'], 60)
        finally:
            for client in clients:
                ctx.procs.stop(client['proc'])
            profile = stop_profile(ctx, profiler)
        result = {'label': label, 'nodes': nodes, 'watchers': watchers,
                  'buyers': buyers,
                  'connected': sum(c['connected'] for c in clients),
                  'connect_failed': sum(c['failed'] for c in clients),
                  'client_cpu': sum(c['cpu'] for c in clients),
                  'hub_lag_ms': hub_lag,
                  'peak_rss_kb': max(peak_rss_kb(n['proc'].pid)
                                     for n in started),
                  'profile': profile}
        for client in clients:
            client['published'] = published_events(client['node']['port'])
        result.update(analyse_drop(clients, release_mono, db, s.drop_pairs))
        if result.get('sell_out_s') and result.get('buy_start_ns'):
            window = (result['buy_start_ns'],
                      result['buy_start_ns'] + result['sell_out_s'] * 1e9)
            result['busy_pct'] = busy_between(ticks, *window)
            result['waited_pct'] = waited_between(waits, *window)
        result['unequal_nodes'] = nodes_unequal(started, db)
    finally:
        for node in started:
            ctx.procs.stop(node['proc'])
    say(f'  {label}: ' + ', '.join(
        f'{k}={v:.1f}' if isinstance(v, float) else f'{k}={v}'
        for k, v in result.items() if not isinstance(v, (dict, list))))
    return result


def drop_nodes(ctx, label, nodes):
    """Seed the drop and start its nodes: ([{proc, port, name}], db),
    db being ('sqlite', path) or ('pg', url)."""
    catalogue = os.path.join(ctx.workdir, 'drop.toml')
    drop_catalogue(catalogue, ctx.settings.drop_pairs)
    if nodes == 1:
        path = os.path.join(ctx.workdir, f'{label}.db')
        db, seed = ('sqlite', path), ['--db', f'sqlite:///{path}']
    else:
        db, seed = ('pg', ctx.args.pg), ['--reset', '--db', ctx.args.pg]
    code, out, _ = ctx.procs.run([PY, NODE, 'seed', *seed, '--catalog',
                                  catalogue], f'seed-{label}', 120)
    if code != 0:
        raise RuntimeError(f'seed failed: {out}')
    if nodes == 1:
        proc, port = start_node(ctx, f'node-{label}',
                                f'sqlite:///{db[1]}')
        return [{'proc': proc, 'port': port, 'name': 'a'}], db
    return start_cluster(ctx, label, db[1], 'abc'[:nodes]), db


def start_cluster(ctx, label, url, names):
    """Nodes of one peers.toml on `url`, every one hearing the others."""
    ports = {n: (free_port(), free_port()) for n in names}
    config = os.path.join(ctx.workdir, f'{label}-peers.toml')
    with open(config, 'w') as f:
        f.write(f'database = "{url}"\n')
        for n, (http, repl) in ports.items():
            f.write(f'\n[nodes.{n}]\nhttp = "127.0.0.1:{http}"\n'
                    f'replication = "tcp://127.0.0.1:{repl}"\n')
    started = []
    for n in names:
        proc = ctx.procs.start([PY, NODE, '--config', config, '--node', n],
                               f'node-{label}-{n}', env=node_env())
        started.append({'proc': proc, 'port': ports[n][0], 'name': n})
    for node in started:
        wait_ready(ctx.procs, node['proc'], node['port'])
        wait_fan_out(node['port'])
    wait_until(lambda: all(
        p['state'] == 'connected' for node in started
        for p in api(node['port'], 'GET', '/healthz')[1]['peers'].values()),
        15, 'the nodes do not hear each other')
    return started


def start_drop_client(ctx, label, node, product_id, watchers, buyers,
                      item_ids):
    """drop_client.c on one node, its streams open: its record."""
    name = f'{label}-{node["name"]}'
    files = {k: os.path.join(ctx.workdir, f'{name}.{k}')
             for k in ('events', 'purchases', 'first')}
    cmd = [drop_client_binary(ctx), '--port', str(node['port']),
           '--streams', str(watchers),
           '--path', f'/events?products={product_id}',
           '--buyers', str(buyers), '--items', ','.join(map(str, item_ids)),
           '--buy-start', 'released' if watchers else 'go',
           '--timeout', '180', '--linger', '2',
           '--events', files['events'], '--purchases', files['purchases'],
           '--first', files['first']]
    proc = ctx.procs.start(
        cmd, f'drop-client-{name}', stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(os.path.join(ctx.workdir, f'{name}.log'), 'ab'))
    ready = proc.stdout.readline().decode()
    if not ready.startswith('ready'):
        raise RuntimeError(f'the drop client said {ready!r}')
    opened = parse_fields(ready)
    return {'proc': proc, 'node': node, 'files': files,
            'connected': int(opened['connected']),
            'failed': int(opened['failed'])}


def start_profile(ctx, label, proc):
    """py-spy sampling the node through the drop and the buyers alone
    (`--profile`), or None."""
    spy = os.path.join(ROOT, '.venv', 'bin', 'py-spy')
    if not ctx.args.profile or label not in ('drop', 'buyers-alone') \
            or not os.path.exists(spy):
        return None
    out = os.path.join(RESULTS, f'{label}-profile.txt')
    return ctx.procs.start([spy, 'record', '--pid', str(proc.pid),
                            '--rate', '200', '--threads', '--subprocesses',
                            '--nonblocking',
                            '--format', 'raw', '--output', out],
                           'py-spy'), out


def stop_profile(ctx, profiler):
    """Where the node's time went: the top leaf functions, in % of
    samples (idle waits excluded), from py-spy's folded stacks."""
    if not profiler:
        return None
    proc, out = profiler
    proc.send_signal(signal.SIGINT)
    ctx.procs.reap(proc, 30)
    leaves, total = {}, 0
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(' ')
            leaf = stack.rsplit(';', 1)[-1]
            if any(idle in leaf for idle in ('epoll_wait', 'wait (thread',
                                              '(gevent/_gevent_c_hub')):
                continue
            leaves[leaf] = leaves.get(leaf, 0) + int(count)
            total += int(count)
    top = sorted(leaves.items(), key=lambda kv: -kv[1])[:15]
    return {'samples': total, 'file': os.path.relpath(out, ROOT),
            'top': [(leaf, round(100 * n / total, 1)) for leaf, n in top]}


def schedule_drop(ctx, port, product_id, watchers):
    """Schedule the release DROP_LEAD s ahead (with watchers: the page's
    moment), or release now; the moment on CLOCK_MONOTONIC (ns)."""
    if not watchers:
        release(port, product_id)
        return time.monotonic_ns()
    wall = (time.time_ns() + int(ctx.settings.drop_lead * 1e9)) \
        // 1_000_000 * 1_000_000
    offset = time.time_ns() - time.monotonic_ns()
    status, answer = api(port, 'POST',
                         f'/admin/api/products/{product_id}/schedule',
                         {'at': iso_at(wall)}, admin=True)
    if status != 200:
        raise RuntimeError(f'schedule: {status} {answer}')
    return wall - offset


def watch_nodes(started, clients, release_mono):
    """While the drop runs: (the worst hub lag any node reports (ms),
    samples of the machine's CPU ticks, samples of how long each node's
    main thread has waited for a core).

    Each node's worst lateness over the last second, polled every
    0.25 s from one second after the release until the clients are done,
    and once more then: every moment of the drop is covered, and none of
    the seconds before it (10,000 watchers connecting are not the drop).
    The samples are taken every 0.25 s all along.
    """
    worst, done, ticks, waits = 0.0, False, [], []
    pids = [node['proc'].pid for node in started]
    while not done:
        ticks.append((time.monotonic_ns(), *cpu_busy_ticks()))
        waits.append((time.monotonic_ns(), run_queue_ns(pids)))
        waiting = [c['proc'].stdout for c in clients if 'said' not in c]
        for ready in select.select(waiting, [], [], 0.25)[0]:
            next(c for c in clients if c['proc'].stdout is ready)['said'] = 1
        # Readable: a client's last line, or EOF if it died. Not poll():
        # that would reap it, and its CPU time with it (wait4 below).
        done = all('said' in c for c in clients)
        if not done and time.monotonic_ns() < release_mono + 1_000_000_000:
            continue
        for node in started:
            try:
                _, health = api(node['port'], 'GET', '/healthz')
                worst = max(worst, health['hub_lag_ms']['max_1s'])
            except (OSError, KeyError, ValueError):
                pass
    return worst, ticks, waits


def published_events(port):
    """{event name: count} the node published (GET /metrics)."""
    conn = socket.create_connection(('127.0.0.1', port), timeout=10)
    try:
        conn.sendall(f'GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: '
                     f'Bearer {TOKEN}\r\nConnection: close\r\n\r\n'.encode())
        raw = b''
        while chunk := conn.recv(65536):
            raw += chunk
    finally:
        conn.close()
    text = raw.decode(errors='replace')
    return {name: float(count) for name, count in re.findall(
        r'sneakers23_sse_events_total\{event="(\w+)"\} ([0-9.e+]+)', text)}


def read_records(path, fmt):
    size = struct.calcsize(fmt)
    with open(path, 'rb') as f:
        raw = f.read()
    return list(struct.iter_unpack(fmt, raw[:len(raw) // size * size]))


def wall_ns(moment):
    """A database's timestamp of an order (UTC, as the node stored it:
    text in SQLite) in wall-clock ns."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return int(moment.replace(tzinfo=UTC).timestamp() * 1e9)


def drop_rows(db, sql):
    """Rows of a query on the drop's database (SQLite or PostgreSQL)."""
    kind, where = db
    if kind == 'sqlite':
        with sqlite3.connect(where) as conn:
            return conn.execute(sql).fetchall()
    import psycopg2
    return pg_query(psycopg2, where, sql)


def nodes_unequal(started, db):
    """Nodes whose counts differ from the database's, 2 s after the end."""
    truth = dict(drop_rows(db, 'SELECT item_id, count FROM availability'))
    deadline, unequal = time.monotonic() + 2, []
    while time.monotonic() < deadline:
        unequal = [n['name'] for n in started
                   if item_counts(n['port']) != truth]
        if not unequal:
            break
        time.sleep(0.1)
    return unequal


def analyse_drop(clients, release_mono, db, pairs):
    """The drop's figures from the clients' records and the database."""
    orders, sold = {}, {}
    offset = time.time_ns() - time.monotonic_ns()
    for order_id, item_id, node, created in drop_rows(
            db, 'SELECT id, item_id, node, created_at FROM orders '
                'ORDER BY id'):
        orders.setdefault(item_id, []).append((order_id, node))
        sold[order_id] = wall_ns(created) - offset
    purchases = [p for c in clients
                 for p in read_records(c['files']['purchases'], '<qiqqq')]
    sent = {order: t for _, status, t, _, order in purchases
            if status == 201}
    answered = {order: t for _, status, _, t, order in purchases
                if status == 201}
    released, after_sale, after_request, after_answer = [], [], [], []
    cross, per_event = [], []
    out = {'stock_events': 0, 'stock_missed': 0, 'stock_expected': 0}
    starts = [int(c['done']['buy_start_ns']) for c in clients
              if int(c['done'].get('buy_start_ns', 0))]
    start = min(starts) if starts else 0
    for client in clients:
        name = client['node']['name']
        first = read_first(client['files']['first'])
        stock = {}
        for _, kind, seq, t in read_records(client['files']['events'],
                                            '<IBqq'):
            if kind == KIND_RELEASED:
                released.append((t - release_mono) / 1e6)
            elif kind == KIND_STOCK:
                stock.setdefault(seq, []).append(t)
        published = int(client['published'].get('stock_change', 0))
        out['stock_events'] += published
        out['stock_expected'] += published * client['connected']
        out['stock_missed'] += (published * client['connected']
                                - sum(len(ts) for ts in stock.values()))
        for seq, times in sorted(stock.items()):
            cause, node = causing_order(first.get(seq), orders, pairs)
            if cause not in sent:
                continue
            late = [(t - sold[cause]) / 1e6 for t in times]
            after_sale += late
            after_request += [(t - sent[cause]) / 1e6 for t in times]
            after_answer += [(t - answered[cause]) / 1e6 for t in times]
            if node != name:
                cross += late
            per_event.append({
                'node': name, 'seq': seq, 'event': first.get(seq),
                'sold_on': node, 'sent': (sent[cause] - start) / 1e6,
                'sold': (sold[cause] - start) / 1e6,
                'answered': (answered[cause] - start) / 1e6,
                'first': (min(times) - start) / 1e6,
                'last': (max(times) - start) / 1e6})
    out['release_received'] = len(released)
    if released:
        out.update(release_p50_ms=percentile(released, 50),
                   release_p99_ms=percentile(released, 99),
                   release_last_ms=max(released))
    if after_sale:
        out.update(stock_p50_ms=percentile(after_sale, 50),
                   stock_p99_ms=percentile(after_sale, 99),
                   stock_from_request_p50_ms=percentile(after_request, 50),
                   stock_from_request_p99_ms=percentile(after_request, 99),
                   stock_after_answer_p99_ms=percentile(after_answer, 99),
                   stock_measured=len(after_sale))
    if cross:
        out.update(cross_p50_ms=percentile(cross, 50),
                   cross_p99_ms=percentile(cross, 99),
                   cross_measured=len(cross))
    out['per_event'] = per_event
    out['orders'] = drop_rows(db, 'SELECT count(*) FROM orders')[0][0]
    out['left'] = drop_rows(
        db, 'SELECT sum(a.count) FROM availability a JOIN item i ON '
            'i.id = a.item_id WHERE i.product_id = 1')[0][0]
    out.update(purchase_figures(purchases, start))
    out['buy_start_ns'] = start
    return out


def read_first(path):
    """{seq: data} of stream 0's events."""
    first = {}
    with open(path) as f:
        for line in f:
            seq, _, data = line.rstrip('\n').split('\t', 2)
            first[int(seq)] = data
    return first


def causing_order(data, orders, pairs):
    """(order id, node) of the sale that took an item to the level a
    stock_change shows: the k-th order of the item leaves `pairs - k`."""
    try:
        event = json.loads(data or '')
    except ValueError:
        return None, None
    threshold = LEVEL_AT.get(event.get('level'))
    item_orders = orders.get(event.get('item_id'), [])
    k = pairs - threshold if threshold is not None else None
    if k is None or not 0 < k <= len(item_orders):
        return None, None
    return item_orders[k - 1]


def purchase_figures(purchases, start):
    """Sell-out time, rate and latency of the buyers (from `start`, ns)."""
    if not purchases:
        return {}
    sold = [ans for _, status, _, ans, _ in purchases if status == 201]
    seconds = (max(sold) - start) / 1e9 if sold else None
    lat = [(ans - sent) / 1e6 for _, _, sent, ans, _ in purchases]
    statuses = {}
    for _, status, _, _, _ in purchases:
        statuses[status] = statuses.get(status, 0) + 1
    return {'sold': len(sold), 'sell_out_s': seconds,
            'purchases_per_s': len(sold) / seconds if seconds else None,
            'purchase_p50_ms': percentile(lat, 50),
            'purchase_p99_ms': percentile(lat, 99),
            'answers': statuses}


def bench_drop(ctx):
    s, nodes = ctx.settings, ctx.args.nodes
    n = f'{s.drop_streams:,}'
    pairs = s.drop_pairs * len(DROP_SIZES)
    where = ('one SQLite node' if nodes == 1
             else f'{nodes} nodes on PostgreSQL ({ctx.args.pg})')
    say(f'drop: {n} watchers, {pairs:,} pairs, {s.drop_buyers} buyers on '
        f'{where}; each part alone first')
    if nodes > 1 and not pg_ready(ctx):
        return
    ctx.monitor.ignore = {'postgres'} if nodes > 1 else set()
    try:
        alone_watch = drop_once(ctx, 'watchers-alone', s.drop_streams,
                                nodes, only_item=True, nodes=nodes)
        alone_buy = drop_once(ctx, 'buyers-alone', 0, s.drop_buyers,
                              nodes=nodes)
        drop = drop_once(ctx, 'drop', s.drop_streams, s.drop_buyers,
                         nodes=nodes)
    finally:
        ctx.monitor.ignore = set()
    if nodes > 1:
        n = f'{n} ({nodes} nodes)'
        ctx.row(f'drop: stock_change sold on another node -> {n} '
                'watchers, p99', drop.get('cross_p99_ms'),
                alone_watch.get('cross_p99_ms'), 'ms')
    for r in (alone_watch, alone_buy, drop):
        if r['unequal_nodes']:
            ctx.note(f'drop {r["label"]}: nodes {r["unequal_nodes"]} not '
                     'equal to the database 2 s after the end')
        elif nodes > 1:
            ctx.note(f'drop {r["label"]}: every node equal to the database '
                     'at the end')
    ctx.results[f'drop_{nodes}'] = {'watchers_alone': alone_watch,
                           'buyers_alone': alone_buy, 'drop': drop}
    ctx.row(f'drop: release -> {n} watchers, p50', drop.get(
        'release_p50_ms'), alone_watch.get('release_p50_ms'), 'ms')
    ctx.row(f'drop: release -> {n} watchers, p99', drop.get(
        'release_p99_ms'), alone_watch.get('release_p99_ms'), 'ms',
        '<= 150 ms', higher_is_better=False, target_value=150)
    ctx.row(f'drop: release -> last of {n} watchers', drop.get(
        'release_last_ms'), alone_watch.get('release_last_ms'), 'ms')
    ctx.row(f'drop: stock_change sale -> {n} watchers, p50', drop.get(
        'stock_p50_ms'), alone_watch.get('stock_p50_ms'), 'ms')
    ctx.row(f'drop: stock_change sale -> {n} watchers, p99', drop.get(
        'stock_p99_ms'), alone_watch.get('stock_p99_ms'), 'ms',
        '<= 200 ms', higher_is_better=False, target_value=200)
    ctx.row(f'drop: stock_change purchase request -> {n} watchers, p99',
            drop.get('stock_from_request_p99_ms'),
            alone_watch.get('stock_from_request_p99_ms'), 'ms')
    ctx.row('drop: stock_change deliveries missed', drop['stock_missed'],
            alone_watch['stock_missed'], 'count', '0',
            higher_is_better=False, target_value=0)
    ctx.row(f'drop: {pairs:,} pairs sold out in', drop.get('sell_out_s'),
            alone_buy.get('sell_out_s'), 's')
    ctx.row('drop: purchases/s', drop.get('purchases_per_s'),
            alone_buy.get('purchases_per_s'), '/s', '>= 0.7x',
            target_ratio=0.7)
    ctx.row('drop: purchase latency p50', drop.get('purchase_p50_ms'),
            alone_buy.get('purchase_p50_ms'), 'ms')
    ctx.row('drop: purchase latency p99', drop.get('purchase_p99_ms'),
            alone_buy.get('purchase_p99_ms'), 'ms', '<= 250 ms',
            higher_is_better=False, target_value=250)
    ctx.row('drop: worst hub lag', drop['hub_lag_ms'],
            alone_buy['hub_lag_ms'], 'ms', '<= 50 ms',
            higher_is_better=False, target_value=50)
    ctx.row('drop: machine CPU busy while selling (all processes)',
            drop.get('busy_pct'), alone_buy.get('busy_pct'), '%')
    ctx.row("drop: node's main thread waiting for a core while selling",
            drop.get('waited_pct'), alone_buy.get('waited_pct'), '%')
    ctx.row('drop: peak RSS of the node', drop['peak_rss_kb'] / 1024,
            alone_watch['peak_rss_kb'] / 1024, 'MB')
    for r in (alone_buy, drop):
        if r.get('profile'):
            ctx.note(f'drop {r["label"]}: where the node\'s time went '
                     f'(py-spy, {r["profile"]["samples"]} samples, '
                     f'{r["profile"]["file"]}): ' + '; '.join(
                         f'{share}% {leaf}' for leaf, share
                         in r['profile']['top']))
    if drop.get('stock_after_answer_p99_ms') is not None:
        ctx.note(f'drop: stock_change p99 from the causing purchase\'s 201 '
                 f'answer instead of the sale: '
                 f'{drop["stock_after_answer_p99_ms"]:.1f} ms (alone '
                 f'{alone_watch.get("stock_after_answer_p99_ms") or 0:.1f}'
                 ' ms; below 0: the watchers heard before the buyer)')
    expected = drop['stock_expected']
    if drop.get('stock_measured', 0) < expected - drop['stock_missed']:
        ctx.note(f'drop: {drop.get("stock_measured", 0)} of {expected} '
                 'stock_change deliveries could be tied to their sale')
    for r in (alone_buy, drop):
        if r.get('orders') != pairs or r.get('left') != 0 \
                or r.get('sold') != pairs:
            ctx.note(f'drop {r["label"]}: {r.get("sold")} answered 201, '
                     f'{r.get("orders")} orders, {r.get("left")} pairs left '
                     f'of {pairs}: NOT all sold exactly once')
        else:
            ctx.note(f'drop {r["label"]}: {pairs:,} pairs, {pairs:,} orders,'
                     f' 0 left, every 201 an order (no oversell); answers '
                     f'{r.get("answers")}')


# ---------------------------------------------------------------------------
# How cost grows with the crowd: the scaling curve
# ---------------------------------------------------------------------------

CURVE_STREAMS = (1000, 2500, 5000, 10_000, 15_000)
CURVE_BUYERS = (50, 200, 500, 1000)


def pg_ready(ctx):
    """The benchmark's PostgreSQL database exists and nobody uses it."""
    try:
        import psycopg2
        pg_ensure_database(psycopg2, ctx.args.pg)
        deadline = time.monotonic() + ctx.settings.pg_wait
        while (others := pg_others(psycopg2, ctx.args.pg)) \
                and not ctx.args.force_pg:
            if time.monotonic() > deadline:
                ctx.note(f'drop skipped: {others} other sessions use '
                         f'{ctx.args.pg}; --force-pg to run anyway')
                return False
            time.sleep(1)
    except (ImportError, OSError) as e:
        ctx.note(f'drop skipped: PostgreSQL: {e}')
        return False
    except Exception as e:   # psycopg2.OperationalError
        ctx.note(f'drop skipped: cannot reach {ctx.args.pg}: '
                 f'{str(e).strip().splitlines()[0]}')
        return False
    return True


def bench_curve(ctx):
    """Fan-out p99 and memory per stream at 1k..15k streams; purchases/s
    at 50..1,000 buyers; drawn as a PNG (matplotlib, bench only)."""
    s = ctx.settings
    streams = [n for n in CURVE_STREAMS if n <= s.curve_max_streams]
    say(f'curve: fan-out at {streams} streams, purchases at '
        f'{list(CURVE_BUYERS)} buyers')
    fan = [curve_fan_out(ctx, n) for n in streams]
    buys = [curve_purchases(ctx, n) for n in CURVE_BUYERS]
    ctx.results['curve'] = {'fan_out': fan, 'purchases': buys}
    for point in fan:
        ctx.row(f'curve: stock_change to {point["streams"]:,} streams, '
                'p99', point['p99_ms'], None, 'ms')
        ctx.row(f'curve: memory per stream at {point["streams"]:,}',
                point['kb_per_stream'], None, 'KB')
    for point in buys:
        ctx.row(f'curve: purchases/s with {point["buyers"]:,} buyers',
                point['ok_per_s'], None, '/s')
    png = draw_curve(ctx.args.png, fan, buys)
    if png:
        ctx.note(f'curve: drawn in {os.path.relpath(png, ROOT)}')


def curve_fan_out(ctx, streams):
    """One node, `streams` streams, 3 stock_change rounds."""
    saved = ctx.settings.streams
    ctx.settings.streams = streams
    path = os.path.join(ctx.workdir, f'curve-{streams}.db')
    proc, port = start_node(ctx, f'node-curve-{streams}',
                            f'sqlite:///{path}')
    try:
        chosen = items_below(port, 150, 3)
        for product_id in {p for p, _, _ in chosen}:
            release(port, product_id)
        for _, item, count in chosen:
            restock_to(port, item, count, 150)
        result = fan_out(ctx, f'curve-{streams}', proc, port,
                         [i for _, i, _ in chosen])
    finally:
        ctx.procs.stop(proc)
        ctx.settings.streams = saved
    return {'streams': streams, 'p50_ms': result['p50_ms'],
            'p99_ms': result['p99_ms'], 'max_ms': result['max_ms'],
            'kb_per_stream': result['kb_per_stream'],
            'received': result['received'], 'expected': result['expected']}


def curve_purchases(ctx, buyers):
    """wrk with `buyers` connections on one hot item, new shoppers."""
    node = ctx.sqlite_node()
    _, item = hot_item(node['port'])
    saved = ctx.settings.wrk_conns, ctx.settings.wrk_seconds
    ctx.settings.wrk_conns, ctx.settings.wrk_seconds = buyers, 5
    try:
        result = wrk(ctx, f'wrk-curve-{buyers}',
                     f'http://127.0.0.1:{node["port"]}/api/purchase',
                     'purchase.lua', {'ITEM_ID': str(item)},
                     server=node['proc'])
    finally:
        ctx.settings.wrk_conns, ctx.settings.wrk_seconds = saved
    return {'buyers': buyers, 'ok_per_s': result['ok_per_s'],
            'p99_ms': result['p99_us'] / 1000}


def draw_curve(path, fan, buys):
    """The PNG of the curve; None (and a note why) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        say('  curve: matplotlib is missing (pip install -r '
            'bench/requirements.txt): no PNG')
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [p['streams'] for p in fan]
    left.plot(xs, [p['p99_ms'] for p in fan], 'o-', color='#ff4f1f',
              label='fan-out p99 (ms)')
    left.plot(xs, [p['p50_ms'] for p in fan], 'o--', color='#ff4f1f',
              alpha=.5, label='fan-out p50 (ms)')
    left.axhline(100, color='#888', lw=1, ls=':', label='target p99 100 ms')
    left.set_xlabel('open SSE streams')
    left.set_ylabel('ms from the purchase to each stream')
    memory = left.twinx()
    growth = [p['kb_per_stream'] * p['streams'] / 1024 for p in fan]
    memory.plot(xs, growth, 's-', color='#2563eb',
                label='RSS growth, node + worker (MB)')
    memory.set_ylabel('MB more, node + fan-out worker',
                      color='#2563eb')
    memory.set_ylim(0, max(growth) * 2.2)
    left.set_ylim(0, max(120, max(p['p99_ms'] for p in fan) * 1.3))
    lines = left.get_lines() + memory.get_lines()
    left.legend(lines, [line.get_label() for line in lines],
                loc='upper left', fontsize=8, ncols=2)
    left.set_title('One stock_change to every stream')
    right.plot([p['buyers'] for p in buys], [p['ok_per_s'] for p in buys],
               'o-', color='#15803d')
    right.set_xlabel('concurrent buyers (new shopper per request)')
    right.set_ylabel('purchases per second')
    right.set_ylim(bottom=0)
    right.set_title('Purchases of one item, SQLite')
    figure.suptitle('sneakers23 on one node: cost as the crowd grows',
                    fontsize=11)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def machine():
    model = ''
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                            cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(['git', 'status', '--porcelain', '--',
                            'sneakers23.py'], cwd=ROOT,
                           capture_output=True, text=True)
    wrk_version = subprocess.run(['wrk', '-v'], capture_output=True,
                                 text=True).stdout.split('\n')[0]
    return {
        'date': datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC'),
        'nproc': len(os.sched_getaffinity(0)), 'cpu': model,
        'python': platform.python_version(),
        'kernel': platform.release(),
        'commit': commit.stdout.strip() + (' (sneakers23.py modified)'
                                           if dirty.stdout.strip() else ''),
        'wrk': wrk_version.split(' Copyright')[0],
        'loadavg': loadavg(), 'pressure_avg10': pressure(),
        'busy_before': round(cpu_busy(), 3)}


def loadavg():
    with open('/proc/loadavg') as f:
        return f.read().split()[:3]


def fmt(value, unit):
    if value is None:
        return '-'
    if unit == 'ms' and value < 10:
        return f'{value:.2f} ms'
    if unit in ('ms', 'KB', 'MB'):
        return f'{value:,.1f} {unit}'
    if unit == 's':
        return f'{value:.2f} s'
    if unit == 'count':
        return f'{value:,.0f}'
    if unit == '%':
        return f'{value:.0f}%'
    return f'{value:,.0f}/s'


def table(rows):
    head = ('figure', 'sneakers23', 'baseline', 'ratio', 'target',
            'client CPU')
    lines = [head]
    for r in rows:
        ratio = f'{r["ratio"]:.2f}x' if r['ratio'] is not None else '-'
        if (r['unit'] == '%' and r['sneakers23'] is not None
                and r['baseline'] is not None):
            ratio = f'{r["sneakers23"] - r["baseline"]:+.0f} pts'
        target = r['target'] or '-'
        if r['target_met']:
            target += f' ({r["target_met"]})'
        lines.append((r['figure'], fmt(r['sneakers23'], r['unit']),
                      fmt(r['baseline'], r['unit']), ratio, target,
                      r['client_cpu'] or '-'))
    widths = [max(len(line[k]) for line in lines) for k in range(6)]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [
            line[k].rjust(widths[k]) if k < 4 else line[k].ljust(widths[k])
            for k in range(1, 6)]
        out.append(' | '.join(cells).rstrip())
        if n == 0:
            out.append('-+-'.join('-' * w for w in widths))
    return '\n'.join(out)


BENCHES = {'sse': bench_sse, 'purchases_sqlite': bench_purchases_sqlite,
           'sold_out': bench_sold_out, 'reads': bench_reads,
           'purchases_pg': bench_purchases_pg,
           'replication': bench_replication, 'cold_start': bench_cold_start,
           'drop': bench_drop, 'curve': bench_curve}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description='sneakers23 benchmarks, each beside its baseline')
    parser.add_argument('names', nargs='*', metavar='NAME',
                        help=f'benchmarks to run (default all): '
                             f'{", ".join(NAMES)}')
    parser.add_argument('--quick', action='store_true',
                        help='a small run to smoke-test the harness')
    parser.add_argument('--streams', type=int,
                        help='SSE streams (default 10,000; quick 1,000)')
    parser.add_argument('--pg', default=PG_URL,
                        help=f'PostgreSQL for purchases_pg (its sneakers23 '
                             f'tables are dropped!) default {PG_URL}')
    parser.add_argument('--force-pg', action='store_true',
                        help='run purchases_pg even when other sessions '
                             'use that database')
    parser.add_argument('--wait-quiet', type=float, default=30,
                        metavar='S',
                        help='before each benchmark, wait up to S seconds '
                             'for the CPUs to be idle (default 30)')
    parser.add_argument('--nodes', type=int, choices=(1, 3), default=1,
                        help='drop: on one SQLite node (default) or three '
                             'nodes of one peers.toml on PostgreSQL (--pg)')
    parser.add_argument('--profile', action='store_true',
                        help='drop: sample the node with py-spy during the '
                             'drop and print where its time went')
    parser.add_argument('--png', default=os.path.join(RESULTS, 'scaling.png'),
                        help='where `curve` draws its PNG')
    parser.add_argument('--json', default=os.path.join(RESULTS,
                                                       'latest.json'),
                        help='where to write the results')
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        parser.error(f'unknown benchmark {", ".join(unknown)}; choose '
                     f'from {", ".join(NAMES)}')
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = QUICK if args.quick else Settings()
    if args.streams:
        settings.streams = args.streams
    names = [n for n in NAMES if n in (args.names or NAMES)]
    missing = [tool for tool in ('wrk', 'gcc') if not shutil.which(tool)]
    if missing:
        print(f'bench: {" and ".join(missing)} missing: '
              f'apt-get install {" ".join(missing)}', file=sys.stderr)
        return 2
    info = machine()
    print(f'sneakers23 benchmarks{" (quick)" if args.quick else ""} - '
          f'{info["date"]}\nmachine: {info["nproc"]} CPUs, {info["cpu"]}, '
          f'Linux {info["kernel"]}, Python {info["python"]}, '
          f'{info["wrk"]}\nsneakers23 at {info["commit"]}; at start: '
          f'load average {" ".join(info["loadavg"])}, CPUs '
          f'{info["busy_before"]:.0%} busy, pressure (avg10 %) '
          f'{info["pressure_avg10"]}', flush=True)
    workdir = tempfile.mkdtemp(prefix='sneakers23-bench-')
    ctx = Context(settings, args, workdir)
    errors = {}
    began = time.monotonic()
    foreign = ctx.monitor = ForeignCpu(ctx.procs)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))
    try:
        for name in names:
            if name not in SQLITE_GROUP:
                ctx.stop_sqlite_node()
            wait_quiet(ctx, name)
            t0, foreign0 = time.monotonic(), foreign.total
            ticks0 = cpu_ticks()
            try:
                BENCHES[name](ctx)
            except Exception as e:
                errors[name] = f'{type(e).__name__}: {e}'
                say(f'{name} FAILED: {errors[name]}')
                traceback.print_exc()
                ctx.procs.stop_all()
                ctx.sqlite = None
            took = time.monotonic() - t0
            other = foreign.total - foreign0
            ticks1 = cpu_ticks()
            steal = (ticks1[7] - ticks0[7]) / max(
                1, sum(ticks1) - sum(ticks0))
            ctx.foreign[name] = {'seconds': round(took, 1),
                                 'others_cpu_s': round(other, 2),
                                 'steal': round(steal, 3)}
            share = other / (took * info['nproc'])
            say(f'  ({name}: {took:.0f} s; other processes used '
                f'{other:.1f} CPU-s = {share:.0%} of the machine; '
                f'hypervisor steal {steal:.0%})')
            if share > 0.05:
                ctx.note(f'{name}: other processes used {other:.1f} CPU-s '
                         f'({share:.0%} of the machine) while it ran')
            if steal > 0.05:
                ctx.note(f'{name}: the hypervisor took {steal:.0%} of the '
                         'CPU time (steal) while it ran')
    finally:
        foreign.stop()
        ctx.procs.stop_all()
    elapsed = time.monotonic() - began
    print()
    print(table(ctx.rows))
    print()
    print('client CPU: user+system seconds of the load generator (wrk, the '
          'C SSE client,\nthe replication driver + tap) in the sneakers23 '
          'run | in the baseline run.')
    for text in ctx.notes:
        print(f'- {text}')
    for name, error in errors.items():
        print(f'- {name} FAILED: {error}')
    print(f'done in {elapsed:.0f} s; load average '
          f'{" ".join(loadavg())} at the end')
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
        json.dump({'machine': info, 'quick': args.quick,
                   'settings': vars(settings), 'rows': ctx.rows,
                   'notes': ctx.notes, 'errors': errors,
                   'busy_before': ctx.busy,
                   'other_processes': ctx.foreign,
                   'results': ctx.results, 'seconds': elapsed}, f,
                  indent=2, default=str)
    print(f'results written to {os.path.relpath(args.json, ROOT)}')
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
