"""One sample call of every public function, shared by the hardening tests (fork, threads,
memory growth) and CI's LeakSanitizer run: ``python tests/exercise_all.py N`` calls each N times.

``calls(size)`` maps each public function's name to a zero-argument callable returning its
result as a tuple of arrays; "small" inputs run on one thread, "large" ones in parallel.
"""

from __future__ import annotations

import sys

import numpy as np

import normlab

# Public names that are not computations on data.
RUNTIME_FUNCTIONS = {
    "cpu_targets",
    "get_cpu_target",
    "set_cpu_target",
    "get_num_threads",
    "set_num_threads",
    "show_config",
}


def _as_tuple(result):
    if isinstance(result, tuple):
        return tuple(r for r in result if r is not None)
    return (result,)


def _stats_result(stats):
    return tuple(stats[key] for key in sorted(stats))


def _label_result(result):
    labels, count, stats = result
    return (labels, np.array(count)) + _stats_result(stats)


def _norm_calls(x, dy, residual, w, b, img, img_dy, cw, cb) -> dict:
    """One call of every normalization on this data (float32 weights and statistics)."""
    _, mean, rstd = normlab.layer_norm(x, w, b, return_stats=True)
    _, rms_rstd = normlab.rms_norm(x, w, return_stats=True)
    _, s, s_mean, s_rstd = normlab.add_layer_norm(x, residual, w, b, return_stats=True)
    _, _, s_rms_rstd = normlab.add_rms_norm(x, residual, w, return_stats=True)
    _, bn_mean, bn_invstd = normlab.batch_norm(img, cw, cb, return_stats=True)
    _, in_mean, in_rstd = normlab.instance_norm(img, cw, cb, return_stats=True)
    _, gn_mean, gn_rstd = normlab.group_norm(img, 4, cw, cb, return_stats=True)
    return {
        "layer_norm": lambda: normlab.layer_norm(x, w, b, return_stats=True),
        "layer_norm_backward": lambda: normlab.layer_norm_backward(dy, x, mean, rstd, w),
        "rms_norm": lambda: normlab.rms_norm(x, w, return_stats=True),
        "rms_norm_backward": lambda: normlab.rms_norm_backward(dy, x, rms_rstd, w),
        "add_layer_norm": lambda: normlab.add_layer_norm(x, residual, w, b, return_stats=True),
        "add_layer_norm_backward": lambda: normlab.add_layer_norm_backward(dy, s, s_mean, s_rstd, w, ds=dy),
        "add_rms_norm": lambda: normlab.add_rms_norm(x, residual, w, return_stats=True),
        "add_rms_norm_backward": lambda: normlab.add_rms_norm_backward(dy, s, s_rms_rstd, w, ds=dy),
        "batch_norm": lambda: normlab.batch_norm(img, cw, cb, return_stats=True),
        "batch_norm_backward": lambda: normlab.batch_norm_backward(img_dy, img, bn_mean, bn_invstd, cw),
        "instance_norm": lambda: normlab.instance_norm(img, cw, cb, return_stats=True),
        "instance_norm_backward": lambda: normlab.instance_norm_backward(img_dy, img, in_mean, in_rstd, cw),
        "group_norm": lambda: normlab.group_norm(img, 4, cw, cb, return_stats=True),
        "group_norm_backward": lambda: normlab.group_norm_backward(img_dy, img, gn_mean, gn_rstd, 4, cw),
    }


def calls(size: str = "small") -> dict:
    rows, cols = (8, 64) if size == "small" else (512, 512)
    rng = np.random.default_rng(42)
    x = (rng.standard_normal((rows, cols)) * 3 + 1).astype(np.float32)
    dy = rng.standard_normal((rows, cols)).astype(np.float32)
    w = rng.standard_normal(cols).astype(np.float32)
    b = rng.standard_normal(cols).astype(np.float32)
    residual = rng.standard_normal((rows, cols)).astype(np.float32)
    n, c, hw = (2, 8, 6) if size == "small" else (8, 32, 24)
    img = (rng.standard_normal((n, c, hw, hw)) * 2 + 1).astype(np.float32)
    img_dy = rng.standard_normal(img.shape).astype(np.float32)
    cw = rng.standard_normal(c).astype(np.float32)
    cb = rng.standard_normal(c).astype(np.float32)
    # Each norm runs on float32 data and on float16 data (the half-precision kernels).
    data = (x, dy, residual, img, img_dy)
    f32 = _norm_calls(*data[:3], w, b, *data[3:], cw, cb)
    half = [a.astype(np.float16) for a in data]
    f16 = _norm_calls(*half[:3], w, b, *half[3:], cw, cb)
    table = {name: (lambda f=f32[name], g=f16[name]: _as_tuple(f()) + _as_tuple(g())) for name in f32}
    side = 48 if size == "small" else 1024
    mask = rng.random((side, side)) < 0.45
    labels, count = normlab.label(mask)
    table.update(
        {
            "label": lambda: _label_result(normlab.label(mask, 8, return_stats=True)),
            "component_stats": lambda: _stats_result(normlab.component_stats(labels, count)),
            "largest_component": lambda: normlab.largest_component(mask, 4),
            "remove_small_components": lambda: normlab.remove_small_components(mask, 5),
        }
    )
    return {name: (lambda fn=fn: _as_tuple(fn())) for name, fn in table.items()}


def public_functions() -> set:
    return {
        name
        for name in normlab.__all__
        if callable(getattr(normlab, name)) and name not in RUNTIME_FUNCTIONS
    }


def main(argv) -> int:
    repeats = int(argv[0]) if argv else 100
    for size in ("small", "large"):
        for fn in calls(size).values():
            for _ in range(repeats):
                fn()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
