"""Hand-picked hostile requests against gunicorn main-app (real RabbitMQ and Redis).

tests/integration/test_api.py covers the basic 400/401/404/413/415/422 answers through
Flask's test client; these go through the real server and its HTTP parser: raw bytes,
lying or duplicate headers, huge headers, chunked bodies, traversal in raw paths, deep
nesting, absurd numbers, and the configured limits. Every answer must be a 4xx
problem document (never a 5xx, never a dropped connection), and after the module the
server must still be up with the same worker processes (see conftest.py).
"""

import json
import socket
import time

import pytest
import requests
from abuselib import start_gunicorn, stop_gunicorn
from jsonschema import Draft202012Validator


def raw(api, data: bytes, timeout: float = 10.0, answer: bool = True) -> tuple[int, bytes]:
    """Send raw bytes on a fresh connection; return (status, whole response), or (0, b"")
    when the server closed the connection without answering and answer=False."""
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    response = b"".join(chunks)
    if not response and not answer:
        return 0, response
    assert response.startswith(b"HTTP/1."), f"no HTTP answer: {response[:200]!r}"
    return int(response.split(b" ", 2)[1]), response


def post_raw(api, body: bytes, content_type: bytes = b"application/json", extra: bytes = b"",
             path: bytes = b"/jobs") -> tuple[int, bytes]:
    head = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
            + api.token.encode() + b"\r\nContent-Type: " + content_type + b"\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    return raw(api, head + body)


def submit(api, document, **kwargs) -> requests.Response:
    return api.session.post(f"{api.url}/jobs", data=json.dumps(document), headers={
        **api.auth(), "Content-Type": "application/json"}, timeout=15, **kwargs)


