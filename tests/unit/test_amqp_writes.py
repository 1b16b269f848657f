"""main-app's publisher sends what pika buffered in one write (main_app.amqp_writes): the
same bytes in the same order, partial sends included."""

import collections

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
