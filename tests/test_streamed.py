"""Outputs written past the caches (non-temporal stores, used for large outputs: y of the row
and channel norms and dx of their backward) are bitwise the outputs of the cached path: a child process streams every output (NORMLAB_STREAM_MIN_BYTES=0)
and its results are compared with this process's, which stream none of these small ones."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

import normlab

PACKAGE_DIR = str(pathlib.Path(normlab.__file__).resolve().parent.parent)

# Rows long enough for the aligned streamed loop (16 vectors or more), wide ones among them,
# with an output that starts off the vector width.
CASES = textwrap.dedent(
    """
    import itertools
    import ml_dtypes
    import numpy as np
    import normlab

    def results():
        rng = np.random.default_rng(11)
        # (8, 4096): grouped rows in the backward; (3, 8192): layer_norm rows in pairs; rows of
        # 8192 and 8200 elements (float64 from 4096): pipelined (the next row summed while one is
        # normalized; half and float64 rows a chunk of vectors at a time), the fused float32 sum
        # recomputed; 8200: rows at alternating distances from a line, an odd last row;
        # (5, 16408), and half rows from 4096: backward rows pipelined (the next pair's or row's
        # sums stepped while dx is written), the last row alone; (3, 32771): rows of more than 128 KiB with weight pipelined
        # one by one where they fit L2 (in pairs elsewhere)
        shapes = [(7, 300), (3, 2053), (2, 4096), (5, 16, 33), (8, 4096), (3, 8192), (5, 8200), (5, 16408),
                  (3, 32771)]
        dtypes = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
        for target in normlab.cpu_targets():
            normlab.set_cpu_target(target)
            for threads, shape, dtype in itertools.product((1, 3), shapes, dtypes):
                normlab.set_num_threads(threads)
                axis = -1 if len(shape) == 2 else (-2, -1)
                cols = int(np.prod(shape[1:]))
                x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
                # Rows summed again: a first element far from the mean (the sums' shift; in
                # every other row, pipelined ones among them), and in float32/64 squares past
                # float range.
                x.reshape(shape[0], -1)[::2, 0] = 40
                if dtype in (np.float32, np.float64):
                    x[1] *= 1e17
                r = rng.standard_normal(shape).astype(dtype)
                w = rng.random(shape[1:]).astype(np.float32 if dtype != np.float64 else dtype)
                b = rng.random(shape[1:]).astype(w.dtype)
                size = int(np.prod(shape))
                out = np.empty(size + 1, dtype)[1:].reshape(shape)  # off the vector width
                s = np.empty(size + 3, dtype)[3:].reshape(shape)
                key = f"{target}-{threads}-{shape}-{np.dtype(dtype).name}"
                yield key + "-ln", normlab.layer_norm(x, w, b, axis=axis, out=out).copy()
                yield key + "-ln-plain", normlab.layer_norm(x, axis=axis, out=out).copy()
                yield key + "-rms", normlab.rms_norm(x, w, axis=axis, out=out).copy()
                # Outputs of subnormal size among normal ones (bfloat16 stores test for them)
                tiny = w.copy()
                tiny.reshape(-1)[::37] = 1e-39
                tiny.reshape(-1)[5::37] = 1e-6
                yield key + "-ln-tiny", normlab.layer_norm(x, tiny, axis=axis, out=out).copy()
                y, total = normlab.add_layer_norm(x, r, w, b, axis=axis, out=out, sum_out=s)
                yield key + "-add-ln", np.concatenate([y.ravel(), total.ravel()])
                y, total = normlab.add_rms_norm(x, r, w, axis=axis, out=out, sum_out=s)
                yield key + "-add-rms", np.concatenate([y.ravel(), total.ravel()])
                # The sum a whole number of lines from the output (written beside it where it
                # streams), and the sum written over the residual.
                line = 64 // np.dtype(dtype).itemsize
                span = -(-size // line) * line
                buf = np.empty(2 * span + 1, dtype)
                out2, s2 = buf[1 : 1 + size].reshape(shape), buf[1 + span : 1 + span + size].reshape(shape)
                for name, add in (("ln", lambda **k: normlab.add_layer_norm(x, rr, w, b, axis=axis, **k)),
                                  ("rms", lambda **k: normlab.add_rms_norm(x, rr, w, axis=axis, **k))):
                    rr = r
                    y, total = add(out=out2, sum_out=s2)
                    yield f"{key}-add-{name}-lines-apart", np.concatenate([y.ravel(), total.ravel()])
                    rr = r.copy()
                    y, total = add(out=out, sum_out=rr)
                    yield f"{key}-add-{name}-over-residual", np.concatenate([y.ravel(), total.ravel()])
                _, mean, rstd = normlab.layer_norm(x, w, b, axis=axis, return_stats=True)
                dy = rng.standard_normal(shape).astype(dtype)
                dx, dw, db = normlab.layer_norm_backward(dy, x, mean, rstd, w, axis=axis, out=out)
                yield key + "-ln-backward", np.concatenate([bits(dx).ravel(), bits(dw).ravel(), bits(db).ravel()])
                dx, _, _ = normlab.layer_norm_backward(dy, x, mean, rstd, axis=axis, out=out)
                yield key + "-ln-backward-plain", dx.copy()
                # dx of subnormal size among normal values (bfloat16 stores test for them)
                tiny = (dy * {np.float16: 1e-3}.get(dtype, 1e-37)).astype(dtype)
                dx, dw, db = normlab.layer_norm_backward(tiny, x, mean, rstd, w, axis=axis, out=out)
                yield key + "-ln-backward-tiny", np.concatenate([bits(dx).ravel(), bits(dw).ravel(), bits(db).ravel()])
                dx, dw, db = normlab.add_layer_norm_backward(dy, x, mean, rstd, w, ds=r, axis=axis, out=out)
                yield key + "-add-ln-backward", np.concatenate([bits(dx).ravel(), bits(dw).ravel(), bits(db).ravel()])
                _, rstd = normlab.rms_norm(x, w, axis=axis, return_stats=True)
                dx, dw = normlab.rms_norm_backward(dy, x, rstd, w, axis=axis, out=out)
                yield key + "-rms-backward", np.concatenate([bits(dx).ravel(), bits(dw).ravel()])

        # Channel norms: channels-first planes of 16 vectors or more (spans aligned by a scalar
        # head), channels-last rows whose aligned vectors stream; fused sets and samples too.
        # Channels-last outputs off the vector width stream their rows shifted to the width.
        channel_shapes = [
            ((9, 5, 33, 17), 1), ((2, 3, 70, 70), 1), ((9, 33, 17, 5), -1), ((8, 20, 20, 48), -1),
            ((2, 9, 7, 200), -1),
        ]
        for target in normlab.cpu_targets():
            normlab.set_cpu_target(target)
            for threads, (shape, ax), dtype in itertools.product((1, 3), channel_shapes, dtypes):
                normlab.set_num_threads(threads)
                x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
                dy = rng.standard_normal(shape).astype(dtype)
                w = rng.random(shape[ax]).astype(np.float32 if dtype != np.float64 else dtype)
                out = np.empty(x.size + 1, dtype)[1:].reshape(shape)  # off the vector width
                key = f"{target}-{threads}-{shape}-{np.dtype(dtype).name}"
                for kind, fwd, bwd in (
                    ("batch", lambda o: normlab.batch_norm(x, w, w, channel_axis=ax, out=o, return_stats=True),
                      lambda m, r, o: normlab.batch_norm_backward(dy, x, m, r, w, channel_axis=ax, out=o)),
                    ("group", lambda o: normlab.group_norm(x, 1, w, w, channel_axis=ax, out=o, return_stats=True),
                     lambda m, r, o: normlab.group_norm_backward(dy, x, m, r, 1, w, channel_axis=ax, out=o)),
                    ("instance", lambda o: normlab.instance_norm(x, w, w, channel_axis=ax, out=o, return_stats=True),
                     lambda m, r, o: normlab.instance_norm_backward(dy, x, m, r, w, channel_axis=ax, out=o)),
                ):
                    y, m, r = fwd(None)
                    shifted = fwd(out)[0].copy()
                    shifted_dx = bwd(m, r, out)[0].copy()
                    parts = [y, shifted, *bwd(m, r, None), shifted_dx]
                    yield f"{key}-{kind}", np.concatenate([bits(a).ravel() for a in parts])
                # dx of subnormal size among normal values (bfloat16 stores test for them)
                dy = (dy * {np.float16: 1e-3}.get(dtype, 1e-37)).astype(dtype)
                m, r = normlab.batch_norm(x, w, w, channel_axis=ax, return_stats=True)[1:]
                parts = [normlab.batch_norm_backward(dy, x, m, r, w, channel_axis=ax, out=o)[0] for o in (None, out)]
                yield f"{key}-batch-tiny-dy", np.concatenate([bits(a).ravel() for a in parts])

    def bits(a):
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
        return a.view(unsigned).astype(np.uint64)

    # The two processes compare hashes of each output's bits, dtype and shape: the outputs
    # themselves, written to a file and read back, took 15 s of the 19 s this test took.
    def digest(a):
        import hashlib
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()
    """
)


def test_streamed_outputs_equal_cached_outputs_bitwise(tmp_path):
    saved = tmp_path / "streamed.json"
    child = CASES + textwrap.dedent(
        f"""
        import json
        from normlab import _core
        assert _core.stream_min_bytes() == 0
        with open({str(saved)!r}, "w") as f:
            json.dump({{k: digest(v) for k, v in results()}}, f)
        """
    )
    env = dict(os.environ, NORMLAB_STREAM_MIN_BYTES="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_DIR, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    namespace: dict = {}
    exec(CASES, namespace)  # noqa: S102 - the same cases, computed here without streaming
    from normlab import _core

    assert _core.stream_min_bytes() >= 1 << 20
    target, threads = normlab.get_cpu_target(), normlab.get_num_threads()
    try:
        cached = {k: namespace["digest"](v) for k, v in namespace["results"]()}
    finally:
        normlab.set_cpu_target(target)
        normlab.set_num_threads(threads)
    streamed = json.loads(saved.read_text())
    assert sorted(streamed) == sorted(cached)
    differ = [key for key in cached if streamed[key] != cached[key]]
    assert not differ, f"{len(differ)} of {len(cached)} outputs differ when streamed: {differ[:20]}"
