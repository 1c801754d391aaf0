"""The command line's thread count comes from the cores this process may use (affinity, cgroup quota); a user's
OMP_NUM_THREADS wins."""

from __future__ import annotations

import os

import torch

from ligo_convert import threads


def test_quota_caps_the_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: one whole core
    assert threads.usable_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cores(tmp_path) == 8
    (tmp_path / "cpu.max").unlink()
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu.cfs_period_us").write_text("100000")
    assert threads.usable_cores(tmp_path) == 3
    (v1 / "cpu.cfs_quota_us").write_text("-1")  # unlimited
    assert threads.usable_cores(tmp_path) == 8


def test_affinity_counts_not_the_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert threads.usable_cores(tmp_path) == 1


def test_users_choice_wins(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.configure({"OMP_NUM_THREADS": "1"}) is None
        assert torch.get_num_threads() == before
        monkeypatch.setattr(threads, "usable_cores", lambda: 1)
        assert threads.configure({}) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_busy_cores_are_left_out(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 4\nprocs_blocked 0\n")  # this process and 3 others
    assert threads.busy_elsewhere(stat, samples=3, interval=0) == 3
    stat.write_text("cpu  1 2 3\nprocs_running 1\n")
    assert threads.busy_elsewhere(stat, samples=3, interval=0) == 0
    stat.write_text("no such line\n")
    assert threads.busy_elsewhere(stat, samples=3, interval=0) == 0  # unknown: nothing busy
    assert threads.busy_elsewhere(tmp_path / "missing") == 0
    assert [threads.default_threads(2, b) for b in (0, 1, 2, 5)] == [2, 1, 1, 1]
    assert [threads.default_threads(16, b) for b in (0, 3, 40)] == [16, 13, 1]
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "usable_cores", lambda: 2)
        monkeypatch.setattr(threads, "busy_elsewhere", lambda: 1)
        assert threads.configure({}) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0)
        assert threads.configure({}) == 2 and torch.get_num_threads() == 2
        assert threads.configure({"OMP_NUM_THREADS": "2"}) is None
    finally:
        torch.set_num_threads(before)


def test_median_of_samples_ignores_a_spike(tmp_path, monkeypatch):
    counts = iter([1, 9, 1, 1, 1])  # one sample catches a burst of short-lived threads
    monkeypatch.setattr(threads, "_procs_running", lambda stat: next(counts))
    assert threads.busy_elsewhere(tmp_path, samples=5, interval=0) == 0


def test_busy_time_counts_a_job_whose_threads_are_parked(monkeypatch):
    # the runnable count says nobody else (its threads parked at the samples), the CPUs' busy time says otherwise
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads, "_procs_running", lambda path: 1)
    for (before, after), busy in ((((200, 100), (302, 102)), 2),  # 100 busy ticks of 102 on two CPUs
                                  (((200, 100), (300, 190)), 0),  # 10 % of two cores: none taken
                                  (((200, 100), (300, 140)), 1)):  # 60 % of two cores: one taken
        readings = iter([before, after])  # (all, idle) ticks at the start and the end of the window
        monkeypatch.setattr(threads, "_cpu_times", lambda path, cpus: next(readings))
        assert threads.busy_elsewhere(samples=3, interval=0) == busy


def test_only_the_cpus_this_process_may_use_count(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    stat = tmp_path / "stat"
    stat.write_text("cpu0 90 0 0 10 0 0 0 0\ncpu1 10 0 0 90 0 0 0 0\n")
    assert threads._cpu_times(stat, {1}) == (100, 90)
    assert threads._cpu_times(stat, {5}) is None


def test_onnxruntime_sessions_follow_torchs_count(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from ligo_convert.export import _session

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert threads.session_threads() == n
            session = _session(path, "CPUExecutionProvider")  # the sessions validation, eval and generate open
            assert session.get_session_options().intra_op_num_threads == n
    finally:
        torch.set_num_threads(before)
