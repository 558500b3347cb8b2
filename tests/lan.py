"""A small LAN of "laptops" on this machine, for tests/test_lan.py.

One network namespace per host, each joined by a veth pair to a bridge
that lives in a namespace of its own (the switch). Addresses are
10.23.0.0/24 and exist only inside those namespaces: nothing here touches
the machine's own network. Pulling a host's cable is taking its port on the
switch down: the host sees its link lose carrier, as on a real switch.

Every namespace is named `s23t<pid>-<host>`, so a crashed run's leftovers
are recognised (their pid is gone) and removed by the next run.
"""

import itertools
import json
import os
import re
import subprocess
import sys

import gevent
import gevent.event

SUBNET = '10.23.0'
AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     'lan_agent.py')


def ip(*args, check=True):
    return subprocess.run(['ip', *args], check=check, capture_output=True,
                          text=True, timeout=30)


def can_make_namespaces():
    """'' when this machine lets us build a LAN, else why not."""
    if os.geteuid() != 0:
        return 'network namespaces need root'
    probe = f's23t{os.getpid()}-probe'
    try:
        made = ip('netns', 'add', probe, check=False)
    except FileNotFoundError:
        return 'the ip command (iproute2) is missing'
    if made.returncode != 0:
        return f'ip netns add failed: {made.stderr.strip()}'
    ip('netns', 'del', probe, check=False)
    return ''


def remove_leftovers():
    """Namespaces of earlier runs whose process is gone."""
    listed = ip('netns', 'list', check=False).stdout.split('\n')
    for line in listed:
        match = re.match(r'(s23t(\d+)-\S+)', line)
        if match and not os.path.exists(f'/proc/{match[2]}'):
            ip('netns', 'del', match[1], check=False)


class Lan:
    """Hosts on one switch: `address(host)`, `run(host, cmd)`,
    `cut(host)` / `mend(host)`, `close()`."""

    def __init__(self, hosts):
        remove_leftovers()
        self.tag = f's23t{os.getpid()}'
        self.switch = f'{self.tag}-sw'
        self.hosts = {}
        ip('netns', 'add', self.switch)
        ip('-n', self.switch, 'link', 'add', 'br0', 'type', 'bridge')
        ip('-n', self.switch, 'link', 'set', 'br0', 'up')
        for number, host in enumerate(hosts, 10):
            self._plug(host, number)

    def _plug(self, host, number):
        ns, port = f'{self.tag}-{host}', f'p{number}'
        ip('netns', 'add', ns)
        ip('-n', ns, 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name',
           port, 'netns', self.switch)
        ip('-n', ns, 'addr', 'add', f'{SUBNET}.{number}/24', 'dev', 'eth0')
        for link in ('lo', 'eth0'):
            ip('-n', ns, 'link', 'set', link, 'up')
        ip('-n', self.switch, 'link', 'set', port, 'master', 'br0')
        ip('-n', self.switch, 'link', 'set', port, 'up')
        self.hosts[host] = (ns, port, f'{SUBNET}.{number}')

    def namespace(self, host):
        return self.hosts[host][0]

    def address(self, host):
        return self.hosts[host][2]

    def prefix(self, host):
        """The command prefix that runs a program on `host`."""
        return ['ip', 'netns', 'exec', self.namespace(host)]

    def cut(self, host):
        """Pull the host's cable (its switch port goes down)."""
        ip('-n', self.switch, 'link', 'set', self.hosts[host][1], 'down')

    def mend(self, host):
        ip('-n', self.switch, 'link', 'set', self.hosts[host][1], 'up')

    def close(self):
        for ns, _, _ in self.hosts.values():
            ip('netns', 'del', ns, check=False)
        ip('netns', 'del', self.switch, check=False)


class Agent:
    """tests/lan_agent.py on one host: HTTP and SSE from inside its
    namespace, driven over its stdin/stdout."""

    def __init__(self, lan, host):
        self.proc = subprocess.Popen(
            [*lan.prefix(host), sys.executable, AGENT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ids = itertools.count(1)
        self.waiting = {0: gevent.event.AsyncResult()}
        self.reader = gevent.spawn(self._read)
        self.waiting[0].get(timeout=30)

    def _read(self):
        for line in self.proc.stdout:
            message = json.loads(line)
            waiter = self.waiting.pop(message['id'], None)
            if waiter is not None:
                waiter.set(message)

    def ask(self, wait=60, **request):
        """Send one request to the agent; its answer (`wait` s at most)."""
        request['id'] = next(self.ids)
        waiter = self.waiting[request['id']] = gevent.event.AsyncResult()
        self.proc.stdin.write(json.dumps(request) + '\n')
        self.proc.stdin.flush()
        return waiter.get(timeout=wait)

    def http(self, method, url, body=None, headers=None, timeout=10):
        """One HTTP request from the agent's host; status 0 when no
        answer came within `timeout`."""
        return self.ask(wait=timeout + 30, op='http', method=method,
                        url=url, body=body, headers=headers,
                        timeout=timeout)

    def sse(self, url):
        return self.ask(op='sse', url=url)['id']

    def levels(self, stream):
        return self.ask(op='levels', stream=stream)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.kill()
