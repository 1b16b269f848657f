"""When service-app's job threads wake the consume loop to settle, and when they leave it to the
loop's next pass (service_app.settlement)."""

import threading
import time

import pytest

from service_app import settlement
from service_app.settlement import SETTLE_DELAY, Ledger, SettleAction, Settlement

ACK = Settlement(SettleAction.ACK)


class Channel:
    is_open = True

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


class Connection:
    def __init__(self):
        self.wakes = []

    def add_callback_threadsafe(self, callback):
        self.wakes.append(callback)


@pytest.fixture
def ledger():
    connected = threading.Event()
    connected.set()
    return Ledger(connected, prefetch=16)


def deliver(ledger, *tags):
    channel = Channel()
    generation = ledger.open(channel)
    for tag in tags:
        ledger.taken(generation, tag)
    return generation, channel


def test_acks_handed_back_before_a_pass_due_soon_go_in_one_multiple_ack_without_a_wake(ledger):
    generation, channel = deliver(ledger, 1, 2, 3)
    assert ledger.before_wait(idle_wait=0.5) == SETTLE_DELAY  # messages in hand, deliveries just came
    connection = Connection()
    for tag in (1, 2, 3):
        ledger.hand_back(generation, tag, ACK, connection)
    assert connection.wakes == []
    ledger.before_wait(idle_wait=0.5)  # the next pass
    assert channel.calls == [("basic_ack", (3,), {"multiple": True})]
    assert ledger.in_hand() == 0
    assert ledger.before_wait(idle_wait=0.5) == 0.5  # nothing in hand: the loop may wait long


def test_a_settlement_wakes_the_loop_when_its_wait_is_long(ledger, monkeypatch):
    generation, channel = deliver(ledger, 1)
    monkeypatch.setattr(settlement, "BUSY_SPELL", 0.0)  # e.g. a long job: no delivery lately
    assert ledger.before_wait(idle_wait=0.5) == 0.5
    connection = Connection()
    ledger.hand_back(generation, 1, ACK, connection)
    assert len(connection.wakes) == 1
    connection.wakes[0]()
    assert channel.calls == [("basic_ack", (1,), {"multiple": False})]


def test_a_settlement_wakes_the_loop_when_half_the_prefetch_window_is_in_hand(ledger):
    generation, channel = deliver(ledger, *range(1, 9))  # 8 of 16
    ledger.before_wait(idle_wait=0.5)
    connection = Connection()
    ledger.hand_back(generation, 1, ACK, connection)
    assert len(connection.wakes) == 1


def test_a_wait_that_ended_before_the_hand_back_is_not_woken_and_the_next_pass_settles(ledger):
    """A job thread that reads the loop's old wait (published before it looked for settlements)
    leaves the settlement to the loop, which finds it on the pass it is making."""
    generation, channel = deliver(ledger, 1, 2)
    ledger.before_wait(idle_wait=0.5)
    connection = Connection()
    ledger._next_pass_by = 0.0  # the loop's last wait ended; it is between passes
    ledger.hand_back(generation, 2, ACK, connection)
    assert connection.wakes == []
    ledger.before_wait(idle_wait=0.5)
    assert channel.calls == [("basic_ack", (2,), {"multiple": False})]  # 1 is still running
    ledger.hand_back(generation, 1, ACK, connection)
    ledger.before_wait(idle_wait=0.5)
    assert channel.calls[-1] == ("basic_ack", (1,), {"multiple": False})
    assert ledger.in_hand() == 0


def test_settlements_of_a_lost_connection_are_dropped_not_acked_on_the_next(ledger):
    generation, old_channel = deliver(ledger, 1)
    ledger.before_wait(idle_wait=0.5)
    ledger.hand_back(generation, 1, ACK, Connection())
    new_generation, new_channel = deliver(ledger)  # reconnected before the old pass came
    ledger.before_wait(idle_wait=0.5)
    assert old_channel.calls == [] and new_channel.calls == []
    assert ledger.in_hand() == 0


def test_only_deliveries_keep_the_loop_waking_often(ledger):
    """With a long job in hand, the loop polls for BUSY_SPELL after the last delivery, then waits
    long; settlements do not extend the spell (so slow jobs at a low rate cost few passes)."""
    generation, channel = deliver(ledger, 1, 2)
    assert ledger.before_wait(idle_wait=0.5) == SETTLE_DELAY
    time.sleep(settlement.BUSY_SPELL + 0.01)
    connection = Connection()
    ledger.hand_back(generation, 1, ACK, connection)
    ledger.before_wait(idle_wait=0.5)
    assert channel.calls == [("basic_ack", (1,), {"multiple": False})]
    assert ledger.before_wait(idle_wait=0.5) == 0.5  # job 2 still runs; nothing delivered lately
    ledger.hand_back(generation, 2, ACK, connection)
    assert len(connection.wakes) == 1  # so its settlement wakes the loop


def test_a_message_is_requeued_with_basic_reject(ledger):
    """Requeueing uses basic.reject: from RabbitMQ 4.3 a requeueing basic.nack no longer raises a
    quorum queue's x-delivery-count, which MAX_REDELIVERIES and the queue's delivery limit count on.
    (The 3.10 broker of the integration tests counts both, so this is pinned at the call.)"""
    generation, channel = deliver(ledger, 7)
    assert ledger._apply(generation, 7, Settlement(SettleAction.REQUEUE)) is False
    assert channel.calls == [("basic_reject", (7,), {"requeue": True})]
