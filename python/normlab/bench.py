"""``python -m normlab bench``: normlab against the memory roofline and against its peers.

Every row is measured in one run, candidates interleaved round by round so that machine noise
hits all of them alike; each time is the median over rounds of the mean of a batch of calls.

Columns: normlab's time with ``out=`` preallocated; the roofline, a parallel copy of the same
bytes with the same threads (for backward, reading two arrays and writing one), the faster of
its cached and streamed (non-temporal) stores; their ratio;
normlab's time allocating its results as NumPy and PyTorch do; NumPy's and PyTorch's times
(PyTorch at normlab's thread count) and normlab's speed-up over each. Suites: row_norms,
channel_norms, half (float16 / bfloat16 forward, with normlab's float32 time on the same shape)
and ccl; --only picks some.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import normlab

FULL_SHAPES = [(4096, 64), (8192, 768), (2048, 4096), (256, 65536), (65536, 128)]
QUICK_SHAPES = [(4096, 64), (2048, 4096), (65536, 128)]
OVERHEAD_SHAPE = (4, 64)


def _reps(per_call_s: float, budget_s: float) -> int:
    """Calls in a batch that lasts about budget_s."""
    return max(1, min(100000, int(budget_s / max(per_call_s, 1e-7))))


def _time_batch(fn, reps: int) -> float:
    """Seconds per call, averaged over reps calls."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def rooflines(kernel) -> dict:
    """The two roofline candidates of a row: kernel(stream) with its outputs cached, and
    streamed past the caches. Which is faster depends on the machine and the size (on Intel
    Emerald Rapids cached stores read every output line first); roofline_time() takes the
    faster."""
    return dict(roofline=lambda: kernel(False), roofline_streamed=lambda: kernel(True))


def roofline_time(t: dict) -> float:
    """The faster of the two roofline candidates in measure()'s times."""
    return min(t["roofline"], t["roofline_streamed"])


def measure(candidates: dict, rounds: int, budget_s: float) -> dict:
    """Median seconds per call of each candidate, interleaved round by round. Each batch starts
    with one untimed-for-the-result call (the caches and threads come back from the previous
    candidate) and lasts about budget_s, its size set by the fastest call seen so far: a stalled
    call before a batch (a descheduled thread, seen for 6 ms at a time on a 16-core VM) no
    longer shrinks that batch to one call that may stall again."""
    fastest = {}
    for name, fn in candidates.items():
        fn()  # warm up: page in outputs, start thread pools
        fastest[name] = _time_batch(fn, 1)
    samples = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            fastest[name] = min(fastest[name], _time_batch(fn, 1))
            per_call = _time_batch(fn, _reps(fastest[name], budget_s))
            fastest[name] = min(fastest[name], per_call)
            samples[name].append(per_call)
    return {name: statistics.median(s) for name, s in samples.items()}


# ---- NumPy references (single-threaded, as NumPy is) ----------------------------------------


def _np_layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _np_rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _np_layer_norm_backward(dy, x, mean, rstd, w):
    n = x.shape[-1]
    xhat = (x - mean[:, None]) * rstd[:, None]
    g = dy * w
    dx = rstd[:, None] * (g - g.sum(-1, keepdims=True) / n - xhat * (g * xhat).sum(-1, keepdims=True) / n)
    return dx, (dy * xhat).sum(0), dy.sum(0)


def _np_rms_norm_backward(dy, x, rstd, w):
    n = x.shape[-1]
    xhat = x * rstd[:, None]
    g = dy * w
    dx = rstd[:, None] * (g - xhat * (g * xhat).sum(-1, keepdims=True) / n)
    return dx, (dy * xhat).sum(0)


