import pytest

from jobs_contract.backoff import compute_backoff, reconnect_delay
from jobs_contract.settings import ConfigError
from main_app.auth import TokenAuthenticator
from main_app.config import Settings as ApiSettings
from service_app.config import Settings as WorkerSettings

TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-0123456789abcdef"


def test_authenticator_maps_tokens_to_distinct_clients():
    auth = TokenAuthenticator((TOKEN_A, TOKEN_B))
    a, b = auth.client_for(f"Bearer {TOKEN_A}"), auth.client_for(f"bearer {TOKEN_B}")
    assert a and b and a != b
    assert TOKEN_A not in a  # the client id does not reveal the token
    for header in [None, "", "Bearer", "Bearer ", f"Basic {TOKEN_A}", f"Bearer {TOKEN_A}x", "Bearer \udcff"]:
        assert auth.client_for(header) is None


def test_authentication_disabled_is_one_anonymous_client():
    assert TokenAuthenticator((), disabled=True).client_for(None) == "anonymous"


def test_token_check_compares_every_token_in_constant_time(monkeypatch):
    """Timing-safe: a fixed-length digest is compared with hmac.compare_digest against
    every configured token, whichever matches (no early exit, no length leak)."""
    import hmac

    import main_app.auth as auth_module

    tokens = tuple(f"token-{i:02d}-0123456789abcdef" for i in range(5))
    auth = TokenAuthenticator(tokens)
    calls = []
    compare = hmac.compare_digest

    def counting_compare(a, b):
        calls.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting_compare)
    for header in (f"Bearer {tokens[0]}", f"Bearer {tokens[-1]}", "Bearer x", "Bearer " + "y" * 5000):
        calls.clear()
        auth.client_for(header)
        assert calls == [(32, 32)] * len(tokens), header


def test_api_refuses_to_start_without_tokens(monkeypatch):
    monkeypatch.delenv("API_TOKENS", raising=False)
    monkeypatch.delenv("API_TOKENS_FILE", raising=False)
    with pytest.raises(ConfigError, match="no API tokens configured"):
        ApiSettings.from_env()
    monkeypatch.setenv("AUTH_DISABLED", "true")
    assert ApiSettings.from_env().auth_disabled


def test_tokens_from_env_and_file(monkeypatch, tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# tokens\n{TOKEN_B}\n\n")
    monkeypatch.setenv("API_TOKENS", f" {TOKEN_A} ,")
    monkeypatch.setenv("API_TOKENS_FILE", str(path))
    assert ApiSettings.from_env().api_tokens == (TOKEN_A, TOKEN_B)
    monkeypatch.setenv("API_TOKENS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot be read"):
        ApiSettings.from_env()


def test_short_tokens_are_refused(monkeypatch):
    monkeypatch.setenv("API_TOKENS", "short")
    with pytest.raises(ConfigError, match="at least 16"):
        ApiSettings.from_env()


def test_worker_settings_validation(monkeypatch):
    monkeypatch.setenv("WORKER_CONCURRENCY", "4")
    monkeypatch.setenv("WORKER_PREFETCH", "2")
    with pytest.raises(ConfigError, match="WORKER_PREFETCH"):
        WorkerSettings.from_env()
    monkeypatch.setenv("WORKER_PREFETCH", "8")
    monkeypatch.setenv("MAX_REDELIVERIES", "50")
    with pytest.raises(ConfigError, match="MAX_REDELIVERIES must be below"):
        WorkerSettings.from_env()
    monkeypatch.setenv("MAX_REDELIVERIES", "20")
    monkeypatch.setenv("MAX_ATTEMPTS", "0")
    with pytest.raises(ConfigError, match="MAX_ATTEMPTS must be >= 1"):
        WorkerSettings.from_env()


def test_backoff_is_exponential_with_jitter_and_capped():
    for attempt, full in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)]:
        delays = [compute_backoff(attempt, base=1.0, cap=30.0) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 10  # jittered


def test_reconnect_delay_doubles_from_a_quarter_second_to_ten_and_never_overflows():
    for failures, full in [(1, 0.5), (2, 1.0), (6, 10.0), (100_000, 10.0)]:
        delays = [reconnect_delay(failures) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays), failures


def test_a_process_that_never_connected_retries_at_least_every_second():
    """A broker still starting: the apps connect within about a second of it being up."""
    for failures, full in [(1, 0.5), (2, 1.0), (6, 1.0), (100_000, 1.0)]:
        delays = [reconnect_delay(failures, connected_before=False) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays), failures


def test_service_app_ignores_an_inherited_multiprocess_metrics_dir(tmp_path):
    """main-app's PROMETHEUS_MULTIPROC_DIR leaking into a worker (shared env file or
    ConfigMap) must not switch the worker to multiprocess files main-app wipes."""
    import os
    import subprocess
    import sys

    code = ("import service_app.metrics as m; m.JOBS_PROCESSED.labels('echo', 'succeeded').inc();"
            "from prometheus_client import generate_latest, REGISTRY;"
            "assert b'jobs_worker_jobs_processed_total' in generate_latest(REGISTRY)")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
