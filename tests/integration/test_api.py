"""main-app's HTTP contract against real Redis and RabbitMQ."""

import json
import threading
import time

import orjson
import pytest
import redis
import requests
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from conftest import OTHER_TOKEN, TOKEN, queue_depth
from jobs_contract import JobMessage, JobStore, topology
from jobs_contract.store import NewJob
from main_app.api import create_app
from main_app.broker import BrokerUnavailable
from main_app.config import Settings

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_settings(rabbit_url: str, redis_url: str, **overrides) -> Settings:
    import dataclasses

    from jobs_contract import Limits

    base = Settings(rabbitmq_url=rabbit_url, redis_url=redis_url, api_tokens=(TOKEN, OTHER_TOKEN),
                    auth_disabled=False, max_body_bytes=65536, publish_timeout_seconds=2.0, job_ttl_seconds=3600,
                    idempotency_ttl_seconds=3600, limits=Limits(), declare_topology=True)
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def app(rabbit, redis_node, redis_client, amqp):
    application = create_app(make_settings(rabbit.url, redis_node.url))
    assert application.extensions["publisher"].wait_ready(15)
    yield application
    application.extensions["publisher"].stop()


@pytest.fixture
def client(app):
    return app.test_client()


class OpenApiChecker:
    """Checks that responses match the OpenAPI document the app serves."""

    def __init__(self, document: dict):
        self.document = document

    def check(self, path: str, method: str, response) -> None:
        operation = self.document["paths"][path][method]
        documented = operation["responses"].get(str(response.status_code))
        assert documented, f"{method.upper()} {path} -> {response.status_code} is not documented"
        content_type = response.mimetype
        assert content_type in documented["content"], f"{content_type} not documented for {response.status_code}"
        schema = dict(documented["content"][content_type]["schema"])
        schema["components"] = self.document["components"]
        # Resolve "#/components/..." against the whole document.
        Draft202012Validator({**schema, "$defs": {}}).validate(response.get_json(force=True))


@pytest.fixture
def openapi(client):
    document = client.get("/openapi.json").get_json()
    return OpenApiChecker(document)


