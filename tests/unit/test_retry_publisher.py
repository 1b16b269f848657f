"""service-app's retry publisher at shutdown (service_app.retry_publisher)."""

import threading
import time

from service_app.retry_publisher import RetryPublisher


def test_close_does_not_wait_for_a_job_thread_stuck_publishing():
    """During a resource alarm a job thread can wait in publish() up to the blocked timeout (30 s),
    holding the connection's lock; shutdown's close() must not wait that long (the pod would be
    killed past its grace period)."""
    publisher = RetryPublisher("amqp://guest:guest@127.0.0.1:1/%2F")
    closed = []
    publisher._close = lambda: closed.append(True)
    publishing = threading.Event()
    done = threading.Event()

    def stuck_publish() -> None:
        with publisher._lock:  # what publish() holds while the broker blocks it
            publishing.set()
            done.wait(10)

    threading.Thread(target=stuck_publish, daemon=True).start()
    publishing.wait(5)
    started = time.monotonic()
    publisher.close(wait_seconds=0.2)
    assert time.monotonic() - started < 2 and closed == []
    done.set()
    publisher.close()  # waits (up to 1 s) for the lock to be free again
    assert closed == [True]
