"""gkpd.timing: interleaved rounds, the latency cache file, the environment key, aliases."""

import json
import os
import time
from collections import Counter

import pytest
import torch

from gkpd import latency, timing
from gkpd.plan import latency as plan_latency
from gkpd.timing import CpuContention, LatencyCache


def test_fast_calls_get_rounds_until_they_have_run_min_seconds():
    counts = {"fast": 0, "slow": 0}

    def fast():
        counts["fast"] += 1

    def slow():
        counts["slow"] += 1
        time.sleep(0.002)

    timing.time_interleaved({"fast": fast}, rounds=3, warmup=1, min_seconds=0.01,
                            max_rounds=50)
    assert counts["fast"] == 1 + 50  # a no-op never reaches 10 ms: the cap holds
    timing.time_interleaved({"slow": slow}, rounds=3, warmup=1, min_seconds=0.004)
    assert counts["slow"] == 1 + 3  # 3 rounds of 2 ms already run 6 ms
    counts["slow"] = 0
    timing.time_interleaved({"slow": slow}, rounds=3, warmup=0, min_seconds=0.02)
    # about 20 ms of calls of at least 2 ms (more than 3 unless the sleeps overrun 2.5x)
    assert 4 <= counts["slow"] <= 10
    counts["fast"] = 0
    timing.time_interleaved({"fast": fast}, rounds=3, warmup=0)
    assert counts["fast"] == 3  # no min_seconds: the rounds asked for


def test_each_call_follows_every_other_about_as_often():
    """A call's time depends on the call before it (its caches): no call may always follow
    the same one, as in a rotated order."""
    order = []
    calls = {name: (lambda n=name: order.append(n)) for name in "abcd"}
    timing.time_interleaved(calls, rounds=600, warmup=1)
    timed = order[4:]
    assert order[:4] == list("abcd")  # the warm-up, in the given order
    assert all(timed.count(k) == 600 for k in "abcd")
    assert all(sorted(timed[i:i + 4]) == list("abcd") for i in range(0, len(timed), 4))
    pairs = Counter(zip(timed, timed[1:], strict=False))
    follows = [pairs[(p, k)] for p in "abcd" for k in "abcd" if p != k]
    # 1800 pairs within rounds, 150 of each of the 12 in expectation, and about 37 more of
    # each across rounds (599 pairs, a quarter of them of the same call)
    assert min(follows) > 130 and max(follows) < 250, pairs
    again = []
    timing.time_interleaved({k: (lambda n=k: again.append(n)) for k in "abcd"}, rounds=600,
                            warmup=1)
    assert again == order  # seeded: a rerun times in the same orders
    assert timing.time_interleaved({}, rounds=3) == {}


def test_where_cuda_is_in_use_each_call_is_timed_to_its_kernels_end(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("sync"))
    timing.time_interleaved({"a": lambda: events.append("a")}, rounds=2, warmup=1)
    assert events == ["a", "sync", "a", "sync", "sync", "a", "sync"]


def test_contention_is_the_hosts_busy_time_less_this_processs_own(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    clock = {"wall": 0.0, "own": 0.0}
    tick = os.sysconf("SC_CLK_TCK")

    def host(busy_seconds, idle_seconds=0):  # user, nice, system, idle, iowait, irq, ...
        user = round(busy_seconds * tick)
        idle = round(idle_seconds * tick)
        stat.write_text(f"cpu  {user} 0 0 {idle} {idle} 0 0 0 0 0\ncpu0 ...\n")

    host(100, 50)
    meter = CpuContention(stat, wall=lambda: clock["wall"], own_cpu=lambda: clock["own"])
    # 10 s: the host's cores were busy 25 s, 16 of them this process's threads
    clock.update(wall=10.0, own=16.0)
    host(125, 1000)  # idle and iowait time is not busy time
    assert meter.others_cores() == pytest.approx(0.9)
    meter.start()
    clock.update(wall=20.0, own=26.0)
    host(135)  # quiet: all of the host's busy time was this process's
    assert meter.others_cores() == 0.0
    stat.unlink()
    assert meter.others_cores() is None
    assert CpuContention(tmp_path / "missing").others_cores() is None


def test_free_cores_are_those_others_leave_rounded_and_at_least_one():
    assert timing.free_cores(0.03, cores=2) == 2
    assert timing.free_cores(0.6, cores=2) == 1  # 1.4 left: two threads would wait on each other
    assert timing.free_cores(0.4, cores=2) == 2
    assert timing.free_cores(3.0, cores=2) == 1
    assert timing.free_cores(2.5, cores=8) == 6
    assert timing.free_cores(None, cores=2) is None


def test_cache_ignores_unreadable_files_and_writes_atomically(tmp_path):
    path = tmp_path / "sub" / "latency.json"
    path.parent.mkdir()
    path.write_text("{ not json")
    cache = LatencyCache(path)
    assert cache.entries == {}
    cache.put("k", 0.5)
    cache.save()
    assert LatencyCache(path).get("k") == 0.5
    assert sorted(p.name for p in path.parent.iterdir()) == ["latency.json"]
    path.write_text(json.dumps({"version": 99, "entries": {"k": 1.0}}))
    assert LatencyCache(path).get("k") is None  # another format: not trusted


def test_environment_key_names_torch_device_and_dtype():
    key = timing.environment_key(torch.device("cpu"), torch.float32)
    assert torch.__version__ in key and "cpu" in key and "float32" in key and "threads" in key


def test_old_import_paths_are_aliases():
    assert latency.measure_latency is timing.measure_latency
    assert plan_latency.cpu_model is timing.cpu_model
    assert plan_latency.time_interleaved is timing.time_interleaved
