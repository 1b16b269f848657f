"""main-app's publisher sends what pika buffered in one write (main_app.amqp_writes): the
same bytes in the same order, partial sends included."""

import collections
import errno

import pytest
from pika.adapters.utils import io_services_utils

from main_app import amqp_writes


class ShortWriteSocket:
    """Takes at most `limit` bytes per send(), like a socket whose buffer is nearly full."""

    def __init__(self, limit: int):
        self.limit = limit
        self.sends: list[bytes] = []

    def send(self, data) -> int:
        taken = bytes(data[:self.limit])
        self.sends.append(taken)
        return len(taken)

    def fileno(self) -> int:
        return 99


def transport_with(frames: list[bytes], sock: ShortWriteSocket,
                   kind: type = io_services_utils._AsyncPlaintextTransport):
    transport = object.__new__(kind)
    transport._sock = sock
    transport._state = transport._STATE_ACTIVE
    transport._tx_buffers = collections.deque()
    transport._tx_buffered_byte_count = 0
    for frame in frames:
        transport._buffer_tx_data(frame)
    return transport


@pytest.fixture(autouse=True)
def installed():
    amqp_writes.coalesce_frame_writes()
    amqp_writes.coalesce_frame_writes()  # idempotent


FRAMES = [b"method-frame", b"header", b"body" * 10] * 4


def test_buffered_frames_leave_in_one_send():
    sock = ShortWriteSocket(limit=1 << 20)
    transport = transport_with(FRAMES, sock)
    transport._produce()
    assert sock.sends == [b"".join(FRAMES)]
    assert not transport._tx_buffers and transport._tx_buffered_byte_count == 0


def test_a_partial_send_keeps_every_byte_in_order():
    sock = ShortWriteSocket(limit=7)
    transport = transport_with(FRAMES, sock)
    while transport._tx_buffers:  # pika calls _produce again once the socket is writable
        transport._produce()
    assert b"".join(sock.sends) == b"".join(FRAMES)
    assert transport._tx_buffered_byte_count == 0


def test_frames_buffered_while_the_socket_was_full_follow_the_unsent_rest():
    class FullOnceSocket(ShortWriteSocket):
        def send(self, data) -> int:
            if not self.sends:
                self.sends.append(b"")
                raise BlockingIOError  # EAGAIN: pika keeps the buffer and waits for writability
            return super().send(data)

    sock = FullOnceSocket(limit=1 << 20)
    transport = transport_with(FRAMES[:3], sock)
    with pytest.raises(BlockingIOError):
        transport._produce()
    for frame in FRAMES[3:]:
        transport._buffer_tx_data(frame)
    transport._produce()
    assert sock.sends == [b"", b"".join(FRAMES)]
    assert transport._tx_buffered_byte_count == 0


def test_large_buffers_are_sent_as_pika_buffered_them():
    big = [b"x" * amqp_writes.MAX_JOINED_BYTES, b"y" * 10, b"z" * 10]
    sock = ShortWriteSocket(limit=1 << 20)
    transport = transport_with(big, sock)
    transport._produce()
    assert sock.sends == big


def test_frames_over_tls_are_sent_as_pika_buffered_them():
    sock = ShortWriteSocket(limit=1 << 20)
    transport = transport_with(FRAMES, sock, io_services_utils._AsyncSSLTransport)
    # The send loop that pika's TLS transport calls under its own error handling.
    super(io_services_utils._AsyncSSLTransport, transport)._produce()
    assert sock.sends == FRAMES


class Poller:
    """Stands in for pika's I/O services: records the writability watch turned on and off."""

    def __init__(self):
        self.calls: list[str] = []

    def set_writer(self, fd, callback):
        self.calls.append("set_writer")

    def remove_writer(self, fd):
        self.calls.append("remove_writer")


class Connection:
    def __init__(self, transport):
        self._transport = transport


def held_transport(sock) -> tuple[object, Poller, list]:
    transport = transport_with([], sock)
    transport._nbio = Poller()
    aborts: list = []
    transport._initiate_abort = aborts.append
    return transport, transport._nbio, aborts


