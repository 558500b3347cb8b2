"""Replication logic without sockets: messages, gaps, restarts, silence."""

import json
import logging
from types import SimpleNamespace

import pytest
import zmq
from conftest import call, free_port, wait_until

import sneakers23
from sneakers23 import (
    Config,
    Inventory,
    Peer,
    Replicator,
    decode_message,
    encode_message,
)


@pytest.fixture
def inventory():
    inventory = Inventory()
    product = SimpleNamespace(
        id=1, sku='P1', brand='B', name='Shoe', color='c', price_cents=1,
        image='x.svg', position=0, released=False, release_at=None)
    items = [(10, 1, 'I10', '9', 200, 1)]
    inventory.load([(product, items)])
    return inventory


@pytest.fixture
def replicator(inventory):
    config = Config(node='a', replication='tcp://127.0.0.1:1',
                    peers={'b': Peer('b', 'tcp://127.0.0.1:2')})
    replicator = Replicator(config, inventory, writes=None)
    yield replicator
    replicator.context.destroy(linger=0)


def message(seq, kind='heartbeat', boot='boot1', node='b', **fields):
    return decode_message(encode_message(node, boot, seq, kind, **fields))


def resync_requested(replicator):
    wanted = replicator._resync_wanted.is_set()
    replicator._resync_wanted.clear()
    return wanted


def test_wire_format_is_two_frames():
    frames = encode_message('a', 'x1', 7, 'availability', item_id=3,
                            count=9, version=4)
    assert frames[0] == b'inv'
    assert json.loads(frames[1]) == {
        'node': 'a', 'seq': 7, 'type': 'availability', 'boot': 'x1',
        'item_id': 3, 'count': 9, 'version': 4}


@pytest.mark.parametrize('frames', [
    [b'inv'],
    [b'other', b'{}'],
    [b'inv', b'not json'],
    [b'inv', b'[1]'],
    [b'inv', b'{"node": "b", "seq": 1, "type": 7}'],
    [b'inv', b'{"node": "b", "seq": 1, "type": "sales", "paused": 1}'],
    [b'inv', b'{"node": "b", "seq": "1", "type": "heartbeat"}'],
    [b'inv', b'{"node": "b", "seq": 1, "type": "availability", '
             b'"item_id": 3, "count": "9", "version": 1}'],
    [b'inv', b'{"seq": 1, "type": "heartbeat"}'],
])
def test_malformed_messages_are_refused(frames):
    with pytest.raises(ValueError):
        decode_message(frames)


def test_a_type_it_does_not_know_is_counted_and_ignored(replicator):
    """A newer peer's message type: no gap in its seq, nothing applied."""
    state = replicator.peers['b']
    replicator.receive(state, message(1))
    replicator._resync_wanted.clear()
    replicator.receive(state, message(2, kind='presence', watching=3))
    replicator.receive(state, message(3))
    assert not resync_requested(replicator)
    assert state.last_seq == 3


def test_first_contact_reloads_then_in_order_messages_do_not(replicator):
    state = replicator.peers['b']
    replicator.receive(state, message(5))
    assert resync_requested(replicator)  # joined: what came before is lost
    replicator.receive(state, message(6))
    replicator.receive(state, message(7))
    assert not resync_requested(replicator)
    assert state.last_seq == 7


def test_a_gap_reloads(replicator):
    state = replicator.peers['b']
    replicator.receive(state, message(1))
    resync_requested(replicator)
    replicator.receive(state, message(4))
    assert resync_requested(replicator)


def test_a_heartbeat_ahead_of_what_arrived_reloads(replicator, inventory):
    state = replicator.peers['b']
    replicator.receive(state, message(1))
    resync_requested(replicator)
    replicator.receive(state, message(2, 'availability', item_id=10,
                                      count=150, version=2))
    replicator.receive(state, message(4))  # message 3 never came
    assert resync_requested(replicator)
    assert inventory.items[10].count == 150


def test_a_restarted_peer_reloads(replicator):
    state = replicator.peers['b']
    replicator.receive(state, message(40))
    resync_requested(replicator)
    replicator.receive(state, message(1, boot='boot2'))
    assert resync_requested(replicator)
    assert state.boot == 'boot2' and state.last_seq == 1


def test_a_silent_peer_reloads_when_silent_and_when_back(replicator):
    state = replicator.peers['b']
    replicator.receive(state, message(1))
    resync_requested(replicator)
    replicator._watch_peers()           # one look of the watch-peers loop
    assert not state.silent and not resync_requested(replicator)
    state.last_heard -= sneakers23.PEER_SILENT_AFTER + 1
    replicator._watch_peers()
    assert state.silent and resync_requested(replicator)
    assert replicator.health()['b']['state'] == 'silent'
    replicator.receive(state, message(2))
    assert resync_requested(replicator)
    assert replicator.health()['b']['state'] == 'connected'


def test_a_silent_peer_is_redialled_then_again_every_interval(
        replicator, caplog):
    state = replicator.peers['b']
    replicator._dial(state)
    replicator.receive(state, message(1))
    replicator._redial_if_silent(state)
    assert state.redials == 0                       # just heard
    state.last_heard -= sneakers23.PEER_REDIAL_AFTER + 0.1
    state.dialled -= sneakers23.PEER_REDIAL_AFTER + 0.1
    first = state.sub
    with caplog.at_level(logging.INFO, logger='sneakers23'):
        replicator._redial_if_silent(state)
    assert state.redials == 1 and state.sub is not first   # a new socket
    assert 're-dialling b' in caplog.text
    replicator._redial_if_silent(state)
    assert state.redials == 1                       # not again at once
    state.dialled -= sneakers23.PEER_REDIAL_INTERVAL
    replicator._redial_if_silent(state)
    assert state.redials == 2
    assert replicator.health()['b']['redials'] == 2
    assert replicator.health()['b']['state'] == 'connected'
    replicator.receive(state, message(2))           # heard again: no more
    state.dialled -= sneakers23.PEER_REDIAL_INTERVAL
    replicator._redial_if_silent(state)
    assert state.redials == 2