def test_openapi_document_is_valid_and_covers_every_route(app, client):
    document = client.get("/openapi.json").get_json()
    validate_openapi(document)
    documented = {(path, method.upper()) for path, ops in document["paths"].items() for method in ops}
    served = {
        (rule.rule.replace("<job_id>", "{id}"), method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert served == documented


@pytest.mark.parametrize("route", ["/jobs", "/user-request-job"])
def test_submit_records_publishes_and_answers_202(client, redis_node, amqp, openapi, route):
    response = client.post(route, json={"type": "echo", "payload": {"n": 1}}, headers=AUTH)
    assert response.status_code == 202
    openapi.check("/jobs", "post", response)
    body = response.get_json()
    assert body["status"] == "queued" and body["type"] == "echo"
    assert response.headers["Location"] == f"/jobs/{body['id']}"

    stored = JobStore.from_url(redis_node.url).get(body["id"])
    assert stored["status"] == "queued" and stored["attempts"] == 0

    method, properties, raw = amqp.basic_get(topology.QUEUE, auto_ack=True)
    assert method is not None, "the job is not in the queue"
    assert properties.delivery_mode == 2
    message = JobMessage.decode(raw, properties)
    assert (message.id, message.type, message.payload, message.attempt) == (body["id"], "echo", {"n": 1}, 1)


def test_get_job_and_client_isolation(client, openapi):
    job_id = client.post("/jobs", json={"type": "echo"}, headers=AUTH).get_json()["id"]
    response = client.get(f"/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 200
    openapi.check("/jobs/{id}", "get", response)
    job = response.get_json()
    assert set(job) == {"id", "type", "status", "attempts", "result", "error", "created_at", "started_at",
                        "finished_at"}
    assert job["status"] == "queued" and job["result"] is None and job["started_at"] is None

    other = client.get(f"/jobs/{job_id}", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert other.status_code == 404
    openapi.check("/jobs/{id}", "get", other)


@pytest.mark.parametrize("job_id", ["0" * 36, "not-a-uuid", "..%2F..%2Fetc%2Fpasswd", "%00", "a" * 500])
def test_unknown_or_malformed_ids_are_404(client, openapi, job_id):
    response = client.get(f"/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    openapi.check("/jobs/{id}", "get", response)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}])
def test_auth_required(client, openapi, headers):
    response = client.post("/jobs", json={"type": "echo"}, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    openapi.check("/jobs", "post", response)
    assert client.get(f"/jobs/{'0' * 8}-0000-0000-0000-{'0' * 12}", headers=headers).status_code == 401


def test_malformed_json_is_400(client, openapi):
    response = client.post("/jobs", data=b'{"type": ', headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    openapi.check("/jobs", "post", response)
    invalid_utf8 = client.post("/jobs", data=b'{"type": "echo", "payload": {"a": "\xff"}}',
                               headers={**AUTH, "Content-Type": "application/json"})
    assert invalid_utf8.status_code == 400


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", ""])
def test_wrong_content_type_is_415(client, openapi, content_type):
    response = client.post("/jobs", data=b'{"type": "echo"}', headers={**AUTH, "Content-Type": content_type})
    assert response.status_code == 415
    openapi.check("/jobs", "post", response)


def test_problem_json_accepts_json_suffix_types(client):
    response = client.post("/jobs", data=b'{"type": "echo"}',
                           headers={**AUTH, "Content-Type": "application/vnd.jobs+json; charset=utf-8"})
    assert response.status_code == 202


def test_body_over_the_limit_is_413(rabbit, redis_node, redis_client, amqp):
    app = create_app(make_settings(rabbit.url, redis_node.url, max_body_bytes=1024))
    try:
        response = app.test_client().post("/jobs", json={"type": "echo", "payload": {"x": "a" * 2000}}, headers=AUTH)
        assert response.status_code == 413
        assert response.mimetype == "application/problem+json"
        assert "1024 bytes" in response.get_json()["detail"]
        assert queue_depth(amqp, topology.QUEUE) == 0
    finally:
        app.extensions["publisher"].stop()


def test_chunked_body_over_the_limit_is_413_not_its_first_bytes_accepted(rabbit, redis_node, redis_client, amqp,
                                                                        start_api):
    """Under gunicorn, as clients send it: a chunked body has no Content-Length to refuse it by, and
    werkzeug reads such a body only up to MAX_BODY_BYTES, then stops without a word."""
    api = start_api(rabbit.url, redis_node.url, MAX_BODY_BYTES="1024")
    headers = {**AUTH, "Content-Type": "application/json"}
    job = b'{"type": "echo", "payload": {"n": 1}}'

    def post_chunked(body: bytes) -> requests.Response:  # a generator: requests sends it chunked
        return requests.post(f"{api.url}/jobs", data=(body[i:i + 300] for i in range(0, len(body), 300)),
                             headers=headers, timeout=10)

    # Valid JSON within the limit, then more: its first 1,024 bytes alone would be a valid job.
    response = post_chunked(job + b" " * (1024 - len(job)) + b"and the rest of the body")
    assert response.status_code == 413, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert "1024 bytes" in response.json()["detail"]
    assert queue_depth(amqp, topology.QUEUE) == 0
    assert not list(redis_client.scan_iter("job:*"))
    # A chunked body of exactly the limit, and one under it, are accepted.
    for size in (1024, 200):
        response = post_chunked(job + b" " * (size - len(job)))
        assert response.status_code == 202, response.text
    assert queue_depth(amqp, topology.QUEUE) == 2


@pytest.mark.parametrize("number", [b"123456789012345678901234567890", b"18446744073709551616",
                                    b"-9223372036854775809", b"-123456789012345678901234"])
def test_integer_beyond_64_bits_is_422_not_rounded_to_a_float(client, amqp, redis_client, number):
    # orjson would read it as a float: the job would run with another number than the client sent.
    response = client.post("/jobs", data=b'{"type": "echo", "payload": {"n": ' + number + b"}}",
                           headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.get_json()["errors"][0]["pointer"] == "/payload"
    assert "64 bits" in response.get_json()["detail"]
    assert queue_depth(amqp, topology.QUEUE) == 0
    assert not list(redis_client.scan_iter("job:*"))


@pytest.mark.parametrize("payload", [b'{"n": 18446744073709551615}', b'{"n": -9223372036854775808}',
                                     b'{"id": "1234567890123456789012345"}', b'{"x": 0.12345678901234567890}'])
def test_integers_within_64_bits_and_long_digit_strings_are_accepted_exact(client, amqp, payload):
    response = client.post("/jobs", data=b'{"type": "echo", "payload": ' + payload + b"}",
                           headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 202, response.get_data(as_text=True)
    message = amqp.basic_get(topology.QUEUE, auto_ack=True)[2]
    assert orjson.loads(message)["payload"] == orjson.loads(payload)


def test_schema_violation_is_422_with_the_field(client, openapi, amqp, redis_client):
    response = client.post("/jobs", json={"type": "sleep", "payload": {"seconds": 10**6}}, headers=AUTH)
    assert response.status_code == 422
    openapi.check("/jobs", "post", response)
    assert response.get_json()["errors"][0]["pointer"] == "/payload/seconds"
    unknown = client.post("/jobs", json={"type": "mine"}, headers=AUTH)
    assert unknown.status_code == 422 and unknown.get_json()["errors"][0]["pointer"] == "/type"
    deep = client.post("/jobs", data=b'{"type":"echo","payload":' + b"[" * 2000 + b"]" * 2000 + b"}",
                       headers={**AUTH, "Content-Type": "application/json"})
    assert deep.status_code in (400, 422)
    assert queue_depth(amqp, topology.QUEUE) == 0
    assert redis_client.dbsize() == 0, "a rejected job left a record behind"


def test_idempotency_key_returns_the_same_job(client, amqp, openapi):
    headers = {**AUTH, "Idempotency-Key": "order-42"}
    first = client.post("/jobs", json={"type": "echo", "payload": {"a": 1, "b": 2}}, headers=headers)
    again = client.post("/jobs", json={"payload": {"b": 2, "a": 1}, "type": "echo"}, headers=headers)
    assert first.status_code == again.status_code == 202
    openapi.check("/jobs", "post", again)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert queue_depth(amqp, topology.QUEUE) == 1, "a replay published a second job"

    different = client.post("/jobs", json={"type": "echo", "payload": {"a": 2}}, headers=headers)
    assert different.status_code == 422
    openapi.check("/jobs", "post", different)
    # Keys are per client: another client's same key is a different job.
    other = client.post("/jobs", json={"type": "echo", "payload": {"a": 1, "b": 2}},
                        headers={"Authorization": f"Bearer {OTHER_TOKEN}", "Idempotency-Key": "order-42"})
    assert other.status_code == 202 and other.get_json()["id"] != first.get_json()["id"]


def test_idempotency_key_in_progress_is_409(client, redis_node):
    store = JobStore.from_url(redis_node.url)
    from main_app.auth import TokenAuthenticator

    client_id = TokenAuthenticator((TOKEN,)).client_for(f"Bearer {TOKEN}")
    import hashlib

    body_hash = hashlib.sha256(orjson.dumps(["echo", {}], option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert store.create("11111111-1111-4111-8111-111111111111", client_id, "echo", "t", ("busy", body_hash)) is None
    response = client.post("/jobs", json={"type": "echo"}, headers={**AUTH, "Idempotency-Key": "busy"})
    assert response.status_code == 409
    assert response.headers["Retry-After"] == "1"


def test_a_retry_whose_republish_fails_keeps_the_record_of_the_job_answered_202(app, client, monkeypatch):
    """A 202 whose key could not be confirmed (Redis blipped), then a retry after the key went stale
    that republishes the same job and is refused by the broker: the first request's job keeps its
    record (it was not this retry's to undo), and the next retry gets that same job."""
    submissions = app.extensions["jobs_api"].submissions
    monkeypatch.setattr(submissions, "pending_ttl", 1)
    headers = {**AUTH, "Idempotency-Key": "republish-refused"}
    job = {"type": "echo", "payload": {"x": 1}}

    def blip(*args, **kwargs):
        raise redis.ConnectionError("blip")

    with monkeypatch.context() as patch:
        patch.setattr(submissions.store, "confirm_idempotency", blip)
        first = client.post("/jobs", json=job, headers=headers)
    assert first.status_code == 202
    accepted = first.get_json()
    time.sleep(1.2)  # the first request's key is stale now

    publish = submissions.publisher.publish

    def republish_refused(*args, record=None, **kwargs):  # the record's round trip finds the key taken
        if record is not None:
            return publish(*args, record=record, **kwargs)
        raise BrokerUnavailable("not connected to RabbitMQ", before_handover=True)

    with monkeypatch.context() as patch:
        patch.setattr(submissions.publisher, "publish", republish_refused)
        assert client.post("/jobs", json=job, headers=headers).status_code == 503
    record = client.get(f"/jobs/{accepted['id']}", headers=AUTH)
    assert record.status_code == 200 and record.get_json()["created_at"] == accepted["created_at"]
    time.sleep(1.2)  # the refused retry's claim is stale too
    again = client.post("/jobs", json=job, headers=headers)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == accepted["id"] and again.get_json()["created_at"] == accepted["created_at"]


def test_bad_idempotency_key_is_400(client):
    response = client.post("/jobs", json={"type": "echo"}, headers={**AUTH, "Idempotency-Key": "x" * 300})
    assert response.status_code == 400


def test_health_and_readiness(client, openapi):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"] == {"broker": True, "store": True}
    openapi.check("/readyz", "get", ready)


def test_broker_unavailable_is_503_and_nothing_is_accepted(rabbit, redis_node, redis_client, caplog, monkeypatch):
    from jobs_devtools.stack import free_port
    from main_app import submission

    # The throttle is per process: one armed by an earlier test would hide this test's warning.
    monkeypatch.setattr(submission, "_warn_broker_refused", submission._ThrottledWarning())

    def scripts_run() -> int:
        stats = redis_client.info("commandstats")
        return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval", "del"))

    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    app = create_app(make_settings(dead_broker, redis_node.url))
    try:
        client = app.test_client()
        before = scripts_run()
        with caplog.at_level("WARNING", logger="main_app.submission"):
            for attempt in range(5):
                response = client.post("/jobs", json={"type": "echo"},
                                       headers={**AUTH, "Idempotency-Key": f"k{attempt}"})
                assert response.status_code == 503
                assert response.headers["Retry-After"] == "1"
                assert response.mimetype == "application/problem+json"
        assert redis_client.dbsize() == 0, "an unaccepted job left a record or idempotency key behind"
        # Refused before anything was written: no clean-up in Redis, and one warning, not one per request.
        assert scripts_run() == before
        warnings = [r.getMessage() for r in caplog.records if r.name == "main_app.submission"]
        assert len(warnings) == 1 and "not connected to RabbitMQ" in warnings[0], warnings
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["checks"]["broker"] is False
    finally:
        app.extensions["publisher"].stop()


def test_store_unavailable_is_503_and_nothing_is_published(rabbit, amqp):
    from jobs_devtools.stack import free_port

    app = create_app(make_settings(rabbit.url, f"redis://127.0.0.1:{free_port()}/0"))
    try:
        assert app.extensions["publisher"].wait_ready(15)
        client = app.test_client()
        response = client.post("/jobs", json={"type": "echo"}, headers=AUTH)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert queue_depth(amqp, topology.QUEUE) == 0
        assert client.get(f"/jobs/{'0' * 8}-0000-4000-8000-{'0' * 12}", headers=AUTH).status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["checks"]["store"] is False
    finally:
        app.extensions["publisher"].stop()


def test_unroutable_publish_is_not_accepted(rabbit, redis_node, redis_client, amqp):
    """If the queue is missing (deleted by an operator), the broker returns the message: no 202."""
    app = create_app(make_settings(rabbit.url, redis_node.url, declare_topology=False))
    try:
        assert app.extensions["publisher"].wait_ready(15)
        amqp.queue_unbind(topology.QUEUE, topology.EXCHANGE, topology.ROUTING_KEY)
        response = app.test_client().post("/jobs", json={"type": "echo"}, headers=AUTH)
        assert response.status_code == 503
        assert redis_client.dbsize() == 0
    finally:
        amqp.queue_bind(topology.QUEUE, topology.EXCHANGE, topology.ROUTING_KEY)
        app.extensions["publisher"].stop()


def test_gunicorn_serves_metrics_only_on_the_metrics_port(rabbit, redis_node, redis_client, amqp, start_api):
    import requests

    api = start_api(rabbit.url, redis_node.url)
    assert api.submit("echo", {"x": 1}).status_code == 202
    assert api.submit("sleep", {"seconds": -1}).status_code == 422
    assert requests.get(f"{api.url}/metrics", timeout=5).status_code == 404
    metrics = requests.get(api.metrics_url, timeout=5).text
    assert 'jobs_api_jobs_accepted_total{type="echo"} 1.0' in metrics
    assert 'jobs_api_jobs_rejected_total{reason="invalid"} 1.0' in metrics
    assert 'jobs_api_http_requests_total{method="POST",route="/jobs",status="202"} 1.0' in metrics
    assert "jobs_api_publish_duration_seconds_count 1.0" in metrics
    assert 'jobs_api_store_duration_seconds_count{operation="create"}' in metrics
    assert "jobs_api_http_requests_in_progress" in metrics
    # Series exist from the start (at 0), so rate() sees the first event after a restart.
    assert 'jobs_api_jobs_accepted_total{type="flaky"} 0.0' in metrics
    assert 'jobs_api_jobs_rejected_total{reason="broker_unavailable"} 0.0' in metrics
    assert json.loads(requests.get(f"{api.url}/openapi.json", timeout=5).text)["openapi"].startswith("3.1")


def test_every_rejection_reason_is_pre_initialised():
    from prometheus_client import REGISTRY

    from jobs_contract import JOB_TYPES
    from main_app import metrics
    from main_app.problems import RejectReason

    metrics.initialise(JOB_TYPES)
    used = {reason.value for reason in RejectReason}
    initialised = {reason for reason in used
                   if REGISTRY.get_sample_value("jobs_api_jobs_rejected_total", {"reason": reason}) is not None}
    assert used <= initialised, used - initialised


def test_a_gunicorn_worker_accepts_requests_only_once_connected(rabbit, redis_node, redis_client, amqp, start_api):
    """Right after start, every request that gets an answer is served by a connected worker."""
    import requests

    api = start_api(rabbit.url, redis_node.url, wait_ready=False, GUNICORN_WORKERS="3")
    codes = []
    for _ in range(40):  # fresh connections, spread over the workers as they come up
        codes.append(requests.post(f"{api.url}/jobs", json={"type": "echo"}, headers=AUTH, timeout=10).status_code)
    assert codes == [202] * 40, codes


def nested_body(depth: int) -> bytes:
    """A request whose payload holds `depth` nested arrays (the document is depth + 2 deep)."""
    return b'{"type": "echo", "payload": {"a": ' + b"[" * depth + b"]" * depth + b"}}"


@pytest.mark.parametrize("depth, status", [(1, 202), (252, 202), (253, 422), (254, 422), (600, 422), (1022, 422),
                                           (1023, 400)])
def test_nesting_orjson_cannot_write_is_422_and_leaves_nothing(client, amqp, redis_client, depth, status):
    """orjson reads 1,024 levels but writes only 254: a document it could read but not write
    as a message is refused at validation, before anything is recorded or published."""
    response = client.post("/jobs", data=nested_body(depth), headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == status, response.get_data()[:300]
    accepted = 1 if status == 202 else 0
    assert queue_depth(amqp, topology.QUEUE) == accepted
    assert len(redis_client.keys("job:*")) == accepted, "a refused job left a record behind"
    if status == 422:
        assert response.get_json()["errors"][0]["pointer"] == "/payload"


def _series(metrics_text: str, name: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in metrics_text.splitlines() if line.startswith(name + "{")}


def test_outsiders_cannot_grow_the_metrics(rabbit, redis_node, redis_client, amqp, start_api):
    """gunicorn accepts any 3-20 letter uppercase method: unauthenticated requests with made-up
    methods on made-up paths must not create a series each (the labels are bounded)."""
    import random
    import string

    import requests

    api = start_api(rabbit.url, redis_node.url)
    assert api.submit("echo", {}).status_code == 202
    requests.get(f"{api.url}/nope", timeout=5)
    requests.delete(f"{api.url}/jobs", timeout=5)
    baseline = requests.get(api.metrics_url, timeout=5).text
    rng = random.Random(13)
    methods = {"".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 20))) for _ in range(60)}
    for method in methods:
        for path in ("/jobs", "/nope", f"/{method.lower()}"):
            response = requests.request(method, f"{api.url}{path}", timeout=5)
            assert response.status_code in (404, 405, 501), (method, path, response.status_code)
    after = requests.get(api.metrics_url, timeout=5).text
    for name in ("jobs_api_http_requests_total", "jobs_api_http_request_duration_seconds_count"):
        grown = _series(after, name) - _series(baseline, name)
        assert len(grown) <= 3, sorted(grown)  # at most one "other method" series per route/status seen
    assert len(after) < len(baseline) + 3000


def test_405_names_the_allowed_methods(client, openapi):
    response = client.delete("/jobs", headers=AUTH)
    assert response.status_code == 405
    assert response.mimetype == "application/problem+json"
    assert "POST" in {m.strip() for m in response.headers["Allow"].split(",")}
    assert "GET" in {m.strip() for m in client.post("/healthz").headers["Allow"].split(",")}


# --- idempotency across store and broker failures ------------------------------------------------


def _client_id(token: str = TOKEN) -> str:
    from main_app.auth import TokenAuthenticator

    return TokenAuthenticator((token,)).client_for(f"Bearer {token}")


def test_confirming_a_key_never_overwrites_another_requests_key(redis_node, redis_client):
    """The confirm is a compare-and-set on the job id, not a plain SET."""
    store = JobStore.from_url(redis_node.url)
    assert store.create("job-1", "c", "echo", "t", ("k", "h")) is None
    store.discard("job-1", "c", "k")  # its publish failed: the key is free again...
    assert store.create("job-2", "c", "echo", "t", ("k", "h")) is None  # ...and another request takes it
    store.confirm_idempotency("c", "k", "job-1", "h")  # a late confirm of the first request
    assert store.create("job-3", "c", "echo", "t", ("k", "h")).job_id == "job-2"


def test_create_many_records_a_batch_in_order_in_one_script(redis_node, redis_client):
    """A batch is one script: each job is created unless its Idempotency-Key is taken, also by a
    job earlier in the same batch (which then answers for it)."""
    store = JobStore.from_url(redis_node.url)
    assert store.create("job-0", "c", "echo", "t", ("taken", "h")) is None
    answers = store.create_many([NewJob("job-1", "c", "echo", "t1"), NewJob("job-2", "c", "sleep", "t2", ("k", "h")),
                                 NewJob("job-3", "c", "echo", "t3", ("k", "h")),
                                 NewJob("job-4", "c", "echo", "t4", ("taken", "h"))])
    assert answers[:2] == [None, None]
    assert [answers[2].job_id, answers[3].job_id] == ["job-2", "job-0"]
    assert sorted(key.decode() for key in redis_client.keys("job:*")) == ["job:job-0", "job:job-1", "job:job-2"]
    assert store.get("job-2")["status"] == "queued" and store.get("job-2")["type"] == "sleep"
    assert store.create_many([]) == []


def test_discard_removes_a_record_only_while_queued(redis_node, redis_client):
    """An ambiguous publish failure can race a worker that already took the message: its record stays."""
    store = JobStore.from_url(redis_node.url)
    assert store.create("job-1", "c", "echo", "t") is None
    assert store.begin("job-1", "c", "echo", "t") == "queued"
    store.discard("job-1", "c")
    assert store.get("job-1")["status"] == "running"
    assert store.create("job-2", "c", "echo", "t") is None
    store.discard("job-2", "c")
    assert store.get("job-2") is None


def _pause_store_writes_after_publishing(app, redis_client, milliseconds: int) -> None:
    """A Redis blip right after the broker's confirm: every write waits (CLIENT PAUSE WRITE)
    longer than the store's 2 s socket timeout, so the request's next write fails."""
    publisher = app.extensions["publisher"]
    publish = publisher.publish

    def publish_then_blip(*args, **kwargs):
        publish(*args, **kwargs)
        publisher.publish = publish  # once
        redis_client.execute_command("CLIENT", "PAUSE", str(milliseconds), "WRITE")

    publisher.publish = publish_then_blip


def _submit(client, key: str, body: dict):
    return client.post("/jobs", json=body, headers={**AUTH, "Idempotency-Key": key})


def _retry_until_not_409(client, key: str, body: dict, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        response = _submit(client, key, body)
        if response.status_code != 409 or time.monotonic() > deadline:
            return response
        assert response.headers["Retry-After"] == "1"
        time.sleep(0.1)


@pytest.fixture
def quick_app(rabbit, redis_node, redis_client, amqp):
    """PUBLISH_TIMEOUT_SECONDS 0.5: a request is over within about 6 s of taking its key."""
    application = create_app(make_settings(rabbit.url, redis_node.url, publish_timeout_seconds=0.5))
    assert application.extensions["publisher"].wait_ready(15)
    yield application
    application.extensions["publisher"].stop()


def test_idempotency_holds_when_the_confirm_write_fails_and_a_worker_has_the_job(
        quick_app, rabbit, redis_node, redis_client, amqp, start_worker):
    """Redis blips after the broker confirmed: the key stays pending. Once a worker has started
    the job, a retry with the same key and body is answered with that job at once."""
    start_worker(rabbit.url, redis_node.url)
    client = quick_app.test_client()
    body = {"type": "echo", "payload": {"order": 1}}
    _pause_store_writes_after_publishing(quick_app, redis_client, 2500)
    first = _submit(client, "blip-1", body)
    assert first.status_code == 202  # accepted: the confirm came before the blip
    again = _retry_until_not_409(client, "blip-1", body, timeout=5)
    assert again.status_code == 202, again.get_json()
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"


@pytest.mark.slow
def test_idempotency_holds_when_the_confirm_write_fails_and_no_worker_runs(
        quick_app, rabbit, redis_node, redis_client, amqp, start_worker):
    """As above with no worker: within the window a retry is 409 (the first request may still be
    in flight); after it, the retry completes the first request's job (same id; its message is
    published again), never a second job. A worker then runs that job once."""
    client = quick_app.test_client()
    body = {"type": "echo", "payload": {"order": 2}}
    _pause_store_writes_after_publishing(quick_app, redis_client, 2500)
    first = _submit(client, "blip-2", body)
    assert first.status_code == 202
    job_id = first.get_json()["id"]
    assert _submit(client, "blip-2", body).status_code == 409
    again = _retry_until_not_409(client, "blip-2", body, timeout=15)
    assert again.status_code == 202, again.get_json()
    assert again.get_json()["id"] == job_id
    assert _submit(client, "blip-2", body).get_json()["id"] == job_id  # and from now on, confirmed
    # Two messages, one job (no other was ever recorded). Not read here: that would make them redeliveries.
    assert queue_depth(amqp, topology.QUEUE) == 2
    assert [key.decode() for key in redis_client.keys("job:*")] == [f"job:{job_id}"]
    worker = start_worker(rabbit.url, redis_node.url)
    record = JobStore.from_url(redis_node.url)
    deadline = time.monotonic() + 20
    while (job := record.get(job_id))["status"] != "succeeded" or queue_depth(amqp, topology.QUEUE):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["attempts"] == 1
    assert worker.proc.process.poll() is None


class _HoldingPops(dict):
    """Stands in for the publisher's pending-confirm table: while `hold` is clear, the loop thread
    matching a confirm waits, so the request sees its message written but never confirmed."""

    def __init__(self, *args):
        super().__init__(*args)
        self.hold = threading.Event()

    def pop(self, *args):
        assert self.hold.wait(30)
        return super().pop(*args)


def test_a_retry_after_an_ambiguous_503_gets_the_same_job(quick_app, redis_client, amqp):
    """The confirm does not come within the timeout although the message was written: 503, and the
    job may run. The key is kept, so a retry with it gets that job, not a second one."""
    publisher = quick_app.extensions["publisher"]
    pending = publisher._pending = _HoldingPops(publisher._pending)
    client = quick_app.test_client()
    body = {"type": "echo", "payload": {"order": 3}}
    try:
        assert _submit(client, "amb-1", body).status_code == 503
    finally:
        pending.hold.set()
    deadline = time.monotonic() + 10
    while queue_depth(amqp, topology.QUEUE) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    queued = amqp.basic_get(topology.QUEUE, auto_ack=False)[1].message_id
    amqp.basic_nack(0, multiple=True, requeue=True)
    again = _retry_until_not_409(client, "amb-1", body, timeout=15)
    assert again.status_code == 202, again.get_json()
    assert again.get_json()["id"] == queued


# Keeps Redis busy (every client waits) for ARGV[1] microseconds.
_BUSY_REDIS = ("local t0 = redis.call('TIME') repeat local t = redis.call('TIME') "
               "until (t[1] - t0[1]) * 1e6 + (t[2] - t0[2]) > tonumber(ARGV[1]) return 1")


def test_a_request_that_gave_up_while_its_job_was_recorded_is_never_published(quick_app, redis_client, amqp):
    """Redis answers the publisher's record late (busy 1.8 s: slower than the request's wait, quicker
    than the store's socket timeout). The request answers 503 before anything reached RabbitMQ:
    that job must never be published, and its record and key go, so a retry with the key creates
    the job anew and it is queued once."""
    client = quick_app.test_client()
    body = {"type": "echo", "payload": {"order": 4}}
    busy = threading.Thread(target=lambda: redis_client.eval(_BUSY_REDIS, 0, 1_800_000))
    busy.start()
    time.sleep(0.1)
    refused = _submit(client, "slow-1", body)
    busy.join()
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.get_json()["detail"] == "the job store is unavailable; this request was not accepted"
    deadline = time.monotonic() + 3  # the loop's pass ends once Redis answers
    while redis_client.keys("job:*") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # long enough for a publish the loop would still make
    assert queue_depth(amqp, topology.QUEUE) == 0, "the job answered 503 was published after its answer"
    assert redis_client.dbsize() == 0, "the unpublished job left its record or key behind"
    again = _submit(client, "slow-1", body)
    assert again.status_code == 202, again.get_json()
    assert queue_depth(amqp, topology.QUEUE) == 1


def test_a_job_read_during_a_store_outage_is_not_said_unaccepted(app, client, monkeypatch):
    """GET /jobs/<id> of an accepted job while Redis is down: 503, retry; not "not accepted"."""
    accepted = client.post("/jobs", json={"type": "echo"}, headers=AUTH)
    assert accepted.status_code == 202

    def down(*_args, **_kwargs):
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(app.extensions["jobs_api"].store, "get", down)
    response = client.get(f"/jobs/{accepted.get_json()['id']}", headers=AUTH)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert response.get_json()["detail"] == "the job store is unavailable; retry"
