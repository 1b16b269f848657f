"""The validator's fast path (jobs_contract.catalog.compile_check) may only ever say
"valid" where jsonschema says valid too; and for the ordinary requests it must say it.
Random and hand-picked instances against every schema of the catalog."""

import random

from jsonschema import Draft202012Validator

from jobs_contract.catalog import Limits, RequestValidator, compile_check, payload_schemas

SAMPLES = [None, True, False, 0, 1, -1, 0.5, 1.0, -0.0, 2**70, 1e308, "", "x", "x" * 1001, [], [1], {}, {"a": 1}]


def random_value(rng: random.Random, depth: int = 0):
    if depth < 2 and rng.random() < 0.3:
        keys = ["type", "payload", "seconds", "ms", "message", "fail_times", "extra"]
        return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice([*SAMPLES, rng.choice(["echo", "sleep", "cpu", "fail", "flaky", "nope"]),
                       rng.uniform(-10, 400), rng.randint(-5, 70_000)])


def schemas():
    limits = Limits()
    yield RequestValidator._ENVELOPE
    yield from payload_schemas(limits).values()
    yield from payload_schemas(Limits(max_sleep_seconds=0, max_cpu_ms=0, max_fail_times=0)).values()


def test_fast_path_never_accepts_what_jsonschema_rejects():
    rng = random.Random(4)
    for schema in schemas():
        fast, slow = compile_check(schema), Draft202012Validator(schema)
        instances = SAMPLES + [random_value(rng) for _ in range(3000)]
        for instance in instances:
            if fast(instance):
                assert slow.is_valid(instance), (schema, instance)


def test_fast_path_takes_the_ordinary_requests():
    validator = RequestValidator(Limits())
    for document in ({"type": "echo", "payload": {"n": 1}}, {"type": "sleep", "payload": {"seconds": 0.5}},
                     {"type": "cpu", "payload": {"ms": 10}}, {"type": "fail"}, {"type": "flaky",
                                                                                 "payload": {"fail_times": 2}}):
        assert validator._envelope_ok(document)
        assert validator._payload_ok[document["type"]](document.get("payload", {}))
        assert validator.validate(document) == (document["type"], document.get("payload", {}))


def test_unknown_keywords_fall_back_to_jsonschema():
    assert not compile_check({"type": "string", "pattern": "^a"})("a")
    assert not compile_check({"type": "array"})([])
