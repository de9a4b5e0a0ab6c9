"""Cross-checks of layer_norm and rms_norm against PyTorch (CPU), forward and autograd backward.

normlab follows torch.nn.functional's semantics (biased variance, eps inside the square root,
rms_norm eps=None meaning the dtype's machine epsilon); these tests hold it to that.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import normlab  # noqa: E402

CASES = [
    ((5, 33), -1),
    ((37, 768), -1),
    ((3, 1), -1),
    ((1, 4099), -1),
    ((2, 3, 17), -1),
    ((4, 6, 16), (-2, -1)),
    ((2, 3, 4, 5), (-3, -2, -1)),
]

# (forward atol, backward rtol) against torch, both in normalized units
TOL = {np.float64: (1e-12, 1e-11), np.float32: (1e-5, 1e-4)}


@pytest.fixture(autouse=True, scope="module")
def _torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is small and shared
    yield
    torch.set_num_threads(previous)


def _normalized_shape(shape, axis):
    count = 1 if isinstance(axis, int) else len(axis)
    return shape[len(shape) - count :]


def _inputs(rng, shape, axis, dtype, offset):
    ns = _normalized_shape(shape, axis)
    x = (offset + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = (1.0 + 0.5 * rng.standard_normal(ns)).astype(dtype)
    bias = rng.standard_normal(ns).astype(dtype)
    return x, dy, weight, bias


def _leaf(a, dtype):
    return torch.from_numpy(a.astype(dtype)).requires_grad_(True)


def _close(got, want, tol, what):
    want = want.detach().numpy()
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    assert err <= tol * scale, f"{what}: error {err:.3e} > {tol:.1e} * {scale:.3e}"


@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, axis", CASES)
def test_layer_norm_matches_torch(cpu_target, rng, shape, axis, dtype, offset):
    """With an offset (|mean| / std = 50) torch's float32 path itself loses digits (it computes
    x - mean in float32: with one column it gets dweight 4e-4 where the exact value is 0), so
    float32 inputs with an offset are held to torch run in float64 on the same values."""
    x, dy, weight, bias = _inputs(rng, shape, axis, dtype, offset)
    ns = _normalized_shape(shape, axis)
    fwd_tol, bwd_tol = TOL[dtype]
    eps = 1e-5
    tdtype = dtype if offset == 0.0 else np.float64
    for w, b in ((weight, bias), (None, None)):
        tx = _leaf(x, tdtype)
        tw = None if w is None else _leaf(w, tdtype)
        tb = None if b is None else _leaf(b, tdtype)
        ty = torch.nn.functional.layer_norm(tx, ns, tw, tb, eps)
        ty.backward(torch.from_numpy(dy.astype(tdtype)))
        assert ty.dtype == torch.from_numpy(np.empty(0, tdtype)).dtype

        y, mean, rstd = normlab.layer_norm(x, w, b, axis=axis, eps=eps, return_stats=True)
        _close(y, ty, fwd_tol, "y")
        dx, dweight, dbias = normlab.layer_norm_backward(dy, x, mean, rstd, w, axis=axis)
        _close(dx, tx.grad, bwd_tol, "dx")
        if w is None:
            assert dweight is None and dbias is None
        else:
            _close(dweight, tw.grad, bwd_tol, "dweight")
            _close(dbias, tb.grad, bwd_tol, "dbias")


@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, axis", CASES)
def test_rms_norm_matches_torch(cpu_target, rng, shape, axis, dtype, eps):
    x, dy, weight, _ = _inputs(rng, shape, axis, dtype, 0.5)
    ns = _normalized_shape(shape, axis)
    fwd_tol, bwd_tol = TOL[dtype]
    for w in (weight, None):
        tx = _leaf(x, dtype)
        tw = None if w is None else _leaf(w, dtype)
        ty = torch.nn.functional.rms_norm(tx, ns, tw, eps)
        ty.backward(torch.from_numpy(dy))

        y, rstd = normlab.rms_norm(x, w, axis=axis, eps=eps, return_stats=True)
        _close(y, ty, fwd_tol, "y")
        dx, dweight = normlab.rms_norm_backward(dy, x, rstd, w, axis=axis)
        _close(dx, tx.grad, bwd_tol, "dx")
        if w is None:
            assert dweight is None
        else:
            _close(dweight, tw.grad, bwd_tol, "dweight")


def test_rms_norm_default_eps_is_torchs(rng):
    """Tiny rows make eps dominate, so a different default eps would show."""
    for dtype in (np.float32, np.float64):
        x = (1e-5 * rng.standard_normal((4, 16))).astype(dtype)
        if dtype == np.float64:
            x *= 1e-4
        want = torch.nn.functional.rms_norm(torch.from_numpy(x), (16,)).numpy()
        got = normlab.rms_norm(x)
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12)
