"""Least-privilege RabbitMQ users: each app can do its job and nothing else."""

import os
import secrets

import pika
import pika.exceptions
import pytest

from jobs_contract import topology
from jobs_contract.access import MAIN_APP_USER, SERVICE_APP_USER, definitions, password_hash
from jobs_devtools.stack import RabbitNode


@pytest.fixture(scope="module")
def locked_down(tmp_root):
    passwords = {MAIN_APP_USER: secrets.token_urlsafe(16), SERVICE_APP_USER: secrets.token_urlsafe(16)}
    admin = ("admin-" + secrets.token_hex(3), secrets.token_urlsafe(16))
    node = RabbitNode(tmp_root / "rabbitmq-access", name=f"jobs-access-{os.getpid()}", user=admin[0],
                      password=admin[1], definitions=definitions(admin, passwords))
    node.start()
    node.passwords = passwords
    yield node
    node.kill()


def channel_for(node, user: str):
    channel = pika.BlockingConnection(pika.URLParameters(node.url_for(user, node.passwords[user]))).channel()
    channel.confirm_delivery()  # a refused publish then fails at once, not on some later call
    return channel


def refused(action) -> bool:
    try:
        action()
    except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ConnectionClosedByBroker) as exc:
        return exc.reply_code in (403, 530)
    return False


def test_password_hash_matches_rabbitmq_format():
    # RabbitMQ's documented example: salt 908DC60A, password "test12"
    assert password_hash("test12", bytes.fromhex("908DC60A")) == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"


def test_topology_is_loaded_at_boot(locked_down):
    admin = pika.BlockingConnection(pika.URLParameters(locked_down.url)).channel()
    for queue in topology.QUEUES:
        admin.queue_declare(queue.name, passive=True)
    admin.connection.close()


def test_main_app_may_only_publish_to_jobs(locked_down):
    channel = channel_for(locked_down, MAIN_APP_USER)
    channel.basic_publish(topology.EXCHANGE, topology.ROUTING_KEY, b"{}", mandatory=True)
    assert refused(lambda: channel_for(locked_down, MAIN_APP_USER).basic_publish(topology.DELAY_EXCHANGE, "100", b"x"))
    assert refused(lambda: channel_for(locked_down, MAIN_APP_USER).basic_get(topology.QUEUE))
    assert refused(lambda: channel_for(locked_down, MAIN_APP_USER).queue_declare("mine"))
    assert refused(lambda: channel_for(locked_down, MAIN_APP_USER).queue_delete(topology.QUEUE))
    admin = pika.BlockingConnection(pika.URLParameters(locked_down.url)).channel()
    admin.queue_purge(topology.QUEUE)
    admin.connection.close()


def test_service_app_may_only_consume_jobs_and_publish_retries(locked_down):
    channel = channel_for(locked_down, SERVICE_APP_USER)
    channel.basic_get(topology.QUEUE)  # allowed (nothing there)
    channel.basic_publish(topology.DELAY_EXCHANGE, str(topology.DELAY_TIERS_MS[-1]), b"{}", mandatory=True)
    assert refused(lambda: channel_for(locked_down, SERVICE_APP_USER).basic_publish(topology.EXCHANGE, "jobs", b"x"))
    assert refused(lambda: channel_for(locked_down, SERVICE_APP_USER).basic_get(topology.DEAD_LETTER_QUEUE))
    assert refused(lambda: channel_for(locked_down, SERVICE_APP_USER).exchange_declare("mine"))
    admin = pika.BlockingConnection(pika.URLParameters(locked_down.url)).channel()
    admin.queue_purge(topology.delay_queue_name(topology.DELAY_TIERS_MS[-1]))
    admin.connection.close()


def test_the_pipeline_works_with_least_privilege(locked_down, redis_node, redis_client, start_api, start_worker):
    api = start_api(locked_down.url_for(MAIN_APP_USER, locked_down.passwords[MAIN_APP_USER]), redis_node.url,
                    DECLARE_TOPOLOGY="false")
    start_worker(locked_down.url_for(SERVICE_APP_USER, locked_down.passwords[SERVICE_APP_USER]), redis_node.url,
                 DECLARE_TOPOLOGY="false", MAX_ATTEMPTS="2")
    ok = api.submit("flaky", {"fail_times": 1}).json()["id"]
    bad = api.submit("fail", {}).json()["id"]
    assert api.wait_final(ok)["status"] == "succeeded"  # a retry went through jobs.delay
    assert api.wait_final(bad)["status"] == "failed"
    admin = pika.BlockingConnection(pika.URLParameters(locked_down.url)).channel()
    assert admin.queue_declare(topology.DEAD_LETTER_QUEUE, passive=True).method.message_count == 1


def test_definitions_cli_refuses_missing_passwords(monkeypatch, capsys):
    from jobs_contract import access

    for name in ("RABBITMQ_ADMIN_USER", "RABBITMQ_ADMIN_PASSWORD", "RABBITMQ_MAIN_APP_PASSWORD",
                 "RABBITMQ_SERVICE_APP_PASSWORD"):
        monkeypatch.setenv(name, "x" * 20)
    monkeypatch.delenv("RABBITMQ_SERVICE_APP_PASSWORD")
    assert access.main() == 2
    assert "RABBITMQ_SERVICE_APP_PASSWORD is not set" in capsys.readouterr().err