# ---- workloads ------------------------------------------------------------------------------


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _row_norm_cases(shape, torch):
    rng = np.random.default_rng(0)
    rows, cols = shape
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w = rng.standard_normal(cols, dtype=np.float32)
    b = rng.standard_normal(cols, dtype=np.float32)
    out = np.empty_like(x)
    copy_dst = np.empty_like(x)
    eps = 1e-5
    rms_eps = float(np.finfo(np.float32).eps)
    _, mean, rstd = normlab.layer_norm(x, w, b, return_stats=True)
    _, rms_rstd = normlab.rms_norm(x, w, return_stats=True)

    copy = rooflines(lambda stream: normlab._core.parallel_copy(x, copy_dst, stream))
    add = rooflines(lambda stream: normlab._core.parallel_add(x, dy, copy_dst, stream))
    cases = {
        "layer_norm": dict(
            **copy,
            normlab_out=lambda: normlab.layer_norm(x, w, b, out=out),
            normlab=lambda: normlab.layer_norm(x, w, b),
            numpy=lambda: _np_layer_norm(x, w, b),
        ),
        "layer_norm_backward": dict(
            **add,
            normlab_out=lambda: normlab.layer_norm_backward(dy, x, mean, rstd, w, out=out),
            normlab=lambda: normlab.layer_norm_backward(dy, x, mean, rstd, w),
            numpy=lambda: _np_layer_norm_backward(dy, x, mean, rstd, w),
        ),
        "rms_norm": dict(
            **copy,
            normlab_out=lambda: normlab.rms_norm(x, w, out=out),
            normlab=lambda: normlab.rms_norm(x, w),
            numpy=lambda: _np_rms_norm(x, w, rms_eps),
        ),
        "rms_norm_backward": dict(
            **add,
            normlab_out=lambda: normlab.rms_norm_backward(dy, x, rms_rstd, w, out=out),
            normlab=lambda: normlab.rms_norm_backward(dy, x, rms_rstd, w),
            numpy=lambda: _np_rms_norm_backward(dy, x, rms_rstd, w),
        ),
    }
    # Fused residual add + norm: one pass reading x and r and writing s and y, against normlab's
    # own add then norm, and PyTorch's x + r then norm.
    residual = rng.standard_normal(shape, dtype=np.float32)
    s_out = np.empty_like(x)
    add_twice = rooflines(lambda stream: normlab._core.parallel_add_twice(x, residual, copy_dst, out, stream))

    def unfused_layer():
        s = np.add(x, residual)
        return normlab.layer_norm(s, w, b), s

    def unfused_rms():
        s = np.add(x, residual)
        return normlab.rms_norm(s, w), s

    cases["add_layer_norm"] = dict(
        **add_twice,
        normlab_out=lambda: normlab.add_layer_norm(x, residual, w, b, out=out, sum_out=s_out),
        normlab=lambda: normlab.add_layer_norm(x, residual, w, b),
        numpy=unfused_layer,
    )
    cases["add_rms_norm"] = dict(
        **add_twice,
        normlab_out=lambda: normlab.add_rms_norm(x, residual, w, out=out, sum_out=s_out),
        normlab=lambda: normlab.add_rms_norm(x, residual, w),
        numpy=unfused_rms,
    )
    if torch is not None:
        F = torch.nn.functional
        tx, tdy, tw, tb = (torch.from_numpy(a) for a in (x, dy, w, b))
        tr = torch.from_numpy(residual)
        cases["add_layer_norm"]["torch"] = lambda: F.layer_norm(tx + tr, (cols,), tw, tb, eps)
        cases["add_rms_norm"]["torch"] = lambda: F.rms_norm(tx + tr, (cols,), tw, rms_eps)
        tmean = torch.from_numpy(mean).reshape(rows, 1)
        trstd = torch.from_numpy(rstd).reshape(rows, 1)
        cases["layer_norm"]["torch"] = lambda: F.layer_norm(tx, (cols,), tw, tb, eps)
        cases["layer_norm_backward"]["torch"] = lambda: torch.ops.aten.native_layer_norm_backward(
            tdy, tx, [cols], tmean, trstd, tw, tb, [True, True, True]
        )
        cases["rms_norm"]["torch"] = lambda: F.rms_norm(tx, (cols,), tw, rms_eps)
        # PyTorch has no public CPU kernel for rms_norm's backward: time its autograd graph.
        tx_req = tx.clone().requires_grad_(True)
        tw_req = tw.clone().requires_grad_(True)
        y_rms = F.rms_norm(tx_req, (cols,), tw_req, rms_eps)
        cases["rms_norm_backward"]["torch"] = lambda: torch.autograd.grad(
            y_rms, (tx_req, tw_req), tdy, retain_graph=True
        )
    return cases


def measured_row(t: dict, roofline_s: float, **fields) -> dict:
    """A suite's JSON row: `fields` plus the columns every norm suite has, from measure()'s
    times `t` and the roofline time."""
    return dict(
        fields,
        normlab_out_s=t["normlab_out"],
        normlab_s=t["normlab"],
        roofline_s=roofline_s,
        roofline_cached_s=t["roofline"],
        roofline_streamed_s=t["roofline_streamed"],
        vs_roofline=t["normlab_out"] / roofline_s,
        torch_s=t.get("torch"),
        speedup_vs_torch=t["torch"] / t["normlab"] if "torch" in t else None,
    )