def assert_problem(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    return body


# --- bodies ----------------------------------------------------------------------------------


def test_body_over_the_limit_declared_and_chunked(api):
    big = json.dumps({"type": "echo", "payload": {"s": "x" * 70_000}}).encode()
    assert post_raw(api, big)[0] == 413
    # Chunked, so no Content-Length to refuse it by: still bounded by MAX_BODY_BYTES.
    def chunks():
        for _ in range(40):
            yield b"x" * 4096
    response = api.session.post(f"{api.url}/jobs", data=chunks(), timeout=15,
                                headers={**api.auth(), "Content-Type": "application/json"})
    assert response.status_code == 413, response.text[:300]


def test_content_length_lies(api):
    body = b'{"type": "echo"}'
    # Declares less than it sends: the rest is a (garbage) second request, answered 400 or ignored.
    status, _ = raw(api, b"POST /jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
                    + api.token.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n" + body)
    assert status in (400, 422)
    # Declares more than it sends, then closes its side: never a 5xx or a hang. (gunicorn hands
    # the app the bytes that came, which here are a whole JSON document, so this one is accepted.)
    status, _ = raw(api, b"POST /jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
                    + api.token.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n" + body)
    assert status in (202, 400)
    # Two different Content-Lengths: request smuggling material, refused by gunicorn.
    status, _ = post_raw(api, body, extra=b"Content-Length: 3\r\n")
    assert status == 400
    # Content-Length and Transfer-Encoding together.
    status, _ = post_raw(api, body, extra=b"Transfer-Encoding: chunked\r\n")
    assert status == 400


@pytest.mark.parametrize("depth, status", [(100, 202), (2000, 400), (20_000, 400)])
def test_deep_nesting(api, depth, status):
    body = b'{"type": "echo", "payload": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    assert len(body) < 65536
    code, response = post_raw(api, body)
    assert code == status, response[:300]


def test_every_nesting_depth_up_to_what_orjson_reads(api, rabbit, redis_node):
    """orjson reads JSON 1,024 levels deep but writes only 254: every depth in between must be
    a 422 at validation (never a 500), and no refused request may leave a record or a message.
    Every depth is tried, not samples: the boundaries are where the defects were."""
    import pika
    import redis

    store = redis.Redis.from_url(redis_node.url)
    connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    channel = connection.channel()

    def records_and_messages() -> tuple[int, int]:
        records = sum(1 for _ in store.scan_iter("job:*", count=1000))
        return records, channel.queue_declare("jobs", passive=True).method.message_count

    before = records_and_messages()
    headers = {**api.auth(), "Content-Type": "application/json"}
    unexpected = {}
    for depth in range(1, 1031):  # the payload's depth; the document is two levels deeper
        body = b'{"type": "echo", "payload": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
        status = api.session.post(f"{api.url}/jobs", data=body, headers=headers, timeout=15).status_code
        expected = 202 if depth + 2 <= 254 else 422 if depth + 2 <= 1024 else 400
        if status != expected:
            unexpected[depth] = (status, expected)
    after = records_and_messages()
    connection.close()
    assert not unexpected, f"(status, expected) by depth: {unexpected}"
    accepted = 252
    assert after == (before[0] + accepted, before[1] + accepted), "refused requests left records or messages behind"


def test_huge_strings(api):
    assert post_raw(api, json.dumps({"type": "echo", "payload": {"s": "\u00e9" * 30_000}},
                                    ensure_ascii=False).encode())[0] == 202  # 60 kB of UTF-8
    assert_problem(submit(api, {"type": "fail", "payload": {"message": "x" * 1001}}), 422)
    assert_problem(submit(api, {"type": "x" * 50_000}), 422)
    key = "k" * 10_000  # keys are strings too
    assert submit(api, {"type": "echo", "payload": {key: 1}}).status_code == 202


@pytest.mark.parametrize("body", [
    b'{"type": "echo", "payload": {"s": "\xff\xfe"}}',
    b'\xef\xbb\xbf{"type": "echo"}',  # UTF-8 byte-order mark
    b'{"type": "echo", "payload": {"s": "\xed\xa0\x80"}}',  # an encoded surrogate
    b'{"type": "echo", "payload": {"s": "\\ud800"}}',  # a lone surrogate escape
    b'{"type": "echo"}\x00',
    b'{"type": "echo", "type": "sleep"}',  # duplicate keys: the last wins, so sleep without seconds
    b'{"type": "sleep", "payload": {"seconds": NaN}}',
    b'{"type": "sleep", "payload": {"seconds": Infinity}}',
    b'{"type": "cpu", "payload": {"ms": 100000000000000000000000000000}}',
    b'{"type": "echo", "payload": {"n": 100000000000000000000000000000}}',  # no maximum: a float otherwise
    b"",
    b"null",
    b"[]",
    b'"echo"',
])
def test_bad_json_is_4xx(api, body):
    status, response = post_raw(api, body)
    assert 400 <= status < 500, response[:400]


@pytest.mark.parametrize(("content_type", "expected"), [
    (b"application/json; charset=latin-1", {202}),  # JSON; the ASCII body reads the same either way
    (b"application/" + b"x" * 4000 + b"+json", {202}),  # a +json suffix is JSON
    (b"multipart/form-data; boundary=x", {415}),
    (b"application/json, text/plain", {415}),
    (b"application/jsonx", {415}),
    (b"\xff\xfe", {400, 415}),  # gunicorn may refuse the bytes before the app sees them
])
def test_odd_content_types_are_json_or_refused(api, content_type, expected):
    status, response = post_raw(api, b'{"type": "echo"}', content_type=content_type)
    assert status in expected, response[:300]


# --- headers ---------------------------------------------------------------------------------


def test_huge_and_many_headers(api):
    status, _ = post_raw(api, b'{"type":"echo"}', extra=b"X-Big: " + b"a" * 9000 + b"\r\n")
    assert status in (400, 431)
    status, _ = post_raw(api, b'{"type":"echo"}', extra=b"".join(b"X-H%d: v\r\n" % i for i in range(150)))
    assert status in (400, 431)
    status, _ = raw(api, b"GET /jobs/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status in (400, 414)
    status, _ = raw(api, b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"t" * 8000 + b"\r\n\r\n")
    assert status == 200


def test_duplicate_headers(api):
    wrong = b"Authorization: Bearer wrong-token-0123456789abcdef\r\n"
    # gunicorn joins repeated headers with ", ": two tokens are no valid token.
    status, _ = post_raw(api, b'{"type":"echo"}', extra=wrong)
    assert status == 401
    status, _ = post_raw(api, b'{"type":"echo"}', extra=b"Content-Type: text/plain\r\n")
    assert status in (400, 415)
    status, _ = post_raw(api, b'{"type":"echo"}', extra=b"Idempotency-Key: a\r\nIdempotency-Key: b\r\n")
    assert status in (202, 400)


def test_garbage_requests(api):
    status, _ = raw(api, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, answer=False)  # TLS hello
    assert status == 0 or 400 <= status < 500
    for data in [b"GET / HTTP/9.9\r\n\r\n", b"BREW /jobs HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"GET /jobs/\x00 HTTP/1.1\r\nHost: x\r\n\r\n", b"POST /jobs HTTP/1.1\r\nHost: x\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"]:
        status, response = raw(api, data)
        assert 400 <= status < 500, (data[:40], response[:200])


# --- ids and paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    b"/jobs/../../etc/passwd", b"/jobs/..%2f..%2fetc%2fpasswd", b"/jobs/%2e%2e/%2e%2e/etc/passwd",
    b"/jobs/....//....//etc/passwd", b"/jobs/%00", b"/jobs/%ff%fe", b"/jobs/job:*", b"/jobs/*",
    b"/jobs/00000000-0000-0000-0000-000000000000%0a", b"/jobs/00000000-0000-0000-0000-00000000000G",
    b"/jobs/" + b"%41" * 2000, b"//jobs//x", b"/jobs/x?id=../../etc",
])
def test_traversal_and_odd_ids_are_4xx(api, path):
    data = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer " + \
        api.token.encode() + b"\r\n\r\n"
    status, response = raw(api, data)
    assert status in (400, 404) or (status == 308 and path.startswith(b"//")), response[:300]
    assert b"root:" not in response


# --- limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("job_type, payload", [
    ("sleep", {"seconds": -1}), ("sleep", {"seconds": 301}), ("sleep", {"seconds": 1e308}),
    ("sleep", {"seconds": "1"}), ("sleep", {"seconds": True}), ("sleep", {"seconds": None}),
    ("cpu", {"ms": -1}), ("cpu", {"ms": 60_001}), ("cpu", {"ms": 1.5}), ("cpu", {"ms": 2**62}),
    ("flaky", {"fail_times": -1}), ("flaky", {"fail_times": 21}), ("flaky", {"fail_times": 9_999_999}),
    ("flaky", {"fail_times": 1, "extra": 1}), ("sleep", {"seconds": 1, "__proto__": {}}),
])
def test_absurd_numbers_are_422(api, job_type, payload):
    body = assert_problem(submit(api, {"type": job_type, "payload": payload}), 422)
    assert body["errors"][0]["pointer"].startswith("/payload")


@pytest.fixture(scope="module")
def limited(rabbit, redis_node, tmp_path_factory):
    server = start_gunicorn(rabbit.url, redis_node.url, tmp_path_factory.mktemp("limited"),
                            JOB_MAX_SLEEP_SECONDS="5", JOB_MAX_CPU_MS="100", JOB_MAX_FAIL_TIMES="2",
                            MAX_BODY_BYTES="1024")
    yield server
    stop_gunicorn(server)


def test_limits_are_configurable(limited):
    cases = [("sleep", "seconds", 5, 6), ("cpu", "ms", 100, 101), ("flaky", "fail_times", 2, 3)]
    for job_type, name, ok, too_much in cases:
        assert submit(limited, {"type": job_type, "payload": {name: ok}}).status_code == 202
        assert_problem(submit(limited, {"type": job_type, "payload": {name: too_much}}), 422)
    assert post_raw(limited, json.dumps({"type": "echo", "payload": {"s": "x" * 1100}}).encode())[0] == 413
    # The published document states the same limits.
    document = requests.get(f"{limited.url}/openapi.json", timeout=5).json()
    payloads = {variant["title"]: variant["properties"]["payload"]
                for variant in document["components"]["schemas"]["JobRequest"]["oneOf"]}
    for job_type, name, ok, _ in cases:
        assert payloads[job_type]["properties"][name]["maximum"] == ok, (job_type, payloads[job_type])


# --- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Bearer  ", "Basic dXNlcjpwYXNz", "Token {token}", "Bearer {token}x",
    "Bearer {token_prefix}", "Bearer {token}, Bearer {token}", "bearer{token}", "Bearer\t{token}x",
    "Bearer " + "x" * 7000,
])
def test_bad_tokens_are_401(api, authorization):
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization.format(token=api.token, token_prefix=api.token[:-1])
    response = requests.post(f"{api.url}/jobs", data='{"type":"echo"}', headers=headers, timeout=10)
    body = assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.token not in json.dumps(body)
    response = requests.get(f"{api.url}/jobs/00000000-0000-4000-8000-000000000000", headers=headers, timeout=10)
    assert_problem(response, 401)


