"""The interleaved protocol's yardstick is the median of this machine's recent sittings."""

import dataclasses
import json
import multiprocessing

import pytest

from nas import interleaved, machine_calibration
from nas.latency import latency_context


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NAS_CACHE", str(tmp_path))
    return tmp_path / machine_calibration.FILE


@pytest.fixture
def one_at_a_time(monkeypatch):
    """A store never young: each process adds one sitting (the window's own behaviour)."""
    monkeypatch.setattr(machine_calibration, "YOUNG", 1)


def context(**kw):
    return latency_context(32, runtime="eager", **kw)


def test_each_process_adds_its_sitting_and_gets_the_median_of_the_kept_ones(cache, one_at_a_time):
    ctx = context()
    got = [machine_calibration.add_sitting(ctx, "mnasnet_a1", 10, lambda v=v: v)
           for v in (10.0, 12.0, 11.0, 30.0)]
    assert got == [10.0, 11.0, 11.0, 11.5]  # one odd sitting (30 ms) moves it little
    assert machine_calibration.sittings(ctx, "mnasnet_a1", 10) == [10.0, 12.0, 11.0, 30.0]


def test_only_the_last_sittings_are_kept(cache, one_at_a_time):
    ctx = context()
    for v in range(1, 21):
        last = machine_calibration.add_sitting(ctx, "mnasnet_a1", 10, lambda v=v: float(v))
    kept = machine_calibration.sittings(ctx, "mnasnet_a1", 10)
    assert kept == [float(v) for v in range(21 - machine_calibration.SITTINGS, 21)]
    assert last == 16.0  # the median of 12..20, not of 1..20


def test_another_context_reference_or_head_keeps_its_own_sittings(cache, one_at_a_time):
    base = context()
    machine_calibration.add_sitting(base, "mnasnet_a1", 10, lambda: 7.0)
    assert machine_calibration.add_sitting(context(threads=2), "mnasnet_a1", 10,
                                           lambda: 4.0) == 4.0
    assert machine_calibration.add_sitting(base, "mobilenet_v2", 10, lambda: 3.0) == 3.0
    assert machine_calibration.add_sitting(base, "mnasnet_a1", 1000, lambda: 9.0) == 9.0
    # the interleaved protocol's name is not part of the reference's own context
    interleaved_ctx = dataclasses.replace(base, protocol="interleaved:mnasnet_a1")
    assert machine_calibration.add_sitting(interleaved_ctx, "mnasnet_a1", 10,
                                           lambda: 8.0) == 7.5
    assert len(json.loads(cache.read_text())) == 4


def test_an_unreadable_store_is_started_again(cache, one_at_a_time):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("{not json")
    assert machine_calibration.add_sitting(context(), "mnasnet_a1", 10, lambda: 5.0) == 5.0
    assert machine_calibration.sittings(context(), "mnasnet_a1", 10) == [5.0]


def _add(value):
    machine_calibration.YOUNG = 1  # a spawned process: the fixture's patch is not here
    return machine_calibration.add_sitting(context(), "mnasnet_a1", 10, lambda: value)


def test_concurrent_processes_lose_no_sitting(cache, one_at_a_time):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_add, [float(v) for v in range(1, 9)])
    assert sorted(machine_calibration.sittings(context(), "mnasnet_a1", 10)) == [
        float(v) for v in range(1, 9)]


def test_a_young_store_is_filled_to_young_sittings_then_one_per_process(cache):
    ctx = context()
    asked = []

    def measure(n):
        asked.append(n)
        return [10.0 + i for i in range(n)]

    assert machine_calibration.add_sittings(ctx, "mnasnet_a1", 10, measure) == 12.0
    assert asked == [machine_calibration.YOUNG] == [5]
    assert machine_calibration.add_sittings(ctx, "mnasnet_a1", 10, measure) == 11.5
    assert asked[1:] == [1]  # a store holding YOUNG adds one at a time
    kept = machine_calibration.sittings(ctx, "mnasnet_a1", 10)
    assert kept == [10.0, 11.0, 12.0, 13.0, 14.0, 10.0]
    # a store holding some but fewer than YOUNG (an older release's) is topped up
    other = context(threads=2)
    for v in (20.0, 22.0):
        machine_calibration.add_sittings(other, "mnasnet_a1", 10, lambda n, v=v: [v] * n)
    asked.clear()
    store = json.loads(cache.read_text())
    key = machine_calibration.context_key(other, "mnasnet_a1", 10)
    store[key] = store[key][:2]
    cache.write_text(json.dumps(store))
    machine_calibration.add_sittings(other, "mnasnet_a1", 10, measure)
    assert asked == [3]


def test_the_interleaved_protocol_calibrates_by_the_machines_sittings(cache):
    ctx = context()
    machine_calibration.add_sitting(ctx, "mnasnet_a1", 10, lambda: 1000.0)  # fills to YOUNG
    interleaved.calibrated_reference_ms.cache_clear()
    try:
        ms = interleaved.calibrated_reference_ms(ctx, "mnasnet_a1", 10)  # a real sitting
    finally:
        interleaved.calibrated_reference_ms.cache_clear()
    kept = machine_calibration.sittings(ctx, "mnasnet_a1", 10)
    assert len(kept) == machine_calibration.YOUNG + 1 and kept[-1] < 1000.0
    assert ms == 1000.0  # the median of the machine's sittings, not the new one alone


def test_a_first_calibration_on_a_machine_times_young_sittings(cache, monkeypatch):
    timed = []
    real = interleaved._protocol

    def counted(*args, **kw):
        result = real(*args, **{**kw, "min_runs": 3, "min_time_s": 0.0, "max_time_s": 0.2})
        timed.append(result.median_ms)
        return result

    monkeypatch.setattr(interleaved, "_protocol", counted)
    interleaved.calibrated_reference_ms.cache_clear()
    try:
        ms = interleaved.calibrated_reference_ms(context(), "mnasnet_a1", 10)
    finally:
        interleaved.calibrated_reference_ms.cache_clear()
    assert len(timed) == machine_calibration.YOUNG
    assert machine_calibration.sittings(context(), "mnasnet_a1", 10) == timed
    assert ms == sorted(timed)[len(timed) // 2]
