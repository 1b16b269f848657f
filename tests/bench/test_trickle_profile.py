"""`make bench-trickle`'s own logic: perf output parsing, per-job accounting, the API's thread
roles, the busy loops that keep the vCPUs from halting, and the table.
Run by `make test` (pytest.ini's testpaths)."""

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jobs_devtools.bench import bench
from jobs_devtools.bench import trickle_profile as trickle

PERF_SCRIPT = """\
    0  ffffffff8225295b pv_native_safe_halt ([kernel.kallsyms])
 3937  7f1c2a4d5680 _PyEval_EvalFrameDefault (/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0)
 3937  ffffffff8162ba42 finish_task_switch.isra.0 ([kernel.kallsyms])
 3937  7f1c2a4d5690 _PyEval_EvalFrameDefault (/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0)
 3938  7f1c2a4d0000 [unknown] (/usr/lib/x86_64-linux-gnu/libc.so.6)
 3836  55d0c0ffee00 [unknown] (memfd:vmem (deleted))
 4036  7f00deadbeef PyObject_GetAttr (/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0)
"""


def test_samples_by_symbol_counts_only_the_given_processes_and_marks_kernel_symbols():
    kernel_module = " 3937  ffffffffc0a01234 vcpu_enter_guest ([kvm])\n"
    counts = trickle.samples_by_symbol(PERF_SCRIPT + kernel_module, {3937, 3938, 3836})
    assert counts == {"_PyEval_EvalFrameDefault": 2, "finish_task_switch.isra.0 [k]": 1,
                      "vcpu_enter_guest [k]": 1, "[unknown] in libc.so.6": 1,
                      "[unknown] in memfd:vmem (deleted)": 1}


def test_perf_output_that_cannot_be_read_is_an_error_not_an_empty_profile():
    with pytest.raises(ValueError, match="no sample"):
        trickle.samples_by_symbol("3937 some other format\n", {3937})
    assert trickle.samples_by_symbol("", {3937}) == {}  # nothing recorded: nothing to read