def test_scheme_is_case_insensitive_and_other_client_sees_404(api):
    created = requests.post(f"{api.url}/jobs", data='{"type":"echo"}', timeout=10, headers={
        "Authorization": f"bearer {api.token}", "Content-Type": "application/json"})
    assert created.status_code == 202
    job_id = created.json()["id"]
    assert requests.get(f"{api.url}/jobs/{job_id}", headers=api.auth(), timeout=10).status_code == 200
    other = requests.get(f"{api.url}/jobs/{job_id}", headers=api.auth(api.other_token), timeout=10)
    assert_problem(other, 404)
    missing = requests.get(f"{api.url}/jobs/00000000-0000-4000-8000-000000000000", headers=api.auth(), timeout=10)
    assert other.json()["title"] == missing.json()["title"]  # another's job looks like no job at all


def test_token_comparison_is_constant_time():
    """Every configured token is compared, with hmac.compare_digest on equal-length digests,
    whichever token (if any) matches: no early exit, no == on secrets."""
    import hmac

    from main_app import auth

    tokens = tuple(f"token-{n:02d}-0123456789abcdef" for n in range(5))
    authenticator = auth.TokenAuthenticator(tokens)
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    auth.hmac.compare_digest = spy
    try:
        for presented in (tokens[0], tokens[-1], "nope-0123456789abcdef", "x" * 5000):
            calls.clear()
            authenticator.client_for(f"Bearer {presented}")
            assert len(calls) == len(tokens), presented
            assert {pair for pair in calls} == {(32, 32)}
    finally:
        auth.hmac.compare_digest = real


