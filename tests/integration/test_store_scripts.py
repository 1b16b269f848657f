"""The store's scripts run on a connection each thread holds (jobs_contract.store.HeldConnectionScripts):
one connection per thread and per process, and the failures redis-py's Script handles are
handled the same way: a Redis that lost its scripts, a dropped connection, a restart."""

import threading
import uuid

import pytest
import redis

from jobs_contract import JobStore
from jobs_contract.store import HeldConnectionScripts


def _store(url: str) -> JobStore:
    """A store whose connections carry a name of their own (the Redis node is shared by the suite)."""
    return JobStore(redis.Redis.from_url(url, client_name=f"held-{uuid.uuid4().hex[:12]}"))


def _connection_ids(store: JobStore) -> set[str]:
    """The store's connections that ran a script last."""
    name = store.redis.get_connection_kwargs()["client_name"]
    return {client["id"] for client in store.redis.client_list()
            if client["name"] == name and client["cmd"] in ("evalsha", "script|load")}


def test_a_thread_keeps_one_connection_and_threads_do_not_share_one(redis_node, redis_client):
    store = _store(redis_node.url)
    for i in range(5):
        store.create(f"main-{i}", "c", "echo", "t")
    assert len(_connection_ids(store)) == 1
    done = []

    def other_thread() -> None:
        for i in range(5):
            store.create(f"other-{i}", "c", "echo", "t")
        done.append(True)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert done == [True]
    assert len(_connection_ids(store)) == 2
    assert len(redis_client.keys("job:*")) == 10


def test_scripts_are_loaded_again_after_redis_lost_them(redis_node, redis_client):
    store = _store(redis_node.url)
    store.create("before", "c", "echo", "t")
    redis_client.script_flush()  # what a restarted Redis looks like to the client
    store.create("after", "c", "echo", "t")
    assert store.begin("after", "c", "echo", "t") == "queued"
    assert store.get("after")["status"] == "running"


def test_a_connection_killed_by_the_server_is_replaced(redis_node, redis_client):
    store = _store(redis_node.url)
    store.create("first", "c", "echo", "t")
    (held,) = _connection_ids(store)
    redis_client.client_kill_filter(_id=held)
    store.create("second", "c", "echo", "t")  # the idle check finds it closed and reconnects
    assert store.get("second")["status"] == "queued"
    assert held not in _connection_ids(store)


def test_a_script_error_leaves_the_connection_usable(redis_node, redis_client):
    store = _store(redis_node.url)
    redis_client.set("job:not-a-hash", "x")  # a key of the wrong type makes the script fail
    with pytest.raises(redis.ResponseError):
        store.begin("not-a-hash", "c", "echo", "t")
    store.create("next", "c", "echo", "t")
    assert store.get("next")["status"] == "queued"


def test_a_forked_child_does_not_use_its_parents_connection(redis_node, monkeypatch):
    scripts = HeldConnectionScripts(redis.Redis.from_url(redis_node.url))
    parent = scripts._connection()
    assert scripts._connection() is parent
    monkeypatch.setattr("jobs_contract.store.os.getpid", lambda: -1)  # as in a child after fork()
    assert scripts._connection() is not parent
