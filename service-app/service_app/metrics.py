"""service-app metrics (one process, served by health.py on METRICS_PORT)."""

from enum import StrEnum

from prometheus_client import Counter, Gauge, Histogram

from jobs_contract import DeadLetterReason
from jobs_contract.metrics import child

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

JOBS_PROCESSED = Counter(
    "jobs_worker_jobs_processed_total", "Messages handled, by job type and outcome "
    "(succeeded, failed, retried, skipped: already final)", ["type", "outcome"]
)
JOB_DURATION = Histogram("jobs_worker_job_duration_seconds", "Time running one attempt", ["type"],
                         buckets=DURATION_BUCKETS)
JOB_LATENCY = Histogram("jobs_worker_job_latency_seconds", "Enqueue to final outcome, retries included", ["type"],
                        buckets=LATENCY_BUCKETS)
JOBS_IN_PROGRESS = Gauge("jobs_worker_jobs_in_progress", "Jobs running now")
CONCURRENCY = Gauge("jobs_worker_concurrency", "Jobs this process runs at once at most")
BUSY_RATIO = Gauge("jobs_worker_busy_ratio", "Jobs running now divided by concurrency (the autoscaling signal)")
RETRIES = Counter("jobs_worker_retries_total", "Attempts that failed and were scheduled again", ["type"])
DEAD_LETTERED = Counter("jobs_worker_dead_lettered_total", "Messages sent to the dead-letter queue", ["reason"])
BROKER_RECONNECTS = Counter("jobs_worker_broker_reconnects_total", "Connections to RabbitMQ re-established")
STORE_ERRORS = Counter("jobs_worker_store_errors_total", "Job store operations that failed and were retried")
RETRY_PUBLISH_ERRORS = Counter("jobs_worker_retry_publish_errors_total",
                               "Retry copies the broker did not confirm (alarm, unroutable, nack); tried again")


class Outcome(StrEnum):
    """What became of a message: the `outcome` label of jobs_worker_jobs_processed_total."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRIED = "retried"  # failed with attempts left: scheduled again
    SKIPPED = "skipped"  # its job has an outcome already (a redelivery, a second copy)


def initialise(job_types) -> None:
    """Series start at 0, so that rate() and increase() see the first event after a start."""
    for job_type in job_types:
        child(RETRIES, job_type)
        for outcome in Outcome:
            child(JOBS_PROCESSED, job_type, outcome)
    for reason in DeadLetterReason:
        child(DEAD_LETTERED, reason)
