"""main-app metrics. Under gunicorn they are written by each worker to
PROMETHEUS_MULTIPROC_DIR and served, aggregated, by the master (gunicorn_conf.py)."""

from prometheus_client import Counter, Gauge, Histogram
from werkzeug.http import HTTP_STATUS_CODES

from jobs_contract.metrics import child
from main_app.problems import RejectReason

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "jobs_api_http_requests_total", "HTTP requests answered, by route and status", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "jobs_api_http_request_duration_seconds", "HTTP request latency", ["route", "method"], buckets=LATENCY_BUCKETS
)
HTTP_IN_PROGRESS = Gauge(
    "jobs_api_http_requests_in_progress", "HTTP requests being served", multiprocess_mode="livesum"
)
JOBS_ACCEPTED = Counter(
    "jobs_api_jobs_accepted_total", "Jobs accepted (recorded and confirmed by the broker)", ["type"]
)
JOBS_REJECTED = Counter("jobs_api_jobs_rejected_total", "Job submissions refused, by reason", ["reason"])
PUBLISH_LATENCY = Histogram(
    "jobs_api_publish_duration_seconds", "Publish until broker confirm", buckets=LATENCY_BUCKETS
)
STORE_LATENCY = Histogram(
    "jobs_api_store_duration_seconds", "Job store operation latency", ["operation"], buckets=LATENCY_BUCKETS
)

# Label values an outsider controls are mapped onto fixed sets, so requests cannot create series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
_STATUSES = frozenset(HTTP_STATUS_CODES)


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


def status_label(status: int) -> str:
    return str(status) if status in _STATUSES else "other"


def initialise(job_types) -> None:
    """Series start at 0, so that rate() and increase() see the first event after a start, not only the second."""
    for job_type in job_types:
        child(JOBS_ACCEPTED, job_type)
    for reason in RejectReason:
        child(JOBS_REJECTED, reason)
