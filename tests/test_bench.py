"""The benchmark's own pieces: the roofline kernels it holds normlab to (cached and streamed,
on every SIMD target) and `python -m normlab bench` end to end on its quick set. Timings are
never asserted; only that the rows are there, complete and consistent."""

import json

import numpy as np
import pytest

import normlab
from normlab import _core
from normlab.bench import main, roofline_time


@pytest.mark.parametrize("stream", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("n", [1, 15, 17, 1000, 4099, 300_001])
@pytest.mark.parametrize("offset", [0, 3])
def test_roofline_kernels_compute_what_they_claim(cpu_target, num_threads, rng, n, offset, stream):
    """Copy, add and add-twice give exact results for every length and alignment, in both store
    modes and with 1 and 2 threads (the streamed loops start at the first aligned vector; add-twice
    streams only where its two outputs line up alike, so out2 is tried both ways)."""
    a = rng.standard_normal(n + offset, dtype=np.float32)[offset:]
    b = rng.standard_normal(n + 1, dtype=np.float32)[1:]
    for threads in (1, 2):
        normlab.set_num_threads(threads)
        out1 = np.full(n + 2, np.nan, np.float32)[2:]
        _core.parallel_copy(a, out1, stream)
        np.testing.assert_array_equal(out1, a)
        _core.parallel_add(a, b, out1, stream)
        np.testing.assert_array_equal(out1, a + b)
        for out2_offset in (1, 2):
            out1[:] = np.nan
            out2 = np.full(n + out2_offset, np.nan, np.float32)[out2_offset:]
            _core.parallel_add_twice(a, b, out1, out2, stream)
            np.testing.assert_array_equal(out1, a + b)
            np.testing.assert_array_equal(out2, a + b)


def test_roofline_copy_of_bytes_that_are_not_whole_floats():
    src = np.arange(4099, dtype=np.uint8)
    for stream in (False, True):
        dst = np.zeros_like(src)
        _core.parallel_copy(src, dst, stream)
        np.testing.assert_array_equal(dst, src)


def test_roofline_time_takes_the_faster_store_mode():
    assert roofline_time({"roofline": 2.0, "roofline_streamed": 1.5, "normlab": 9.0}) == 1.5
    assert roofline_time({"roofline": 1.0, "roofline_streamed": 1.5}) == 1.0


@pytest.fixture
def small_quick_sets(monkeypatch):
    """The quick sets shrunk to small arrays: the harness is what these tests check, and the
    quick set's own sizes took 25 s of the suite (over a minute under the sanitizers)."""
    from normlab import bench, bench_ccl, bench_channel, bench_half

    monkeypatch.setattr(bench, "QUICK_SHAPES", [(256, 64), (16, 4096)])
    monkeypatch.setattr(bench_channel, "QUICK_SHAPES", [(4, 16, 14, 14)])
    monkeypatch.setattr(bench_channel, "GROUP_SHAPE", (2, 64, 14, 14))
    monkeypatch.setattr(bench_half, "QUICK_ROW_SHAPES", [(64, 768)])
    monkeypatch.setattr(bench_half, "ADD_SHAPE", (64, 768))
    monkeypatch.setattr(bench_half, "BATCH_SHAPE", (2, 8, 14, 14))
    full_size = bench_ccl.workloads
    monkeypatch.setattr(bench_ccl, "workloads", lambda quick: [
        (name, None if img is None else np.ascontiguousarray(img[:192, :160]))
        for name, img in full_size(quick)])


@pytest.mark.parametrize("suite", ["row_norms", "channel_norms", "half"])
def test_bench_quick_writes_complete_rows(tmp_path, capfd, small_quick_sets, suite):
    """The main job runs (one round of its quick set, shrunk) and every row it prints carries
    positive times, a roofline that is its kind's multiple of the faster store mode, and their
    ratio."""
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--rounds", "1", "--only", suite, "--json", str(path)]) == 0
    printed = capfd.readouterr().out
    report = json.loads(path.read_text())
    assert report["cpu_target"] == normlab.get_cpu_target()
    rows = report["suites"][suite]
    assert rows and len(printed.strip().splitlines()) >= len(rows) + 2
    for row in rows:
        assert row["normlab_out_s"] > 0 and row["normlab_s"] > 0 and row["roofline_s"] > 0
        assert row["vs_roofline"] == pytest.approx(row["normlab_out_s"] / row["roofline_s"])
        fastest = min(row["roofline_cached_s"], row["roofline_streamed_s"])
        scale = {"1.5x copy": 1.5, "5/3 x add (read 2, write 1)": 5 / 3}.get(row["roofline_kind"], 1.0)
        assert row["roofline_s"] == pytest.approx(scale * fastest)
        assert row["op"] in printed


def test_bench_quick_ccl_rows(tmp_path, capfd, small_quick_sets):
    """The labelling suite (its quick images, cropped): a row per image, connectivity and stats
    flag, with normlab's times and a speed-up for every peer that ran."""
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--rounds", "1", "--only", "ccl", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["suites"]["ccl"]
    assert {(r["image"], r["connectivity"], r["stats"]) for r in rows} == {
        (r["image"], c, s) for r in rows for c in (4, 8) for s in (False, True)}
    for row in rows:
        assert row["normlab_s"] > 0 and row["normlab_out_s"] > 0 and row["components"] > 0
        for peer in ("opencv", "scipy", "skimage", "cc3d"):
            if row[f"{peer}_s"] is not None:
                assert row[f"speedup_vs_{peer}"] == pytest.approx(row[f"{peer}_s"] / row["normlab_s"])
    assert "label" in capfd.readouterr().out


def test_measure_batches_stay_full_after_a_stalled_call(monkeypatch):
    """A candidate whose call before each batch stalls (50 ms, and the call after it too, as
    when a thread is descheduled) is timed at about its usual 1 ms: the batch size comes from
    the fastest call seen, so the stall is averaged over a full batch and the median drops it.
    A fake clock, advanced by the candidate, makes this exact."""
    from normlab import bench

    clock = {"now": 0.0, "calls": 0}
    stalled = set()

    def candidate():
        clock["calls"] += 1
        clock["now"] += 0.05 if clock["calls"] in stalled else 0.001

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])
    # Warm-up and first probe: calls 1-2. Round 1: probe 3, then a batch of 30 (calls 4-33).
    # Every later round's probe and the call after it stall.
    call = 33
    for _ in range(4):
        stalled.update({call + 1, call + 2})
        call += 1 + 30
    t = bench.measure({"x": candidate}, rounds=5, budget_s=0.03)
    assert clock["calls"] == 2 + 5 * 31
    assert t["x"] == pytest.approx((0.05 + 29 * 0.001) / 30)
