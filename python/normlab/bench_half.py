"""Benchmark rows of the half-precision norms (float16, bfloat16), forward.

``run(quick, rounds, stream)`` measures each row in one run, candidates interleaved round by
round (``normlab.bench.measure``), and prints its own table. Columns: normlab's time with
``out=`` preallocated; the memory roofline of the same half-precision bytes with the same
threads; their ratio; normlab's float32 time on the same values and shape (``out=``
preallocated), and half / float32 (half the bytes: the goal is about 0.5x); normlab allocating
its results; PyTorch's time on the same dtype at normlab's thread count and normlab's speed-up
(of the allocating call, as in the other suites).

Rooflines: layer_norm / rms_norm forward read x once and write y once, a parallel copy of
x.nbytes; add_layer_norm reads x and r and writes y and s (``parallel_add_twice``, float32 adds
over the same bytes); a training batch_norm forward is 1.5x the copy (one read for the
statistics, one read and one write to normalize), as in the channel_norms suite.

normlab gets float32 weight/bias (and float32 running statistics for batch_norm). PyTorch gets
zero-copy views of the same half arrays, with weight/bias in the data's dtype for the row norms
(its fused path: F.rms_norm falls back to an unfused graph when they differ) and float32
parameters for batch_norm (its mixed-type kernel, as mixed precision keeps them). The
bfloat16 rows need ``ml_dtypes``; without it only the float16 rows run.
"""

from __future__ import annotations

import sys

import numpy as np

import normlab
from normlab.bench import _fmt_us, _fmt_x, measure, measured_row, roofline_time, rooflines, setup

ROW_SHAPES = [(8192, 768), (2048, 4096), (256, 65536)]
QUICK_ROW_SHAPES = [(8192, 768), (2048, 4096)]
ADD_SHAPE = (8192, 768)
BATCH_SHAPE = (32, 64, 56, 56)  # (N, C, H, W), channels-first
EPS = 1e-5
RMS_EPS = 1e-6


def _half_dtypes() -> dict:
    dtypes = {"float16": np.dtype(np.float16)}
    try:
        import ml_dtypes
    except ImportError:
        return dtypes
    dtypes["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
    return dtypes


def _plan(quick: bool, dtypes: dict) -> list:
    """(op, shape, dtype name) of every row."""
    plan = [(op, shape, name) for shape in (QUICK_ROW_SHAPES if quick else ROW_SHAPES)
            for op in ("layer_norm", "rms_norm") for name in dtypes]
    if "bfloat16" in dtypes:
        plan += [("add_layer_norm", ADD_SHAPE, "bfloat16"), ("batch_norm", BATCH_SHAPE, "bfloat16")]
    return plan


def _torch_view(torch, a):
    """A zero-copy torch tensor of a float16 / bfloat16 / float32 array."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _as_float32(a):
    """The bytes of a half array seen as float32, for the float-only roofline add. For bfloat16
    each float's high half is an element itself, so the floats are normal numbers like the data."""
    return a.reshape(-1).view(np.float32)


def _cases(op, shape, dtype, torch):
    """Candidates of one row and its roofline (kind, scale)."""
    rng = np.random.default_rng(0)
    channels = shape[1] if op == "batch_norm" else shape[-1]
    w = rng.standard_normal(channels, dtype=np.float32)
    b = rng.standard_normal(channels, dtype=np.float32)
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    inputs = [(rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5).astype(dtype)
              for _ in range(2 if op == "add_layer_norm" else 1)]
    inputs32 = [a.astype(np.float32) for a in inputs]  # the same values, in float32
    outputs = ("out", "sum_out") if op == "add_layer_norm" else ("out",)
    norm = {
        "layer_norm": lambda x, **kw: normlab.layer_norm(x, w, b, eps=EPS, **kw),
        "rms_norm": lambda x, **kw: normlab.rms_norm(x, w, eps=RMS_EPS, **kw),
        "add_layer_norm": lambda x, r, **kw: normlab.add_layer_norm(x, r, w, b, eps=EPS, **kw),
        "batch_norm": lambda x, **kw: normlab.batch_norm(x, w, b, rm, rv, eps=EPS, **kw),
    }[op]

    def preallocated(arrays):
        kw = {name: np.empty_like(arrays[0]) for name in outputs}
        return lambda: norm(*arrays, **kw)

    x = inputs[0]
    copy_dst = np.empty_like(x)
    if op == "add_layer_norm":
        roof_args = [_as_float32(a) for a in (*inputs, copy_dst, np.empty_like(x))]
        roofline = rooflines(lambda stream: normlab._core.parallel_add_twice(*roof_args, stream))
        kind, scale = "read 2, write 2", 1.0
    else:
        roofline = rooflines(lambda stream: normlab._core.parallel_copy(x, copy_dst, stream))
        kind, scale = ("1.5x copy", 1.5) if op == "batch_norm" else ("copy", 1.0)
    cand = dict(
        **roofline,
        normlab_out=preallocated(inputs),
        float32_out=preallocated(inputs32),
        normlab=lambda: norm(*inputs),
    )
    if torch is not None:
        F = torch.nn.functional
        tin = [_torch_view(torch, a) for a in inputs]
        if op == "batch_norm":
            tw, tb, trm, trv = (torch.from_numpy(a) for a in (w, b, rm.copy(), rv.copy()))
            cand["torch"] = lambda: F.batch_norm(tin[0], trm, trv, tw, tb, training=True, eps=EPS)
        else:
            tw, tb = (torch.from_numpy(a).to(tin[0].dtype) for a in (w, b))
            cand["torch"] = {
                "layer_norm": lambda: F.layer_norm(tin[0], (channels,), tw, tb, EPS),
                "rms_norm": lambda: F.rms_norm(tin[0], (channels,), tw, RMS_EPS),
                "add_layer_norm": lambda: F.layer_norm(tin[0] + tin[1], (channels,), tw, tb, EPS),
            }[op]
    return cand, kind, scale


def run(quick: bool = False, rounds: int | None = None, stream=None) -> list[dict]:
    stream = stream or sys.stdout  # at call time: redirected or captured output goes there too
    dtypes = _half_dtypes()
    torch, threads, rounds, budget = setup(
        quick, rounds, stream, "" if "bfloat16" in dtypes else "  (no ml_dtypes: float16 only)")
    print(f"{'op':<16}{'dtype':>9}{'shape':>18}{'normlab us':>12}{'roof us':>10}{'vs roof':>9}"
          f"{'f32 us':>10}{'vs f32':>8}{'alloc us':>10}{'torch us':>10}{'vs torch':>10}",
          file=stream)
    rows = []
    for op, shape, name in _plan(quick, dtypes):
        cand, kind, scale = _cases(op, shape, dtypes[name], torch)
        t = measure(cand, rounds, budget)
        roof = roofline_time(t) * scale
        row = measured_row(
            t, roof, op=op, shape=list(shape), dtype=name, threads=threads, roofline_kind=kind,
            float32_out_s=t["float32_out"], vs_float32=t["normlab_out"] / t["float32_out"],
        )
        rows.append(row)
        print(f"{op:<16}{name:>9}{str(tuple(shape)):>18}{_fmt_us(row['normlab_out_s']):>12}"
              f"{_fmt_us(roof):>10}{_fmt_x(row['vs_roofline']):>9}"
              f"{_fmt_us(row['float32_out_s']):>10}{_fmt_x(row['vs_float32']):>8}"
              f"{_fmt_us(row['normlab_s']):>10}{_fmt_us(row['torch_s']):>10}"
              f"{_fmt_x(row['speedup_vs_torch']):>10}", file=stream, flush=True)
    return rows


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
