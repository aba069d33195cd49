"""The benchmarks' CPU meter: it reads /proc, and finds the machine's brokers read-only."""

from __future__ import annotations

import math
import os
import sys

import pytest

from benchmarks.procstat import CpuMeter, broker_pids, cpu_seconds

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_cpu_of_this_process_grows_while_it_works() -> None:
    before = cpu_seconds([os.getpid()])
    meter = CpuMeter([os.getpid()])
    meter.start()
    total = 0
    while cpu_seconds([os.getpid()]) - before < 0.05:  # bounded: 50 ms of CPU
        total += sum(range(10_000))
    assert meter.stop() > 0
    assert cpu_seconds([2**22 + 1]) == 0  # a PID that does not exist counts nothing
    assert math.isnan(CpuMeter([]).stop())


def test_the_machine_redis_is_found_by_its_own_word(redis_url: str) -> None:
    pids = broker_pids(redis_url)
    assert len(pids) == 1
    with open(f"/proc/{pids[0]}/cmdline", "rb") as handle:
        assert b"redis" in handle.read()
    assert broker_pids("memory://x") == []