def test_frames_written_in_a_sent_at_once_block_leave_in_one_send_when_it_ends():
    sock = ShortWriteSocket(limit=1 << 20)
    transport, poller, aborts = held_transport(sock)
    with amqp_writes.sent_at_once(Connection(transport)):
        for frame in FRAMES:
            transport.write(frame)
        assert sock.sends == []  # nothing sent yet, and no writability watch turned on
    assert sock.sends == [b"".join(FRAMES)]
    assert poller.calls == [] and aborts == []
    assert not transport._tx_buffers and transport._tx_buffered_byte_count == 0


def test_outside_a_block_pika_waits_for_writability_as_before():
    sock = ShortWriteSocket(limit=1 << 20)
    transport, poller, _ = held_transport(sock)
    for frame in FRAMES[:3]:
        transport.write(frame)
    assert sock.sends == [] and poller.calls == ["set_writer"]  # once, for the first frame
    transport._on_socket_writable()
    assert sock.sends == [b"".join(FRAMES[:3])] and poller.calls == ["set_writer", "remove_writer"]


def test_what_the_socket_does_not_take_at_once_is_left_to_pikas_writability_watch():
    class TakesSevenThenFull(ShortWriteSocket):
        def send(self, data) -> int:
            if self.sends:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            return super().send(data)

    sock = TakesSevenThenFull(limit=7)
    transport, poller, aborts = held_transport(sock)
    with amqp_writes.sent_at_once(Connection(transport)):
        for frame in FRAMES:
            transport.write(frame)
    assert sock.sends == [b"".join(FRAMES)[:7]]
    assert poller.calls == ["set_writer"] and aborts == []
    assert b"".join(transport._tx_buffers) == b"".join(FRAMES)[7:]
    assert transport._tx_buffered_byte_count == len(b"".join(FRAMES)) - 7


def test_a_failed_send_aborts_the_transport_as_pika_does():
    class ResetSocket(ShortWriteSocket):
        def send(self, data) -> int:
            raise ConnectionResetError(104, "Connection reset by peer")

    transport, poller, aborts = held_transport(ResetSocket(limit=1))
    with amqp_writes.sent_at_once(Connection(transport)):
        transport.write(b"frame")
    assert [type(error) for error in aborts] == [ConnectionResetError] and poller.calls == []


def test_with_unsent_bytes_before_the_block_pikas_watch_sends_them_all_in_order():
    sock = ShortWriteSocket(limit=1 << 20)
    transport, poller, _ = held_transport(sock)
    transport.write(b"left-from-before")  # the watch is on
    with amqp_writes.sent_at_once(Connection(transport)):
        transport.write(b"new-frame")
    assert sock.sends == [] and poller.calls == ["set_writer"]
    transport._on_socket_writable()
    assert sock.sends == [b"left-from-before" + b"new-frame"]


def test_a_connection_without_a_plaintext_transport_is_left_to_pika():
    with amqp_writes.sent_at_once(Connection(None)):
        pass
    sock = ShortWriteSocket(limit=1 << 20)
    transport = transport_with([], sock, io_services_utils._AsyncSSLTransport)
    with amqp_writes.sent_at_once(Connection(transport)):
        assert not getattr(transport, "_held", False)


def test_what_was_written_before_an_error_in_the_block_is_still_sent():
    # As without the block: a frame pika accepted is sent whatever the caller does next.
    sock = ShortWriteSocket(limit=1 << 20)
    transport, poller, _ = held_transport(sock)
    with pytest.raises(RuntimeError), amqp_writes.sent_at_once(Connection(transport)):
        transport.write(b"frame")
        raise RuntimeError("publishing failed half-way")
    assert sock.sends == [b"frame"] and poller.calls == [] and not transport._held


def test_a_transport_aborted_in_the_block_sends_nothing_more():
    sock = ShortWriteSocket(limit=1 << 20)
    transport, poller, _ = held_transport(sock)
    with amqp_writes.sent_at_once(Connection(transport)):
        transport.write(b"frame")
        transport._state = transport._STATE_ABORTED_BY_USER  # the connection is being torn down
    assert sock.sends == [] and poller.calls == []