def test_wrong_tokens_take_as_long_as_right_ones(api):
    """A coarse end-to-end check beside the one above: a token that shares all but its last
    character is not answered measurably differently from a random one."""
    session = requests.Session()
    near_token, far_token = f"Bearer {api.token[:-1]}Z", "Bearer " + "Z" * len(api.token)
    samples: dict[str, list[float]] = {near_token: [], far_token: []}
    for _ in range(80):  # interleaved, so machine load hits both alike
        for authorization, values in samples.items():
            started = time.perf_counter()
            session.get(f"{api.url}/jobs/not-a-job", headers={"Authorization": authorization}, timeout=10)
            values.append(time.perf_counter() - started)
    near, far = (sorted(v)[len(v) // 2] for v in samples.values())
    assert abs(near - far) < 0.005, (near, far)


def test_metrics_not_on_the_api_port(api):
    for path in ("/metrics", "/metrics/", "/Metrics", "/metrics?x=1", "/%6detrics"):
        response = requests.get(f"{api.url}{path}", headers=api.auth(), timeout=5)
        assert response.status_code == 404, path
        assert "jobs_api_http_requests_total" not in response.text
    assert "jobs_api_http_requests_total" in requests.get(api.metrics_url, timeout=5).text


# --- the published schema and the validator agree --------------------------------------------


@pytest.mark.parametrize("job_type", ["sleep", "cpu", "flaky"])
def test_documented_valid_requests_are_accepted(api, job_type):
    document = requests.get(f"{api.url}/openapi.json", timeout=5).json()
    schema = {**document["components"]["schemas"]["JobRequest"], "components": document["components"]}
    request = {"type": job_type}
    documented_valid = Draft202012Validator(schema).is_valid(request)
    status = submit(api, request).status_code
    # The document and the API must agree (found by the fuzzer: the document once allowed a
    # missing payload for types whose payload has required fields).
    assert documented_valid == (status == 202), f"document says valid={documented_valid}, the API answered {status}"