def test_grown_lists_the_symbols_whose_cost_per_item_grew_most():
    hz = trickle.PERF_HZ
    before = collections.Counter({"eval": hz, "malloc": hz // 10, "gone": hz // 10})  # 1,000 items
    after = collections.Counter({"eval": hz, "malloc": hz // 10, "new": hz // 20})  # 500 items
    rows = trickle.grown(before, 1000, after, 500, top=3)
    assert [symbol for symbol, _, _ in rows] == ["eval", "malloc", "new"]
    symbol, was, now = rows[0]
    assert was == pytest.approx(1000.0) and now == pytest.approx(2000.0)  # µs per item: 1 s over 1,000, then 500


def test_api_thread_roles_main_then_the_busiest_other_thread_as_the_publisher_loop():
    # 10: the arbiter, whose metrics-server thread (11) is not a publisher loop; 20 and 30: workers
    before = {10: {10: 1.0, 11: 0.0}, 20: {20: 5.0, 21: 10.0, 22: 1.0, 23: 1.0}, 30: {30: 1.0, 31: 2.0, 32: 1.0}}
    after = {10: {10: 1.5, 11: 0.75}, 20: {20: 6.0, 21: 13.0, 22: 2.0, 23: 2.5, 24: 0.5},  # 24: started since
             30: {30: 1.5, 31: 4.0, 32: 1.25}}
    roles = trickle.api_thread_roles(before, after, arbiter=10)
    assert roles == pytest.approx({"arbiter": 0.5 + 0.75, "main": 1.0 + 0.5, "publisher loop": 3.0 + 2.0,
                                   "request threads": 1.0 + 1.5 + 0.5 + 0.25})


def test_the_meter_gives_cpu_per_item_of_each_group_and_of_this_process():
    meter = trickle.Meter({"self": [os.getpid()]})
    meter.start()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    used = meter.per_item(100)  # 0.2 s over 100 items: 2,000 µs each
    for name in ("self", "client"):  # the client is this very process
        assert 1_500 <= used[name]["user"] + used[name]["kernel"] <= 4_000, used


def test_thread_and_process_cpu_grow_with_work_done():
    pid = os.getpid()
    user_before, kernel_before = bench.user_kernel_seconds([pid])
    threads_before = trickle.thread_seconds(pid)
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    user_after, kernel_after = bench.user_kernel_seconds([pid])
    assert user_after + kernel_after >= user_before + kernel_before + 0.05
    assert trickle.thread_seconds(pid)[pid] >= threads_before[pid] + 0.05  # the main thread did it
    assert bench.user_kernel_seconds([2**22 + 1]) == (0.0, 0.0)  # no such process: nothing, no error


def test_the_busy_loops_run_at_the_idle_priority_in_a_group_of_their_own_and_stop_after():
    with trickle.vcpus_kept_from_halting() as spinners:
        assert len(spinners) == len(os.sched_getaffinity(0))
        for spinner in spinners:
            assert os.sched_getscheduler(spinner.pid) == os.SCHED_IDLE
            assert re.search(r"nice 19$", Path(f"/proc/{spinner.pid}/autogroup").read_text().strip())
            assert os.getsid(spinner.pid) == spinner.pid  # a session, so an autogroup, of its own
    assert all(spinner.poll() is not None for spinner in spinners)


def test_table_adds_the_drain_to_saturation_and_shows_the_api_roles():
    def used(user: float, kernel: float, **roles: float) -> dict[str, float]:
        return {"user": user, "kernel": kernel, **roles}

    api_roles = {"arbiter": 5.0, "main": 50.0, "publisher loop": 150.0, "request threads": 800.0}
    r = {"rate": 600, "e2e_p99_ms": [40.0, 60.0], "e2e_busy": [0.9, 0.88],
         "ingest": {"api": used(700, 300, **api_roles), "rabbitmq": used(100, 50), "redis": used(20, 10)},
         "drain": {"worker": used(300, 100), "rabbitmq": used(60, 40), "redis": used(50, 30)},
         "e2e": {"api": used(1000, 400, **api_roles), "worker": used(450, 150), "rabbitmq": used(250, 150),
                 "redis": used(100, 60), "client": used(120, 60)},
         "e2e_no_halt": {"api": used(1000, 350, **api_roles), "worker": used(380, 120), "rabbitmq": used(200, 120),
                         "redis": used(80, 50), "client": used(90, 40)},
         "grown": {"api": [("_PyEval_EvalFrameDefault", 250.0, 380.0)]}}
    text = trickle.table(r)
    assert "| rabbitmq | 250 (160 + 90) | 400 (250 + 150) | 320 (200 + 120) |" in text  # ingest + drain
    assert "| worker | 400 (300 + 100) | 600 (450 + 150) | 500 (380 + 120) |" in text
    assert "| client | – | 180 (120 + 60) | 130 (90 + 40) |" in text  # wrk is not counted under saturation
    assert "| api: publisher loop | 150 | 150 | 150 |" in text
    assert "| all | 1,760 | 2,740 | 2,430 |" in text
    assert "| all but the client | 1,760 | 2,560 | 2,300 |" in text
    assert "p99 40.0, 60.0 ms, machine busy 0.90, 0.88" in text
    assert "250.0 →   380.0  _PyEval_EvalFrameDefault" in text


def test_the_busy_loops_die_with_the_process_that_started_them():
    starter = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from jobs_devtools.bench import trickle_profile
        with trickle_profile.vcpus_kept_from_halting() as spinners:
            print(" ".join(str(s.pid) for s in spinners), flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in starter.stdout.readline().split()]
        assert pids and all(os.path.exists(f"/proc/{pid}") for pid in pids)
    finally:
        starter.send_signal(signal.SIGKILL)  # no cleanup of its own runs
        starter.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_median_of_takes_each_part_of_each_process_across_runs():
    runs = [{"api": {"user": u, "kernel": k, "main": m}} for u, k, m in ((100, 10, 5), (300, 30, 1), (200, 90, 3))]
    assert trickle.median_of(runs) == {"api": {"user": 200, "kernel": 30, "main": 3}}


@pytest.mark.skipif(shutil.which("perf") is None or os.geteuid() != 0, reason="needs perf, as root")
def test_perf_records_every_cpu_while_the_block_runs(tmp_path):
    data = tmp_path / "busy.data"
    with trickle.perf_record(data):
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:
            pass
    samples = trickle.read_samples(data, {os.getpid()})
    assert sum(samples.values()) >= 0.3 * trickle.PERF_HZ * 0.5  # this process was sampled while busy


def test_no_perf_output_means_no_recording(tmp_path):
    with trickle.perf_record(None):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_perf_that_cannot_start_stops_the_run_with_its_exit_code(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "perf"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'perf: no permission' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    ran = False
    with pytest.raises(RuntimeError, match=r"perf did not start \(exit code 3\)"):
        with trickle.perf_record(tmp_path / "out.data"):
            ran = True
    assert not ran  # nothing was measured without it
