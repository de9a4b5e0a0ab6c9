"""A table of bad calls across the public API, run in a subprocess so a crash fails the test:
each must raise TypeError, ValueError or OverflowError with a message naming the argument."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import normlab

PACKAGE_DIR = str(pathlib.Path(normlab.__file__).resolve().parent.parent)

# (call, expected exception, word the message must contain). Calls are Python source run with
# `np`, `nl` (normlab) and the arrays below in scope.
SETUP = """
import numpy as np, normlab as nl
x = np.ones((4, 8), np.float32)
x64 = np.ones((4, 8))
img = np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32)
c4 = np.ones(4, np.float32)
mask = np.zeros((6, 6), bool)
w = np.ones(8, np.float32)
b = np.zeros(8, np.float32)
stats1 = np.ones(4, np.float32)
import ml_dtypes
bf16 = ml_dtypes.bfloat16
h = np.ones((4, 8), np.float16)
hb = np.ones((4, 8), bf16)
"""

BAD_CALLS = [
    # x: type, dtype, rank
    ("nl.layer_norm([[1.0, 2.0]])", TypeError, "x"),
    ("nl.layer_norm(3.0)", TypeError, "x"),
    ("nl.layer_norm(np.ones((2, 3), np.int32))", TypeError, "x"),
    ("nl.layer_norm(np.ones((2, 3), np.complex64))", TypeError, "x"),
    ("nl.layer_norm(np.ones((2, 3), object))", TypeError, "x"),
    ("nl.layer_norm(np.ones((2, 3), np.int16))", TypeError, "x"),
    ("nl.layer_norm(np.ones((2, 3), '>f2'))", TypeError, "x"),
    # half data: weight float32 or x's dtype; stats float32; every data array x's dtype
    ("nl.layer_norm(h, np.ones(8))", TypeError, "weight"),
    ("nl.layer_norm(h, np.ones(8, bf16))", TypeError, "weight"),
    ("nl.layer_norm(h, None, np.ones(8, np.float64))", TypeError, "bias"),
    ("nl.layer_norm(h, out=np.empty((4, 8), bf16))", TypeError, "out"),
    ("nl.layer_norm(hb, out=np.empty((4, 8), np.float16))", TypeError, "out"),
    ("nl.layer_norm_backward(x, h, stats1, stats1)", TypeError, "dy"),
    ("nl.layer_norm_backward(h, h, stats1.astype(np.float16), stats1)", TypeError, "mean"),
    ("nl.rms_norm_backward(hb, hb, stats1.astype(bf16))", TypeError, "rstd"),
    ("nl.add_layer_norm(h, hb)", TypeError, "residual"),
    ("nl.add_rms_norm(hb, hb, sum_out=np.empty((4, 8), np.float32))", TypeError, "sum_out"),
    ("nl.batch_norm(img.astype(bf16), running_mean=c4.astype(bf16), running_var=c4)", TypeError, "running_mean"),
    ("nl.group_norm(img.astype(np.float16), 2, c4.astype(np.float64))", TypeError, "weight"),
    ("nl.instance_norm_backward(img.astype(bf16), img.astype(bf16), np.ones((2, 4), bf16), np.ones((2, 4), np.float32))", TypeError, "mean"),
    ("nl.layer_norm(np.ones((2, 3), '>f4'))", TypeError, "x"),
    ("nl.layer_norm(np.float32(1.0))", TypeError, "x"),
    ("nl.layer_norm(np.array(1.0, np.float32))", ValueError, "x"),
    ("nl.rms_norm(np.ones(3, bool))", TypeError, "x"),
    ("nl.rms_norm(None)", TypeError, "x"),
    # weight / bias
    ("nl.layer_norm(x, np.ones(7, np.float32))", ValueError, "weight"),
    ("nl.layer_norm(x, w.astype(np.float64))", TypeError, "weight"),
    ("nl.layer_norm(x, [1.0] * 8)", TypeError, "weight"),
    ("nl.layer_norm(x, w, np.ones((1, 8), np.float32))", ValueError, "bias"),
    ("nl.layer_norm(x, w, b.astype(np.int64))", TypeError, "bias"),
    ("nl.rms_norm(x, np.ones(9, np.float32))", ValueError, "weight"),
    # eps, axis, flags
    ("nl.layer_norm(x, eps=0)", ValueError, "eps"),
    ("nl.layer_norm(x, eps=-1e-5)", ValueError, "eps"),
    ("nl.layer_norm(x, eps=float('nan'))", ValueError, "eps"),
    ("nl.layer_norm(x, eps=float('inf'))", ValueError, "eps"),
    ("nl.layer_norm(x, eps='1e-5')", TypeError, "eps"),
    ("nl.layer_norm(x, eps=10**400)", OverflowError, "eps"),
    ("nl.rms_norm(x, eps=0.0)", ValueError, "eps"),
    ("nl.layer_norm(x, axis=0)", ValueError, "axis"),
    ("nl.layer_norm(x, axis=(-1, -1))", ValueError, "axis"),
    ("nl.layer_norm(x, axis=2)", ValueError, "axis"),
    ("nl.layer_norm(x, axis=1.0)", TypeError, "axis"),
    ("nl.layer_norm(x, axis=True)", TypeError, "axis"),
    ("nl.layer_norm(x, axis=())", TypeError, "axis"),
    ("nl.layer_norm(np.ones((3, 0), np.float32))", ValueError, "axis"),
    ("nl.layer_norm(x, return_stats='yes')", TypeError, "return_stats"),
    # out=
    ("nl.layer_norm(x, out=np.empty((4, 8)))", TypeError, "out"),
    ("nl.layer_norm(x, out=np.empty((4, 9), np.float32))", ValueError, "out"),
    ("nl.layer_norm(x, out=np.empty((8, 4), np.float32).T)", ValueError, "out"),
    ("o = np.empty((4, 8), np.float32); o.flags.writeable = False; nl.layer_norm(x, out=o)", ValueError, "out"),
    ("nl.layer_norm(x, out=x)", ValueError, "out"),
    ("nl.rms_norm(x, w, out=x[::-1][::-1])", ValueError, "out"),
    ("base = np.ones(64, np.float32); nl.rms_norm(base[::2].reshape(4, 8), out=base[32:].reshape(4, 8))",
     ValueError, "out"),
    ("nl.layer_norm(x, out=[[0.0] * 8] * 4)", TypeError, "out"),
    # backward
    ("nl.layer_norm_backward(np.ones((4, 7), np.float32), x, stats1, stats1)", ValueError, "dy"),
    ("nl.layer_norm_backward(x, x, np.ones(5, np.float32), stats1)", ValueError, "mean"),
    ("nl.layer_norm_backward(x, x, stats1, stats1.astype(np.float64))", TypeError, "rstd"),
    ("nl.layer_norm_backward(x.astype(np.float64), x, stats1, stats1)", TypeError, "dy"),
    ("nl.layer_norm_backward(x, x, stats1, stats1, np.ones(3, np.float32))", ValueError, "weight"),
    ("nl.layer_norm_backward(x, x, stats1, stats1, out=x)", ValueError, "out"),
    ("nl.rms_norm_backward(x, x, np.ones((4, 1), np.float32))", ValueError, "rstd"),
    ("nl.rms_norm_backward(x, x64, stats1)", TypeError, "dy"),
    # fused add + norm
    ("nl.add_layer_norm(x, x64)", TypeError, "residual"),
    ("nl.add_layer_norm(x, np.ones((4, 7), np.float32))", ValueError, "residual"),
    ("nl.add_layer_norm(x, x.copy(), sum_out=np.empty((4, 8), np.float64))", TypeError, "sum_out"),
    ("r = x.copy(); nl.add_rms_norm(x, r, out=r)", ValueError, "out"),
    ("nl.add_rms_norm_backward(x, x, stats1, ds=np.ones((4, 9), np.float32))", ValueError, "ds"),
    # channel norms
    ("nl.batch_norm(img, np.ones(3, np.float32))", ValueError, "weight"),
    ("nl.batch_norm(img, running_mean=c4, running_var=np.ones(5, np.float32))", ValueError, "running_var"),
    ("rm = c4.copy(); rm.flags.writeable = False; nl.batch_norm(img, running_mean=rm, running_var=c4.copy())",
     ValueError, "running_mean"),
    ("nl.batch_norm(img, momentum=1.5, running_mean=c4.copy(), running_var=c4.copy())", ValueError, "momentum"),
    ("nl.batch_norm(img, momentum=10**400, running_mean=c4.copy(), running_var=c4.copy())", ValueError, "momentum"),
    ("nl.batch_norm(img, momentum=True, running_mean=c4.copy(), running_var=c4.copy())", TypeError, "momentum"),
    ("nl.batch_norm(img, training=False)", ValueError, "running"),
    ("nl.batch_norm(np.ones((1, 4), np.float32))", ValueError, "channel"),
    ("nl.group_norm(img, 3)", ValueError, "num_groups"),
    ("nl.group_norm(img, 0)", ValueError, "num_groups"),
    ("nl.group_norm(img, 2.0)", TypeError, "num_groups"),
    ("nl.instance_norm(img, channel_axis=2)", ValueError, "channel_axis"),
    ("nl.instance_norm(img.astype(np.int32))", TypeError, "x"),
    ("nl.group_norm_backward(img, img, np.ones((2, 2), np.float32), np.ones((2, 3), np.float32), 2)", ValueError, "rstd"),
    # connected components
    ("nl.label(np.zeros((2, 3, 4), bool))", TypeError, "image"),
    ("nl.label(np.zeros((4, 4), np.float32))", TypeError, "image"),
    ("nl.label([[0, 1], [1, 0]])", TypeError, "image"),
    ("nl.label(mask, 5)", ValueError, "connectivity"),
    ("nl.label(mask, dtype=np.float32)", TypeError, "dtype"),
    ("nl.label(mask, out=np.zeros((6, 5), np.int32))", ValueError, "out"),
    ("o = np.zeros((6, 6), np.int32); o.flags.writeable = False; nl.label(mask, out=o)", ValueError, "out"),
    ("nl.label(np.indices((400, 400)).sum(0) % 2 == 0, 4, dtype=np.uint16)", OverflowError, "uint16"),
    ("nl.remove_small_components(mask, -1)", ValueError, "min_size"),
    ("nl.remove_small_components(mask, 2.5)", TypeError, "min_size"),
    ("nl.largest_component(mask, connectivity=6)", ValueError, "connectivity"),
    ("nl.component_stats(np.zeros((3, 3), np.float64))", TypeError, "labels"),
    ("nl.component_stats(np.full((3, 3), 2**63, np.uint64))", ValueError, "count"),
    ("nl.component_stats(np.ones((3, 3), np.int32), 2**70)", ValueError, "count"),
    # runtime
    ("nl.set_num_threads(0)", ValueError, "n"),
    ("nl.set_num_threads(2.5)", TypeError, "n"),
    ("nl.set_cpu_target('sse9')", ValueError, "sse9"),
    ("nl.set_cpu_target(3)", TypeError, "name"),
]

RUNNER = """
import json, sys, traceback
results = []
for source, expected in CASES:
    scope = {}
    exec(SETUP, scope)
    try:
        exec(source, scope)
        results.append([source, [], ""])
    except BaseException as exc:
        results.append([source, [c.__name__ for c in type(exc).__mro__], str(exc)])
print(json.dumps(results))
"""


def test_bad_calls_raise_named_errors_without_crashing():
    assert len(BAD_CALLS) >= 40
    cases = [(source, expected.__name__) for source, expected, _ in BAD_CALLS]
    program = f"SETUP = {SETUP!r}\nCASES = {cases!r}\n" + textwrap.dedent(RUNNER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_DIR, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"the bad calls crashed the interpreter: {proc.returncode}\n{proc.stderr}"
    results = json.loads(proc.stdout)
    failures = []
    for (source, expected, word), (_, raised, message) in zip(BAD_CALLS, results):
        if expected.__name__ not in raised or word not in message:
            failures.append(f"{source}: expected {expected.__name__} naming {word!r}, got {raised}: {message}")
    assert not failures, "\n".join(failures)
