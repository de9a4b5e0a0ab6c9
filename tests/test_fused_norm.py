"""add_layer_norm / add_rms_norm: the fused residual add + norm, forward and backward."""

from __future__ import annotations

import numpy as np
import pytest

import normlab
import reference as ref

DTYPES = [np.float32, np.float64]
SHAPES = [(1, 1), (7, 3), (33, 70), (5, 4, 17), (64, 1030), (37, 48), (9, 32), (11, 128), (10, 256)]
# rows of 512 KiB or more, fewer than 4: split across the threads (float32 and float64)
LONG_SHAPES = [(2, 131075)]


def _inputs(rng, shape, dtype, offset=0.0):
    x = (rng.standard_normal(shape) + offset).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(shape[-1]).astype(dtype)
    b = rng.standard_normal(shape[-1]).astype(dtype)
    return x, r, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + LONG_SHAPES)
def test_add_layer_norm_equals_add_then_layer_norm(cpu_target, rng, dtype, shape):
    x, r, w, b = _inputs(rng, shape, dtype, offset=100.0)
    y, s, mean, rstd = normlab.add_layer_norm(x, r, w, b, return_stats=True)
    s_ref = x + r
    assert np.array_equal(s, s_ref)
    y_ref, mean_ref, rstd_ref = normlab.layer_norm(s_ref, w, b, return_stats=True)
    assert np.array_equal(y, y_ref) and np.array_equal(mean, mean_ref) and np.array_equal(rstd, rstd_ref)
    y2, s2 = normlab.add_layer_norm(x, r, w, b)
    assert np.array_equal(y2, y) and np.array_equal(s2, s)
    # and against the float64 reference of the sum
    y64, _, _ = ref.layer_norm(s_ref, w, b)
    tol = 2e-6 if dtype == np.float32 else 1e-10
    assert np.max(np.abs(y - y64) / (np.abs(w) + 1)) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + LONG_SHAPES)
def test_add_rms_norm_equals_add_then_rms_norm(cpu_target, rng, dtype, shape):
    x, r, w, _ = _inputs(rng, shape, dtype)
    y, s, rstd = normlab.add_rms_norm(x, r, w, return_stats=True)
    assert np.array_equal(s, x + r)
    y_ref, rstd_ref = normlab.rms_norm(x + r, w, return_stats=True)
    assert np.array_equal(y, y_ref) and np.array_equal(rstd, rstd_ref)


@pytest.mark.parametrize("shape", [(9, 40), (13, 32), (2, 131075)])
@pytest.mark.parametrize("which", ["x", "residual"])
@pytest.mark.parametrize("fused", ["layer", "rms"])
def test_sum_out_may_be_x_or_residual(cpu_target, rng, which, fused, shape):
    x, r, w, b = _inputs(rng, shape, np.float32)
    expected_s = x + r
    expected_y = normlab.layer_norm(expected_s, w, b) if fused == "layer" else normlab.rms_norm(expected_s, w)
    target = x if which == "x" else r
    if fused == "layer":
        y, s = normlab.add_layer_norm(x, r, w, b, sum_out=target)
    else:
        y, s = normlab.add_rms_norm(x, r, w, sum_out=target)
    assert s is target
    assert np.array_equal(target, expected_s)
    assert np.array_equal(y, expected_y)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])  # the plain path and the checked one
@pytest.mark.parametrize("which", ["x", "residual"])
def test_sum_out_may_be_a_view_of_x_or_residual(rng, dtype, which):
    x, r, w, b = _inputs(rng, (6, 32), dtype)
    expected_s = (x.astype(np.float32) + r.astype(np.float32)).astype(dtype)
    expected_y = normlab.layer_norm(expected_s, w, b)
    target = (x if which == "x" else r)[...]  # another array object on the same elements
    y, s = normlab.add_layer_norm(x, r, w, b, sum_out=target)
    assert s is target
    assert np.array_equal(x if which == "x" else r, expected_s)
    assert np.array_equal(y, expected_y)
    with pytest.raises(ValueError, match="sum_out"):  # the same elements in another order
        normlab.add_layer_norm(x, r, w, b, sum_out=x.reshape(-1)[::-1].reshape(6, 32))