def test_messages_claiming_another_origin_are_refused(replicator):
    with pytest.raises(ValueError):
        replicator.receive(replicator.peers['b'], message(1, node='c'))


def test_remote_changes_apply_when_newer_and_are_not_republished(
        replicator, inventory):
    sent = []
    replicator.publish = lambda kind, **f: sent.append((kind, f))
    inventory.listen(replicator.on_inventory)
    state = replicator.peers['b']
    replicator.receive(state, message(1, 'availability', item_id=10,
                                      count=120, version=5))
    replicator.receive(state, message(2, 'availability', item_id=10,
                                      count=190, version=3))  # older
    replicator.receive(state, message(3, 'released', product_id=1,
                                      release_at='2026-11-26T10:00:00Z'))
    assert inventory.items[10].count == 120
    assert inventory.products[1].released
    assert inventory.products[1].release_at.hour == 10
    assert sent == []

    inventory.item_changed(10, 119, 6)  # a local sale is published
    assert sent == [('availability', {'item_id': 10, 'count': 119,
                                      'version': 6})]


def test_dropped_messages_still_use_a_seq(replicator):
    replicator.config.drop_rate = 0.999999
    replicator._pub = SimpleNamespace(send_multipart=lambda frames: None)
    replicator.publish('availability', item_id=1, count=1, version=1)
    replicator.publish('heartbeat')
    assert (replicator.seq, replicator.dropped) == (2, 1)


def test_curve_keys_must_match_peers_toml():
    public, secret = (k.decode() for k in zmq.curve_keypair())
    config = Config(node='b', public_key=public, curve_secret=secret)
    assert sneakers23.curve_keys(config) == (public, secret)
    other_public, other_secret = (k.decode() for k in zmq.curve_keypair())
    for bad in ('', other_secret, 'too short'):
        config.curve_secret = bad
        with pytest.raises(sneakers23.ConfigError):
            sneakers23.curve_keys(config)
    assert sneakers23.curve_keys(Config()) is None


def test_peers_toml_in_the_repo_describes_three_nodes():
    fields = sneakers23.load_cluster(
        f'{sneakers23.HERE}/peers.toml', 'b')
    assert fields['port'] == 8024
    assert sorted(fields['peers']) == ['a', 'c']
    assert fields['replication'] == 'tcp://127.0.0.1:7024'
    assert fields['db_url'] == (f'sqlite:///{sneakers23.HERE}/data/'
                                'sneakers23.db')


# ---------------------------------------------------------------------------
# The node's background loops, in this process
# ---------------------------------------------------------------------------

def curve_config():
    """Config fields of node a of a CURVE pair a, b (b never started)."""
    (a_public, a_secret), (b_public, _) = (
        (k.decode() for k in zmq.curve_keypair()) for _ in range(2))
    return {'node': 'a', 'public_key': a_public, 'curve_secret': a_secret,
            'replication': f'tcp://127.0.0.1:{free_port()}',
            'peers': {'b': Peer('b', f'tcp://127.0.0.1:{free_port()}',
                                b_public)}}


def test_a_failing_iteration_is_logged_and_a_dead_loop_shows(app_server,
                                                             caplog):
    server = app_server(**curve_config())
    node, replicator = server.node, server.node.replicator
    status, _, health = call(server.url, 'GET', '/healthz')
    assert status == 200, health
    loops = node.loops()
    assert health['loops'] == {name: 'running' for name in loops}
    # the loops of the issue among them (handshakes are watched in listen)
    assert {'zap', 'watch-peers', 'listen-b', 'heartbeat',
            'lag-probe'} <= set(loops)

    # one heartbeat fails: logged, and the heartbeats go on
    real_publish, failed = replicator.publish, []

    def publish(kind, **fields):
        if kind == 'heartbeat' and not failed:
            failed.append(replicator.seq)
            raise RuntimeError('heartbeat broken by the test')
        return real_publish(kind, **fields)

    replicator.publish = publish
    with caplog.at_level(logging.ERROR, logger='sneakers23'):
        wait_until(lambda: failed and replicator.seq > failed[0] + 1, 5,
                   'a heartbeat failed, then the next ones were sent')
    assert [r for r in caplog.records if r.exc_info
            and 'heartbeat broken by the test' in str(r.exc_info[1])]
    assert sum(loop.errors for loop in loops.values()) == 1
    status, _, health = call(server.url, 'GET', '/healthz')
    assert status == 200, health
    assert set(health['loops'].values()) == {'running'}

    # a loop whose greenlet ended (not by stop()) is dead: the node says
    # so. An Exception would be one failed iteration: kill it for good.
    victim = 'zap'
    loops[victim].greenlet.kill(timeout=5)
    assert loops[victim].greenlet.dead
    status, headers, health = call(server.url, 'GET', '/healthz')
    assert status == 503, health
    assert headers['content-type'].startswith('application/json')
    assert health['loops'] == {name: 'dead' if name == victim
                               else 'running' for name in loops}
