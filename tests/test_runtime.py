"""SIMD target selection, the thread count, threadpoolctl, and calls from several threads."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import threadpoolctl  # a dependency of normlab

import normlab

PACKAGE_DIR = str(pathlib.Path(normlab.__file__).resolve().parent.parent)


def run_python(code, **env_overrides):
    """Runs `code` in a fresh interpreter that imports this normlab; returns its stdout and
    stderr. env_overrides maps variable -> value, or -> None to remove it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_DIR, env.get("PYTHONPATH")) if p)
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


# --------------------------------------------------------------------------------------------
# CPU targets
# --------------------------------------------------------------------------------------------


def test_cpu_targets_lists_supported_targets():
    targets = normlab.cpu_targets()
    assert isinstance(targets, list) and targets
    assert all(isinstance(t, str) for t in targets)
    assert targets[0] == "baseline"
    assert len(set(targets)) == len(targets)
    assert normlab.get_cpu_target() in targets
    assert normlab.cpu_targets() is not targets  # a fresh list: callers may modify theirs


def test_best_target_is_active_at_import():
    code = """
        import json, normlab
        print(json.dumps([normlab.cpu_targets(), normlab.get_cpu_target()]))
    """
    out, err = run_python(code, NORMLAB_CPU_TARGET=None)
    targets, active = json.loads(out)
    assert targets == normlab.cpu_targets()
    assert active == targets[-1]
    assert "Warning" not in err


def test_set_cpu_target_round_trips(cpu_target):
    for name in normlab.cpu_targets():
        normlab.set_cpu_target(name)
        assert normlab.get_cpu_target() == name
        x = np.linspace(-1, 1, 40).reshape(4, 10)
        np.testing.assert_allclose(normlab.layer_norm(x).mean(axis=-1), 0, atol=1e-12)
    normlab.set_cpu_target(cpu_target)
    assert normlab.get_cpu_target() == cpu_target


def test_set_cpu_target_rejects_bad_names():
    before = normlab.get_cpu_target()
    for bad in ("", "sse9", "AVX2", "avx2 ", "native"):
        with pytest.raises(ValueError, match="target"):
            normlab.set_cpu_target(bad)
        assert normlab.get_cpu_target() == before
    for bad in (None, 1, b"baseline", ["baseline"]):
        with pytest.raises(TypeError, match="name"):
            normlab.set_cpu_target(bad)
        assert normlab.get_cpu_target() == before


def test_env_selects_baseline():
    code = """
        import normlab
        print(normlab.get_cpu_target())
    """
    out, err = run_python(code, NORMLAB_CPU_TARGET="baseline")
    assert out.strip() == "baseline"
    assert "Warning" not in err


@pytest.mark.parametrize("target", ["avx2", "avx512", "avx512bf16"])
def test_env_caps_at_a_supported_target(target):
    """A compiled target the CPU lacks caps to the best supported one below it."""
    code = """
        import json, normlab
        print(json.dumps([normlab.get_cpu_target(), normlab.cpu_targets()]))
    """
    out, _ = run_python(code, NORMLAB_CPU_TARGET=target)
    active, targets = json.loads(out)
    compiled = list(normlab._core.compiled_cpu_targets())
    if target not in compiled:
        assert active == targets[-1]  # not compiled: rejected, best target used
    elif target in targets:
        assert active == target
    else:
        order = compiled[: compiled.index(target) + 1]
        assert active == [t for t in order if t in targets][-1]


def test_env_invalid_value_warns_and_falls_back():
    code = """
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import normlab
        print(json.dumps({
            "target": normlab.get_cpu_target(),
            "best": normlab.cpu_targets()[-1],
            "warnings": [(w.category.__name__, str(w.message)) for w in caught],
        }))
    """
    out, _ = run_python(code, NORMLAB_CPU_TARGET="bogus")
    result = json.loads(out)
    assert result["target"] == result["best"]
    relevant = [w for w in result["warnings"] if "NORMLAB_CPU_TARGET" in w[1]]
    assert len(relevant) == 1
    category, message = relevant[0]
    assert category == "RuntimeWarning"
    assert "bogus" in message


# --------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------


@pytest.mark.openmp
def test_omp_num_threads_sets_the_default():
    code = """
        import normlab
        print(normlab.get_num_threads())
    """
    out, _ = run_python(code, OMP_NUM_THREADS="3")
    assert out.strip() == "3"


@pytest.mark.openmp
def test_set_num_threads_round_trips(num_threads):
    for n in (1, 3, 2, np.int64(4)):
        normlab.set_num_threads(n)
        assert normlab.get_num_threads() == n
        assert type(normlab.get_num_threads()) is int


@pytest.mark.parametrize("bad", [0, -1, -(2**40)])
def test_set_num_threads_rejects_bad_values(num_threads, bad):
    before = normlab.get_num_threads()
    with pytest.raises(ValueError, match=r"\bn\b"):
        normlab.set_num_threads(bad)
    assert normlab.get_num_threads() == before


@pytest.mark.parametrize("bad", ["2", 2.0, None, True, [2]])
def test_set_num_threads_rejects_bad_types(num_threads, bad):
    before = normlab.get_num_threads()
    with pytest.raises(TypeError, match=r"\bn\b"):
        normlab.set_num_threads(bad)
    assert normlab.get_num_threads() == before


