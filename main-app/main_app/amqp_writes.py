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
"""

from pika.adapters.utils import io_services_utils

# Above this, frames are sent as pika buffered them: joining would copy large bodies again.
MAX_JOINED_BYTES = 256 * 1024

_Transport = io_services_utils._AsyncTransportBase
# Only the plaintext transport: over TLS, OpenSSL wants a write it refused (WANT_WRITE) retried
# with the same bytes, and pika's TLS transport keeps calling the base class's `_produce`.
_Plaintext = io_services_utils._AsyncPlaintextTransport
_pika_produce = _Transport._produce


def _produce_joined(self) -> None:
    buffers = self._tx_buffers
    if len(buffers) > 1 and self._tx_buffered_byte_count <= MAX_JOINED_BYTES:
        joined = b"".join(buffers)
        buffers.clear()
        buffers.append(joined)
    _pika_produce(self)


def coalesce_frame_writes() -> None:
    """Install the joining send in pika's plaintext transport (idempotent; process-wide)."""
    if _Plaintext._produce is _produce_joined:
        return
    if ("_produce" in vars(_Plaintext) or "_tx_buffers" not in _pika_produce.__code__.co_names
            or not hasattr(_Transport, "_sigint_safe_send")):
        raise RuntimeError("pika's transport internals changed: review main_app.amqp_writes")
    _Plaintext._produce = _produce_joined
