"""Benchmark rows of the channel norms (batch_norm, instance_norm, group_norm), float32.

``run(quick, rounds, stream)`` measures each row in one run, candidates interleaved round by
round (``normlab.bench.measure``), and prints its own table. Columns: normlab's time with
``out=`` preallocated; the memory roofline with the same threads; their ratio; normlab
allocating its results; PyTorch's time at normlab's thread count and normlab's speed-up.

Rooflines: a training forward must read x once for the statistics and once more to normalize,
and write y: 1.5x a parallel copy of x. A backward must read dy and x for the sums and again
for dx, and write dx: 5/3 of ``parallel_add`` (two reads, one write). The "vs roof" column is
normlab / roofline (1.00 = at the memory roofline).
"""

from __future__ import annotations

import sys

import numpy as np

import normlab
from normlab.bench import _fmt_us, _fmt_x, measure, measured_row, roofline_time, rooflines, setup

FULL_SHAPES = [(32, 64, 56, 56), (8, 256, 28, 28), (64, 3, 224, 224)]
QUICK_SHAPES = [(32, 64, 56, 56), (8, 256, 28, 28)]
GROUP_SHAPE = (8, 256, 28, 28)
GROUPS = 32


def _cases(shape, channels_last, torch, ops):
    rng = np.random.default_rng(0)
    n, c = shape[:2]
    spatial = shape[2:]
    ax = -1 if channels_last else 1
    xshape = (n, *spatial, c) if channels_last else shape
    x = (rng.standard_normal(xshape, dtype=np.float32) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal(xshape, dtype=np.float32)
    w = rng.standard_normal(c, dtype=np.float32)
    b = rng.standard_normal(c, dtype=np.float32)
    rm = np.zeros(c, np.float32)
    rv = np.ones(c, np.float32)
    out = np.empty_like(x)
    copy_dst = np.empty_like(x)
    copy = rooflines(lambda stream: normlab._core.parallel_copy(x, copy_dst, stream))
    add = rooflines(lambda stream: normlab._core.parallel_add(x, dy, copy_dst, stream))
    cases = {}
    if torch is not None:
        F = torch.nn.functional
        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
        if channels_last:  # an NC... view with channels-last strides, as torch lays them out
            perm = (0, x.ndim - 1, *range(1, x.ndim - 1))
            tx, tdy = tx.permute(perm), tdy.permute(perm)
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    if "batch_norm" in ops:
        _, mean, invstd = normlab.batch_norm(x, w, b, rm.copy(), rv.copy(), channel_axis=ax,
                                             return_stats=True)
        cases["batch_norm"] = dict(
            **copy, scale=1.5,
            normlab_out=lambda: normlab.batch_norm(x, w, b, rm, rv, channel_axis=ax, out=out),
            normlab=lambda: normlab.batch_norm(x, w, b, rm, rv, channel_axis=ax),
        )
        cases["batch_norm_backward"] = dict(
            **add, scale=5 / 3,
            normlab_out=lambda: normlab.batch_norm_backward(dy, x, mean, invstd, w, channel_axis=ax,
                                                            out=out),
            normlab=lambda: normlab.batch_norm_backward(dy, x, mean, invstd, w, channel_axis=ax),
        )
        if torch is not None:
            tmean, tinv = torch.from_numpy(mean), torch.from_numpy(invstd)
            cases["batch_norm"]["torch"] = lambda: F.batch_norm(tx, trm, trv, tw, tb, training=True)
            cases["batch_norm_backward"]["torch"] = lambda: torch.ops.aten.native_batch_norm_backward(
                tdy, tx, tw, trm, trv, tmean, tinv, True, 1e-5, [True, True, True])
    for op, groups in (("group_norm", GROUPS), ("instance_norm", c)):
        if op not in ops:
            continue
        _, mean, rstd = normlab.group_norm(x, groups, w, b, channel_axis=ax, return_stats=True)
        cases[op] = dict(
            **copy, scale=1.5,
            normlab_out=lambda g=groups: normlab.group_norm(x, g, w, b, channel_axis=ax, out=out),
            normlab=lambda g=groups: normlab.group_norm(x, g, w, b, channel_axis=ax),
        )
        cases[op + "_backward"] = dict(
            **add, scale=5 / 3,
            normlab_out=lambda g=groups, m=mean, r=rstd: normlab.group_norm_backward(
                dy, x, m, r, g, w, channel_axis=ax, out=out),
            normlab=lambda g=groups, m=mean, r=rstd: normlab.group_norm_backward(
                dy, x, m, r, g, w, channel_axis=ax),
        )
        if torch is not None:
            hw = int(np.prod(spatial))
            tm, tr = torch.from_numpy(mean), torch.from_numpy(rstd)
            cases[op]["torch"] = lambda g=groups: F.group_norm(tx, g, tw, tb, 1e-5)
            cases[op + "_backward"]["torch"] = lambda g=groups, tm=tm, tr=tr: (
                torch.ops.aten.native_group_norm_backward(tdy, tx, tm, tr, tw, n, c, hw, g,
                                                          [True, True, True]))
    return cases


def run(quick: bool = False, rounds: int | None = None, stream=None) -> list[dict]:
    stream = stream or sys.stdout  # at call time: redirected or captured output goes there too
    torch, threads, rounds, budget = setup(quick, rounds, stream, "  (float32)")
    print(f"{'op':<24}{'shape':>20}{'layout':>7}{'normlab us':>12}{'roof us':>10}{'vs roof':>9}"
          f"{'alloc us':>10}{'torch us':>10}{'vs torch':>10}", file=stream)
    plan = [(s, ("batch_norm",)) for s in (QUICK_SHAPES if quick else FULL_SHAPES)]
    plan.append((GROUP_SHAPE, ("group_norm", "instance_norm")))
    rows = []
    for shape, ops in plan:
        for channels_last in (False, True):
            for op, cand in _cases(shape, channels_last, torch, ops).items():
                scale = cand.pop("scale")
                t = measure(cand, rounds, budget)
                roof = roofline_time(t) * scale
                row = measured_row(
                    t, roof, op=op, shape=list(shape), layout="NSC" if channels_last else "NCS",
                    dtype="float32", threads=threads,
                    roofline_kind="1.5x copy" if scale == 1.5 else "5/3 x add (read 2, write 1)",
                )
                rows.append(row)
                print(f"{op:<24}{str(tuple(shape)):>20}{row['layout']:>7}"
                      f"{_fmt_us(row['normlab_out_s']):>12}{_fmt_us(roof):>10}"
                      f"{_fmt_x(row['vs_roofline']):>9}{_fmt_us(row['normlab_s']):>10}"
                      f"{_fmt_us(row['torch_s']):>10}{_fmt_x(row['speedup_vs_torch']):>10}",
                      file=stream, flush=True)
    return rows


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