@pytest.mark.openmp
def test_threadpoolctl_limits_normlab(num_threads):
    normlab.set_num_threads(2)
    info = threadpoolctl.threadpool_info()
    entries = [e for e in info if e.get("internal_api") == "normlab"]
    assert len(entries) == 1, info
    assert entries[0]["num_threads"] == 2
    assert entries[0]["user_api"] == "openmp"
    # normlab's OpenMP runtime itself (GNU libgomp, bundled in the wheel as libgomp-<hash>.so)
    core = pathlib.Path(normlab._core.__file__).resolve()
    runtimes = [e for e in info if e.get("internal_api") == "openmp"]
    assert any(pathlib.Path(e["filepath"]).name.startswith("libgomp") for e in runtimes), info
    assert core.exists()
    with threadpoolctl.threadpool_limits(1):
        assert normlab.get_num_threads() == 1
    assert normlab.get_num_threads() == 2
    with threadpoolctl.threadpool_limits(limits=3, user_api="openmp"):
        assert normlab.get_num_threads() == 3
    assert normlab.get_num_threads() == 2


@pytest.mark.openmp
def test_thread_count_is_shared_between_python_threads(num_threads):
    normlab.set_num_threads(1)
    seen = []
    ready, go = threading.Event(), threading.Event()

    def reader():
        ready.set()
        go.wait(30)
        seen.append(normlab.get_num_threads())

    t = threading.Thread(target=reader)
    t.start()
    ready.wait(30)
    normlab.set_num_threads(3)
    go.set()
    t.join(30)
    assert seen == [3]

    def writer():
        normlab.set_num_threads(2)

    t = threading.Thread(target=writer)
    t.start()
    t.join(30)
    assert normlab.get_num_threads() == 2


@pytest.mark.skipif(not normlab._core.openmp, reason="tests the build with OpenMP")
def test_set_num_threads_is_silent_with_openmp(num_threads):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normlab.set_num_threads(2)
    assert normlab._core.openmp_version() > 0


@pytest.mark.skipif(normlab._core.openmp, reason="tests the build without OpenMP")
def test_build_without_openmp_runs_one_thread_and_says_so(num_threads):
    """AppleClang without libomp (or NORMLAB_OPENMP=OFF) builds a single-threaded normlab: asking
    for threads warns, the count stays 1 everywhere, and the results are those of one thread."""
    assert normlab._core.openmp_version() == 0
    x = np.random.default_rng(3).standard_normal((2048, 512)).astype(np.float32)
    expected = normlab.layer_norm(x)
    with pytest.warns(RuntimeWarning, match="built without OpenMP"):
        normlab.set_num_threads(4)
    assert normlab.get_num_threads() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normlab.set_num_threads(1)  # one thread is what it has: no warning
    entries = [e for e in threadpoolctl.threadpool_info() if e.get("internal_api") == "normlab"]
    assert len(entries) == 1 and entries[0]["num_threads"] == 1
    with threadpoolctl.threadpool_limits(3):
        assert normlab.get_num_threads() == 1
    assert np.array_equal(normlab.layer_norm(x), expected)
    out, _ = run_python("import normlab; print(normlab.get_num_threads())", OMP_NUM_THREADS="3")
    assert out.strip() == "1"


def test_concurrent_calls_match_serial_calls(num_threads):
    """Several Python threads in the kernels at once (the GIL is released there) get exactly
    the results of serial calls."""
    normlab.set_num_threads(2)
    rng = np.random.default_rng(7)
    xs = [(rng.standard_normal((512, 1024)) + i).astype(np.float32) for i in range(4)]
    weight = rng.standard_normal(1024).astype(np.float32)
    bias = rng.standard_normal(1024).astype(np.float32)

    def work(x):
        y, mean, rstd = normlab.layer_norm(x, weight, bias, return_stats=True)
        dx, dweight, dbias = normlab.layer_norm_backward(y, x, mean, rstd, weight)
        r = normlab.rms_norm(x, weight)
        return [y, mean, rstd, dx, dweight, dbias, r]

    expected = [work(x) for x in xs]
    results = {}
    errors = []
    barrier = threading.Barrier(len(xs))

    def thread_main(i):
        try:
            barrier.wait(30)
            for _ in range(3):
                results.setdefault(i, []).append(work(xs[i]))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=thread_main, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, runs in results.items():
        for got in runs:
            for a, b in zip(got, expected[i]):
                assert np.array_equal(a, b)
    assert sorted(results) == list(range(len(xs)))


def test_forked_child_runs_single_threaded_without_hanging():
    """After the parent has used its OpenMP team, a fork()ed child still computes (on one
    thread) instead of deadlocking in GNU libgomp."""
    code = """
        import os, sys, numpy as np, normlab
        normlab.set_num_threads(2)
        x = np.random.default_rng(0).standard_normal((2048, 512))
        y = normlab.layer_norm(x)   # large enough to run in parallel
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                ok = normlab.get_num_threads() == 1 and np.array_equal(normlab.layer_norm(x), y)
                os.write(w, b"ok" if ok else b"bad")
            finally:
                os._exit(0)
        os.close(w)
        answer = os.read(r, 16)
        os.waitpid(pid, 0)
        print(answer.decode())
        print(normlab.get_num_threads())
    """
    out, _ = run_python(code)
    assert out.split() == ["ok", "2" if normlab._core.openmp else "1"]
