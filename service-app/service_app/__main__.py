"""`python -m service_app`: run one worker process until SIGTERM/SIGINT, then drain and exit 0."""

import gc
import logging
import os
import signal
import sys

from jobs_contract import JobStore
from jobs_contract.logs import configure_logging
from jobs_contract.settings import ConfigError, log_level_from_env
from service_app import health
from service_app.config import Settings
from service_app.jobs import check_catalog
from service_app.worker import Worker


def main() -> int:
    configure_logging("service-app", log_level_from_env())
    log = logging.getLogger("service_app")
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    check_catalog()
    store = JobStore.from_url(settings.redis_url, job_ttl_seconds=settings.job_ttl_seconds)
    worker = Worker(settings, store)
    heartbeat = health.Heartbeat()
    worker.beat = heartbeat.beat
    health.serve(settings.metrics_host, settings.metrics_port, alive=heartbeat.alive, ready=worker.ready)
    log.info("metrics and probes on http://%s:%d/{metrics,healthz,readyz}", settings.metrics_host,
             settings.metrics_port)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    # What exists now lives as long as the process: frozen, full garbage collections no longer
    # scan it and stall every job thread for tens of milliseconds.
    gc.freeze()
    worker.run()
    logging.shutdown()
    # Job threads still running past the grace period must not hold the exit:
    # their messages are unacked and go back to the queue.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
