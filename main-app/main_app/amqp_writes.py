"""One socket write per pass of pika's I/O loop, instead of one per AMQP frame.

pika's transport sends every frame it has buffered with a send() of its own: a published
message is three frames (method, header, body), so a batch of N messages cost 3N system
calls here and as many reads on RabbitMQ's side. `coalesce_frame_writes()` makes the
transport join what is buffered when the socket turns writable and send it in one call:
the same bytes in the same order; a partial send is requeued by pika as before. Over TLS
frames are sent as pika buffered them.

pika's own `_produce` does the sending; only its buffer is joined first. What this relies
on in the pinned pika 1.4.x (the plaintext transport inheriting `_produce`, which sends from
`_tx_buffers`, and `_sigint_safe_send`) is checked when it is installed, so an upgrade that
moves them fails at start, not silently.

`sent_at_once(connection)`: pika sends nothing when a frame is written; it turns on the
poller's writability watch (an `epoll_ctl`), and the loop's next pass finds the socket
writable, sends and turns the watch off again (another `epoll_ctl`). Frames written inside
the block are buffered and sent, joined, when it ends, on the loop's thread: one pass and
two system calls fewer per batch. Whatever the socket does not take at once is left to
pika's writability watch as before.
"""

import contextlib
from collections.abc import Iterator

from pika.adapters.utils import io_services_utils

# Above this, frames are sent as pika buffered them: joining would copy large bodies again.
MAX_JOINED_BYTES = 256 * 1024

_Transport = io_services_utils._AsyncTransportBase
# Only the plaintext transport: over TLS, OpenSSL wants a write it refused (WANT_WRITE) retried
# with the same bytes, and pika's TLS transport keeps calling the base class's `_produce`.
_Plaintext = io_services_utils._AsyncPlaintextTransport
_pika_produce = _Transport._produce
_pika_write = _Plaintext.write


def _produce_joined(self) -> None:
    buffers = self._tx_buffers
    if len(buffers) > 1 and self._tx_buffered_byte_count <= MAX_JOINED_BYTES:
        joined = b"".join(buffers)
        buffers.clear()
        buffers.append(joined)
    _pika_produce(self)


def _write_held(self, data: bytes) -> None:
    if self._held and data and self._state == self._STATE_ACTIVE:
        self._buffer_tx_data(data)  # sent when the sent_at_once block ends
    else:
        _pika_write(self, data)


def coalesce_frame_writes() -> None:
    """Install the joining send in pika's plaintext transport (idempotent; process-wide)."""
    if _Plaintext._produce is _produce_joined:
        return
    if ("_produce" in vars(_Plaintext) or "_tx_buffers" not in _pika_produce.__code__.co_names
            or not hasattr(_Transport, "_sigint_safe_send")
            or not all(hasattr(_Plaintext, name) for name in (
                "_buffer_tx_data", "_on_socket_writable", "_initiate_abort", "get_write_buffer_size"))
            or "set_writer" not in _pika_write.__code__.co_names):
        raise RuntimeError("pika's transport internals changed: review main_app.amqp_writes")
    _Plaintext._held = False
    _Plaintext.write = _write_held
    _Plaintext._produce = _produce_joined


@contextlib.contextmanager
def sent_at_once(connection) -> Iterator[None]:
    """Send what pika writes to `connection` inside the block in one go when it ends (the
    connection's I/O loop thread only; plaintext transports, else pika's way)."""
    transport = getattr(connection, "_transport", None)
    if (not isinstance(transport, _Plaintext) or _Plaintext.write is not _write_held or transport._held
            or transport._state != transport._STATE_ACTIVE):
        yield
        return
    watched = transport.get_write_buffer_size() > 0  # unsent bytes: pika's writability watch is on
    transport._held = True
    try:
        yield
    finally:
        transport._held = False
        if not watched and transport._tx_buffers and transport._state == transport._STATE_ACTIVE:
            _send_now(transport)


def _send_now(transport) -> None:
    try:
        transport._produce()
    except OSError as error:
        if error.errno not in io_services_utils._TRY_IO_AGAIN_SOCK_ERROR_CODES:
            transport._initiate_abort(error)  # as pika does when a send fails
            return
    except Exception as error:  # noqa: BLE001 - as pika's own writability handler
        transport._initiate_abort(error)
        return
    if transport._tx_buffers:  # the socket took only part: pika sends the rest when it is writable
        transport._nbio.set_writer(transport._sock.fileno(), transport._on_socket_writable)