def _fmt_us(seconds):
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _fmt_x(ratio):
    return "-" if ratio is None else f"{ratio:.2f}x"


def setup(quick: bool, rounds: int | None, stream, note: str = ""):
    """What every norm suite starts with: PyTorch (or None) at normlab's thread count, the rounds
    and per-batch budget, and the banner line. Returns (torch, threads, rounds, budget)."""
    torch = _torch()
    threads = normlab.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    print(f"normlab {normlab.__version__}  target={normlab.get_cpu_target()}  threads={threads}  "
          f"torch={'-' if torch is None else torch.__version__}  "
          f"machine={platform.machine()} {os.cpu_count()} cpus{note}", file=stream)
    return torch, threads, rounds or (5 if quick else 9), 0.01 if quick else 0.03


def run(quick: bool = False, rounds: int | None = None, stream=None) -> list[dict]:
    stream = stream or sys.stdout  # at call time: redirected or captured output goes there too
    torch, threads, rounds, budget = setup(quick, rounds, stream)
    rows_out = []
    header = (
        f"{'op':<22}{'shape':>14}{'normlab us':>12}{'copy us':>10}{'vs copy':>9}"
        f"{'alloc us':>10}{'numpy us':>11}{'torch us':>10}{'vs numpy':>10}{'vs torch':>10}"
    )
    print(header, file=stream)
    shapes = (QUICK_SHAPES if quick else FULL_SHAPES) + [OVERHEAD_SHAPE]
    for shape in shapes:
        for op, cand in _row_norm_cases(shape, torch).items():
            if shape == OVERHEAD_SHAPE and (op.endswith("backward") or op.startswith("add_")):
                continue
            t = measure(cand, rounds, budget)
            row = measured_row(
                t,
                roofline_time(t),
                op=op,
                shape=list(shape),
                dtype="float32",
                threads=threads,
                roofline_kind=("read 2, write 2" if op.startswith("add_") else
                               "read 2, write 1" if op.endswith("backward") else "copy"),
                numpy_s=t["numpy"],
                speedup_vs_numpy=t["numpy"] / t["normlab"],
            )
            rows_out.append(row)
            print(
                f"{op:<22}{str(tuple(shape)):>14}{_fmt_us(row['normlab_out_s']):>12}"
                f"{_fmt_us(row['roofline_s']):>10}{_fmt_x(row['vs_roofline']):>9}"
                f"{_fmt_us(row['normlab_s']):>10}{_fmt_us(row['numpy_s']):>11}"
                f"{_fmt_us(row['torch_s']):>10}{_fmt_x(row['speedup_vs_numpy']):>10}"
                f"{_fmt_x(row['speedup_vs_torch']):>10}",
                file=stream,
                flush=True,
            )
    return rows_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the built-in benchmark workload")
    bench.add_argument("--quick", action="store_true", help="a smaller, faster set of rows")
    bench.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")
    bench.add_argument("--threads", type=int, help="threads for normlab and PyTorch")
    bench.add_argument("--rounds", type=int, help="interleaved rounds per row (median taken)")
    bench.add_argument("--only", choices=sorted(SUITES), action="append",
                       help="run only this suite (repeatable)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        normlab.set_num_threads(args.threads)
    results = {}
    for name in args.only or list(SUITES):
        print(f"\n## {name}", flush=True)
        results[name] = SUITES[name](quick=args.quick, rounds=args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"normlab": normlab.__version__, "cpu_target": normlab.get_cpu_target(),
                       "threads": normlab.get_num_threads(), "machine": platform.machine(),
                       "cpus": os.cpu_count(), "suites": results}, f, indent=1)
    return 0


def _channel_suite(quick, rounds):
    from . import bench_channel

    return bench_channel.run(quick=quick, rounds=rounds)


def _ccl_suite(quick, rounds):
    from . import bench_ccl

    return bench_ccl.run(quick=quick, rounds=rounds)


def _half_suite(quick, rounds):
    from . import bench_half

    return bench_half.run(quick=quick, rounds=rounds)


SUITES = {
    "row_norms": run,
    "channel_norms": _channel_suite,
    "half": _half_suite,
    "ccl": _ccl_suite,
}