def test_sum_out_and_out_are_checked(rng):
    x, r, w, b = _inputs(rng, (4, 8), np.float32)
    with pytest.raises(ValueError, match="sum_out"):
        normlab.add_layer_norm(x, r, sum_out=x.reshape(-1)[::-1].reshape(4, 8))  # overlaps x, not x itself
    with pytest.raises(ValueError, match="out"):
        normlab.add_layer_norm(x, r, out=r)
    s = np.empty_like(x)
    with pytest.raises(ValueError, match="out"):
        normlab.add_layer_norm(x, r, out=s, sum_out=s)
    with pytest.raises(ValueError, match="residual"):
        normlab.add_layer_norm(x, r[:, :7])
    with pytest.raises(TypeError, match="residual"):
        normlab.add_rms_norm(x, r.astype(np.float64))
    with pytest.raises(TypeError, match="sum_out"):
        normlab.add_rms_norm(x, r, sum_out=np.empty((4, 8)))
    with pytest.raises(ValueError, match="eps"):
        normlab.add_rms_norm(x, r, eps=-1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_ds", [False, True])
def test_add_layer_norm_backward_matches_torch_autograd_of_the_composition(cpu_target, rng, dtype, with_ds):
    torch = pytest.importorskip("torch")
    x, r, w, b = _inputs(rng, (13, 37), dtype, offset=3.0)
    dy = rng.standard_normal(x.shape).astype(dtype)
    ds = rng.standard_normal(x.shape).astype(dtype) if with_ds else None
    _, s, mean, rstd = normlab.add_layer_norm(x, r, w, b, return_stats=True)
    dx, dw, db = normlab.add_layer_norm_backward(dy, s, mean, rstd, w, ds=ds)

    tx, tr, tw, tb = (torch.from_numpy(a.astype(np.float64)).requires_grad_() for a in (x, r, w, b))
    ts = tx + tr
    ty = torch.nn.functional.layer_norm(ts, (37,), tw, tb, 1e-5)
    loss = (ty * torch.from_numpy(dy.astype(np.float64))).sum()
    if with_ds:
        loss = loss + (ts * torch.from_numpy(ds.astype(np.float64))).sum()
    loss.backward()
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert np.allclose(dx, tx.grad.numpy(), atol=tol) and np.allclose(dx, tr.grad.numpy(), atol=tol)
    assert np.allclose(dw, tw.grad.numpy(), atol=tol * 10) and np.allclose(db, tb.grad.numpy(), atol=tol * 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_backward_matches_torch_autograd_of_the_composition(cpu_target, rng, dtype):
    torch = pytest.importorskip("torch")
    x, r, w, _ = _inputs(rng, (11, 29), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    ds = rng.standard_normal(x.shape).astype(dtype)
    _, s, rstd = normlab.add_rms_norm(x, r, w, return_stats=True)
    dx, dw = normlab.add_rms_norm_backward(dy, s, rstd, w, ds=ds)
    eps = float(np.finfo(dtype).eps)
    tx, tr, tw = (torch.from_numpy(a.astype(np.float64)).requires_grad_() for a in (x, r, w))
    ts = tx + tr
    ty = torch.nn.functional.rms_norm(ts, (29,), tw, eps)
    ((ty * torch.from_numpy(dy.astype(np.float64))).sum() + (ts * torch.from_numpy(ds.astype(np.float64))).sum()).backward()
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert np.allclose(dx, tx.grad.numpy(), atol=tol) and np.allclose(dw, tw.grad.numpy(), atol=tol * 10)


def test_backward_without_ds_is_the_plain_backward(rng):
    x, r, w, b = _inputs(rng, (6, 20), np.float64)
    dy = rng.standard_normal(x.shape)
    _, s, mean, rstd = normlab.add_layer_norm(x, r, w, b, return_stats=True)
    fused = normlab.add_layer_norm_backward(dy, s, mean, rstd, w)
    plain = normlab.layer_norm_backward(dy, s, mean, rstd, w)
    for u, v in zip(fused, plain):
        assert np.array_equal(u, v)
    ds = rng.standard_normal(x.shape)
    dx_ds, _, _ = normlab.add_layer_norm_backward(dy, s, mean, rstd, w, ds=ds)
    assert np.allclose(dx_ds, plain[0] + ds, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape", [(700, 300), (3, 131075)])
def test_fused_results_do_not_depend_on_the_thread_count(num_threads, rng, shape):
    x, r, w, b = _inputs(rng, shape, np.float32, offset=5.0)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        normlab.set_num_threads(n)
        y, s, mean, rstd = normlab.add_layer_norm(x, r, w, b, return_stats=True)
        grads = normlab.add_layer_norm_backward(dy, s, mean, rstd, w, ds=dy)
        y2, s2, rstd2 = normlab.add_rms_norm(x, r, w, return_stats=True)
        grads2 = normlab.add_rms_norm_backward(dy, s2, rstd2, w, ds=dy)
        results.append((y, s, mean, rstd) + grads + (y2, s2, rstd2) + grads2)
    for other in results[1:]:
        for u, v in zip(results[0], other):
            assert np.array_equal(u, v)
