"""batch_norm, instance_norm and group_norm: forward and backward, channels-first and -last.

Held to float64 NumPy references, PyTorch (float64, autograd) and finite differences; every
test that runs a kernel uses the cpu_target fixture (all SIMD targets of this machine).
"""

import numpy as np
import pytest

import channel_calls as calls
import normlab
import reference as ref

torch = pytest.importorskip("torch")
F = torch.nn.functional

# ---- float64 references ---------------------------------------------------------------------


def _to_cf(a, cl):
    return np.moveaxis(a, -1, 1) if cl else a


def _from_cf(a, cl):
    return np.moveaxis(a, 1, -1) if cl else a


def _sets(xc, kind, groups):
    """(x viewed as (sets, set_size) in float64, a function mapping it back to xc's shape)."""
    n, c = xc.shape[:2]
    if kind == "batch":
        t = np.moveaxis(xc, 1, 0).reshape(c, -1)
        return t, lambda v: np.moveaxis(v.reshape((c, n) + xc.shape[2:]), 0, 1)
    g = c if kind == "instance" else groups
    return xc.reshape(n * g, -1), lambda v: v.reshape(xc.shape)


def _chan(v, xc):
    """Per-channel vector v broadcast against a channels-first array xc."""
    return v.reshape((1, -1) + (1,) * (xc.ndim - 2))


def ref_forward(x, kind, groups=None, w=None, b=None, eps=1e-5, cl=False):
    xc = _to_cf(np.asarray(x, np.float64), cl)
    t, back = _sets(xc, kind, groups)
    mean = t.mean(1)
    var = ((t - mean[:, None]) ** 2).mean(1)
    rstd = 1 / np.sqrt(var + eps)
    y = back((t - mean[:, None]) * rstd[:, None])
    if w is not None:
        y = y * _chan(np.asarray(w, np.float64), xc)
    if b is not None:
        y = y + _chan(np.asarray(b, np.float64), xc)
    return _from_cf(y, cl), mean, rstd, var


def ref_backward(dy, x, mean, rstd, kind, groups=None, w=None, cl=False, training=True):
    xc = _to_cf(np.asarray(x, np.float64), cl)
    dyc = _to_cf(np.asarray(dy, np.float64), cl)
    wv = np.ones(xc.shape[1]) if w is None else np.asarray(w, np.float64)
    g = dyc * _chan(wv, xc)
    t, back = _sets(xc, kind, groups)
    gt, _ = _sets(g, kind, groups)
    mean = np.asarray(mean, np.float64).reshape(-1)
    rstd = np.asarray(rstd, np.float64).reshape(-1)
    xhat = (t - mean[:, None]) * rstd[:, None]
    if training:
        dx = rstd[:, None] * (gt - gt.mean(1, keepdims=True) - xhat * (gt * xhat).mean(1, keepdims=True))
    else:
        dx = rstd[:, None] * gt
    axes = (0,) + tuple(range(2, xc.ndim))
    dxhat = back(xhat)
    dweight = (dyc * dxhat).sum(axes)
    dbias = dyc.sum(axes)
    return _from_cf(back(dx), cl), dweight, dbias


# ---- helpers --------------------------------------------------------------------------------

KINDS = ["batch", "instance", "group"]


def _shape(n, c, spatial, cl):
    return (n, *spatial, c) if cl else (n, c, *spatial)


def _groups(kind, c):
    return {"batch": None, "instance": c, "group": 2 if c % 2 == 0 else 1}[kind]








def _torch_t(a, cl):
    t = torch.from_numpy(np.ascontiguousarray(a))
    if cl:
        t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
    return t


def _torch_back(t, cl):
    a = t.detach().numpy()
    return np.moveaxis(a, 1, -1) if cl else a


# ---- forward --------------------------------------------------------------------------------

CASES = [
    # (kind, n, c, spatial)
    ("batch", 5, 6, ()),
    ("batch", 3, 5, (7,)),
    ("batch", 2, 6, (5, 4)),
    ("batch", 1, 3, (3, 4, 5)),
    ("batch", 3, 19, (6, 5)),
    ("instance", 3, 5, (7,)),
    ("instance", 2, 6, (5, 4)),
    ("instance", 1, 3, (3, 4, 5)),
    ("instance", 2, 19, (9,)),
    ("group", 4, 6, ()),
    ("group", 3, 6, (7,)),
    ("group", 2, 8, (5, 4)),
    ("group", 1, 4, (3, 4, 5)),
    ("group", 2, 38, (3, 5)),
    ("batch", 2, 301, (3,)),  # odd channel count too wide for a vector period: scalar tails
    ("group", 3, 258, (5,)),
    ("instance", 2, 72, (2, 9)),
    # 8 samples or more: channels-last group and instance norm go one task per sample
    ("group", 8, 16, (5, 3)),
    ("instance", 9, 6, (4, 4)),
    # plane rows whose per-channel arrays are too large to share: each unit fills its own
    ("group", 2, 32776, ()),
    # shared per-channel arrays of 8K channels or more: filled by the threads
    ("group", 4, 2048, (2,)),
]


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,n,c,spatial", CASES)
def test_forward_matches_reference(cpu_target, rng, kind, n, c, spatial, dtype, cl):
    groups = _groups(kind, c)
    x = (rng.standard_normal(_shape(n, c, spatial, cl)) * 3 + 2).astype(dtype)
    w = rng.standard_normal(c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    y, mean, rstd = calls.forward(kind, x, w, b, cl, groups)
    ry, rmean, rrstd, _ = ref_forward(x, kind, groups, w, b, cl=cl)
    tol = 2e-6 if dtype == np.float32 else 1e-12
    assert y.shape == x.shape and y.dtype == dtype and y.flags.c_contiguous
    assert mean.shape == rstd.shape == calls.stats_shape(kind, n, c, groups)
    # In units of the output's scale: |w| (normalized values) plus |b| (its rounding).
    scale = np.abs(_chan(w.astype(np.float64), _to_cf(x, cl))) + np.abs(_chan(b.astype(np.float64), _to_cf(x, cl)))
    err = np.abs(_to_cf(y - ry, cl)) / scale
    assert err.max() < tol * 4
    np.testing.assert_allclose(mean.reshape(-1), rmean, rtol=tol, atol=tol)
    np.testing.assert_allclose(rstd.reshape(-1), rrstd, rtol=tol * 4)
    # Without affine: normalized units directly.
    y0 = calls.forward(kind, x, None, None, cl, groups)[0]
    ry0 = ref_forward(x, kind, groups, cl=cl)[0]
    assert np.abs(y0 - ry0).max() < tol


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [1e3, 1e5])
def test_float32_large_mean(cpu_target, rng, kind, cl, offset):
    n, c, spatial = 4, 8, (33, 17)
    groups = _groups(kind, c)
    shape = _shape(n, c, spatial, cl)
    x = (offset * (1 + rng.random(shape)) * 0 + offset + rng.standard_normal(shape)).astype(np.float32)
    # Per-channel offsets up to `offset` std, with signs.
    xc = _to_cf(x, cl)
    xc += _chan(np.linspace(-offset, offset, c).astype(np.float32), xc)
    y = calls.forward(kind, x, None, None, cl, groups)[0]
    ry = ref_forward(x, kind, groups, cl=cl)[0]
    assert np.abs(y - ry).max() < 2e-6


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("kind", ["batch", "group"])
@pytest.mark.parametrize("outlier", [1e3, 1e18])
def test_first_element_far_from_the_mean(cpu_target, rng, kind, cl, outlier):
    """Sums are shifted by each set's first element. An outlier there, in sets of a million
    elements, must neither cost digits nor overflow float squares: sets whose float sums are not
    to be trusted are summed again in double about their mean (without that: 2e-5 and 1e-3)."""
    n, c, spatial = 4, 2, (512, 512)
    groups = _groups(kind, c)
    x = rng.standard_normal(_shape(n, c, spatial, cl)).astype(np.float32)
    xc = _to_cf(x, cl)
    xc[:, :, 0, 0] = outlier  # the first element of every channel (of every set)
    y = calls.forward(kind, x, None, None, cl, groups)[0]
    ry = ref_forward(x, kind, groups, cl=cl)[0]
    assert (np.abs(y - ry) / np.maximum(1.0, np.abs(ry))).max() < 2e-6


@pytest.mark.parametrize("poison", [np.nan, np.inf, 1e18])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, c", [(4, 8), (3, 4), (8, 8)], ids=["8ch", "4ch", "8x8"])
@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("kind", KINDS)
def test_one_bad_set_leaves_the_others_alone(cpu_target, rng, kind, cl, n, c, dtype, poison):
    """A NaN, an Inf, or a value whose float squares cannot be trusted (summed again in double)
    in one set: every other set's outputs, statistics and dx keep their bits, in the fused and
    two-pass paths alike (channels-first sets fuse from 8 sets, channels-last samples from 8)."""
    groups = _groups(kind, c)
    x = (rng.standard_normal(_shape(n, c, (6, 5), cl)) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    bad = x.copy()
    _to_cf(bad, cl)[1, c - 3, 2, 3] = poison
    # the set holding that element, as a channels-first mask
    hit = np.zeros((n, c, 6, 5), bool)
    if kind == "batch":
        hit[:, c - 3] = True
    elif kind == "instance":
        hit[1, c - 3] = True
    else:
        per = c // groups
        first = (c - 3) // per * per
        hit[1, first : first + per] = True
    y, mean, rstd = calls.forward(kind, x, None, None, cl, groups)
    yb, meanb, rstdb = calls.forward(kind, bad, None, None, cl, groups)
    keep = ~_from_cf(hit, cl)
    assert np.array_equal(y[keep], yb[keep])
    stat_hit = _sets(hit, kind, groups)[0].any(1).reshape(mean.shape)
    assert np.array_equal(mean[~stat_hit], meanb[~stat_hit]) and np.array_equal(rstd[~stat_hit], rstdb[~stat_hit])
    if poison != 1e18:
        assert not np.isfinite(yb[~keep]).any()
    dx = calls.backward(kind, dy, x, mean, rstd, None, cl, groups)[0]
    dxb = calls.backward(kind, dy, bad, meanb, rstdb, None, cl, groups)[0]
    assert np.array_equal(dx[keep], dxb[keep])


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("size", [16, 32, 1000])
@pytest.mark.parametrize("kind", KINDS)
def test_values_near_float32_max(cpu_target, kind, size, cl):
    """Float squares (and sums) of values near 3.4e38 overflow: such sets are summed in double."""
    x = np.empty((2, 2, size))
    x[0] = 1.0
    x[1] = 2.5e38
    x[:, :, ::2] *= 1.25
    x = _from_cf(x, cl).astype(np.float32)
    groups = _groups(kind, 2)
    y, mean, rstd = calls.forward(kind, x, None, None, cl, groups)
    ry, rmean, rrstd, _ = ref_forward(x, kind, groups, cl=cl)
    assert np.isfinite(mean).all() and np.isfinite(rstd).all()
    np.testing.assert_allclose(mean.reshape(-1), rmean, rtol=1e-6)
    np.testing.assert_allclose(rstd.reshape(-1), rrstd, rtol=1e-6)
    assert np.abs(y - ry).max() < 2e-6


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("kind", KINDS)
def test_constant_channels_give_bias(cpu_target, rng, kind, cl):
    n, c, spatial = 3, 4, (5, 6)
    x = np.empty(_shape(n, c, spatial, cl), np.float32)
    values = [1e5, -3.25, 0.0, 7.1e-3] if kind != "group" else [1e5, 1e5, 7.1e-3, 7.1e-3]
    _to_cf(x, cl)[...] = _chan(np.array(values, np.float32), _to_cf(x, cl))
    w = rng.standard_normal(c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    y = calls.forward(kind, x, w, b, cl, 2 if kind == "group" else None)[0]
    expect = np.broadcast_to(_chan(b, _to_cf(y, cl)), _to_cf(y, cl).shape)
    assert np.array_equal(_to_cf(y, cl), expect)


_BIG = {}


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
def test_batch_norm_huge_channels(cpu_target, cl):
    """Channels of millions of elements, with |mean| / std = 1e3."""
    shape = (64, 224, 224, 3) if cl else (64, 3, 224, 224)
    if cl not in _BIG:
        rng = np.random.default_rng(7)
        x = rng.standard_normal(shape, dtype=np.float32)
        _to_cf(x, cl)[...] += _chan(np.array([1e3, -20.0, 0.5], np.float32), _to_cf(x, cl))
        xc = _to_cf(x.astype(np.float64), cl)
        mean = xc.mean((0, 2, 3))
        var = ((xc - _chan(mean, xc)) ** 2).mean((0, 2, 3))
        _BIG[cl] = (x, mean, var)
    x, mean, var = _BIG[cl]
    y, m, r = normlab.batch_norm(x, channel_axis=-1 if cl else 1, return_stats=True)
    np.testing.assert_allclose(m, mean, rtol=1e-7)
    np.testing.assert_allclose(r, 1 / np.sqrt(var + 1e-5), rtol=1e-6)
    # Check y on a sample of positions (a full float64 reference costs seconds).
    idx = np.random.default_rng(1).integers(0, x.size, 200000)
    xs = x.reshape(-1)[idx].astype(np.float64)
    ch = idx % 3 if cl else (idx // (224 * 224)) % 3
    ys = (xs - mean[ch]) / np.sqrt(var[ch] + 1e-5)
    assert np.abs(y.reshape(-1)[idx] - ys).max() < 2e-6


# ---- backward -------------------------------------------------------------------------------


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,n,c,spatial", CASES)
def test_backward_matches_reference(cpu_target, rng, kind, n, c, spatial, dtype, cl):
    groups = _groups(kind, c)
    shape = _shape(n, c, spatial, cl)
    x = (rng.standard_normal(shape) * 2 - 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(c).astype(dtype)
    _, mean, rstd = calls.forward(kind, x, w, None, cl, groups)
    dx, dw, db = calls.backward(kind, dy, x, mean, rstd, w, cl, groups)
    rdx, rdw, rdb = ref_backward(dy, x, mean, rstd, kind, groups, w, cl)
    tol = 2e-5 if dtype == np.float32 else 1e-11
    scale = np.abs(rdx).max() + 1
    assert np.abs(dx - rdx).max() < tol * scale
    assert np.abs(dw - rdw).max() < tol * (np.abs(rdw).max() + 1)
    assert np.abs(db - rdb).max() < tol * (np.abs(rdb).max() + 1)
    dx0, dw0, db0 = calls.backward(kind, dy, x, mean, rstd, None, cl, groups)
    assert dw0 is None and db0 is None
    assert np.abs(dx0 - ref_backward(dy, x, mean, rstd, kind, groups, None, cl)[0]).max() < tol * scale


@pytest.mark.parametrize("rstd", [3.0, 0.3])
@pytest.mark.parametrize(
    "n, c, spatial",
    [(2, 3, (32, 32)), (8, 8, (32, 32)), (1, 2, (256, 512)), (2, 160, (4, 4))],
    ids=["two-pass", "fused", "big-planes", "wide-rows"],
)
@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("kind", KINDS)
def test_float32_backward_gradients_near_the_float_limit(cpu_target, rng, kind, cl, n, c, spatial, rstd):
    """One set: x near 0 but one element far out (its xhat near sqrt(set size)), where dy is
    3e38. Its dx is in range, though the float products dy * (x - mean) overflow (summed again in
    double) and, with rstd over 1, so does rstd * dy (rstd multiplies last). Every other set's dx
    keeps its bits. dweight/dbias match the reference, or are infinite where it exceeds float32."""
    groups = 1 if kind == "group" else None
    x = (rng.standard_normal(_shape(n, c, spatial, cl)) * 1e-3).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = np.full(c, 0.75, np.float32)
    hit = np.zeros(x.shape, bool)
    _to_cf(hit, cl)[0, 0] = True
    set_size = {"batch": n, "instance": 1, "group": c}[kind] * int(np.prod(spatial))
    _to_cf(x, cl)[(0, 0) + (0,) * len(spatial)] = np.sqrt(set_size) / rstd
    y, mean, rstd_got = calls.forward(kind, x, w, None, cl, groups)
    dx0 = calls.backward(kind, dy, x, mean, rstd_got, w, cl, groups)[0]
    _to_cf(dy, cl)[(0, 0) + (0,) * len(spatial)] = 3e38
    dx, dw, db = calls.backward(kind, dy, x, mean, rstd_got, w, cl, groups)
    rdx, rdw, rdb, term = ref.channel_norm_backward(dy, x, mean, rstd_got, kind, groups, w,
                                                    channel_axis=-1 if cl else 1)
    assert np.all(np.isfinite(dx))
    sets, back = ref.channel_sets(_to_cf(term, cl), kind, groups)
    scale = _from_cf(back(np.broadcast_to(sets.max(1, keepdims=True), sets.shape)), cl)
    err = np.abs(dx - rdx)
    assert np.all(err <= 1e-6 * scale), f"worst {np.max(err / scale):.3e}"
    in_set = _from_cf(back(np.broadcast_to(ref.channel_sets(_to_cf(hit, cl), kind, groups)[0].any(1, keepdims=True),
                                           sets.shape)), cl)
    assert in_set.sum() == set_size
    assert np.array_equal(dx[~in_set], dx0[~in_set])
    for got, want in ((dw, rdw), (db, rdb)):
        finite = np.abs(want) <= np.finfo(np.float32).max
        assert np.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-3)
        assert np.array_equal(got[~finite], np.copysign(np.inf, want[~finite]).astype(np.float32))


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize(
    "kind,n,c,spatial,groups",
    [
        ("batch", 4, 3, (), None),
        ("batch", 1, 3, (5,), None),
        ("batch", 3, 4, (3, 4), None),
        ("batch", 2, 3, (2, 3, 4), None),
        ("instance", 1, 3, (5,), None),
        ("instance", 2, 4, (3, 4), None),
        ("instance", 2, 3, (2, 3, 2), None),
        ("group", 2, 6, (), 3),
        ("group", 1, 6, (5,), 1),
        ("group", 2, 6, (3, 2), 6),
        ("group", 2, 4, (2, 3, 2), 2),
    ],
)
def test_against_torch_autograd(cpu_target, rng, kind, n, c, spatial, groups, cl):
    shape = _shape(n, c, spatial, cl)
    x = rng.standard_normal(shape) * 2 + 1
    dy = rng.standard_normal(shape)
    w = rng.standard_normal(c)
    b = rng.standard_normal(c)
    tx = _torch_t(x, cl).clone().requires_grad_(True)
    tw = torch.from_numpy(w).requires_grad_(True)
    tb = torch.from_numpy(b).requires_grad_(True)
    ax = -1 if cl else 1
    if kind == "batch":
        rm, rv = rng.standard_normal(c), rng.random(c) + 0.5
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        ty = F.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.3, eps=1e-4)
        y, mean, rstd = normlab.batch_norm(x, w, b, rm, rv, momentum=0.3, eps=1e-4, channel_axis=ax,
                                           return_stats=True)
        np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-12, atol=1e-12)
        dx, dw, db = normlab.batch_norm_backward(dy, x, mean, rstd, w, channel_axis=ax)
    elif kind == "instance":
        ty = F.instance_norm(tx, weight=tw, bias=tb, eps=1e-4)
        y, mean, rstd = normlab.instance_norm(x, w, b, eps=1e-4, channel_axis=ax, return_stats=True)
        dx, dw, db = normlab.instance_norm_backward(dy, x, mean, rstd, w, channel_axis=ax)
    else:
        ty = F.group_norm(tx, groups, tw, tb, eps=1e-4)
        y, mean, rstd = normlab.group_norm(x, groups, w, b, eps=1e-4, channel_axis=ax, return_stats=True)
        dx, dw, db = normlab.group_norm_backward(dy, x, mean, rstd, groups, w, channel_axis=ax)
    ty.backward(_torch_t(dy, cl))
    np.testing.assert_allclose(y, _torch_back(ty, cl), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx, _torch_back(tx.grad, cl), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("spatial", [(), (5,), (3, 4)])
def test_batch_norm_inference_against_torch(cpu_target, rng, spatial, cl):
    n, c = 3, 5
    shape = _shape(n, c, spatial, cl)
    x = rng.standard_normal(shape) * 2 + 1
    dy = rng.standard_normal(shape)
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.random(c) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    tx = _torch_t(x, cl).clone().requires_grad_(True)
    tw = torch.from_numpy(w).requires_grad_(True)
    tb = torch.from_numpy(b).requires_grad_(True)
    ty = F.batch_norm(tx, torch.from_numpy(rm0), torch.from_numpy(rv0), tw, tb, training=False, eps=1e-3)
    ty.backward(_torch_t(dy, cl))
    ax = -1 if cl else 1
    y, mean, invstd = normlab.batch_norm(x, w, b, rm, rv, training=False, eps=1e-3, channel_axis=ax,
                                         return_stats=True)
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)  # untouched in inference
    np.testing.assert_allclose(mean, rm0)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(rv0 + 1e-3), rtol=1e-14)
    np.testing.assert_allclose(y, _torch_back(ty, cl), rtol=1e-12, atol=1e-12)
    dx, dw, db = normlab.batch_norm_backward(dy, x, mean, invstd, w, training=False, channel_axis=ax)
    np.testing.assert_allclose(dx, _torch_back(tx.grad, cl), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize(
    "kind,n,c,spatial,groups",
    [("batch", 3, 2, (4,), None), ("batch", 4, 3, (), None), ("instance", 2, 2, (2, 3), None),
     ("group", 2, 4, (3,), 2), ("group", 1, 3, (2, 2), 1)],
)
def test_finite_differences(cpu_target, rng, kind, n, c, spatial, groups, cl):
    """<dx, v> and dweight, dbias against central differences of L = sum(y * dy)."""
    shape = _shape(n, c, spatial, cl)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    w, b = rng.standard_normal(c), rng.standard_normal(c)

    def loss(x_, w_, b_):
        return float((calls.forward(kind, x_, w_, b_, cl, groups)[0] * dy).sum())

    _, mean, rstd = calls.forward(kind, x, w, b, cl, groups)
    dx, dw, db = calls.backward(kind, dy, x, mean, rstd, w, cl, groups)
    h = 1e-6
    for _ in range(3):
        v = rng.standard_normal(shape)
        fd = (loss(x + h * v, w, b) - loss(x - h * v, w, b)) / (2 * h)
        assert abs(fd - (dx * v).sum()) < 1e-6 * (1 + abs(fd))
    u = rng.standard_normal(c)
    fd = (loss(x, w + h * u, b) - loss(x, w - h * u, b)) / (2 * h)
    assert abs(fd - dw @ u) < 1e-6 * (1 + abs(fd))
    fd = (loss(x, w, b + h * u) - loss(x, w, b - h * u)) / (2 * h)
    assert abs(fd - db @ u) < 1e-6 * (1 + abs(fd))


# ---- determinism, layouts, out= -------------------------------------------------------------


@pytest.mark.parametrize("cl", [False, True], ids=["NCS", "NSC"])
@pytest.mark.parametrize("shape", [(4, 8, 48, 48), (2, 3, 200, 200), (3, 24, 1, 1)])
def test_bitwise_identical_for_every_thread_count(cpu_target, num_threads, rng, shape, cl):
    n, c = shape[:2]
    x = (rng.standard_normal(_shape(n, c, shape[2:], cl)) + 5).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(c).astype(np.float32)
    results = []
    for threads in (1, 2, 3, 7):
        normlab.set_num_threads(threads)
        res = []
        for kind in ("batch", "group"):
            g = None if kind == "batch" else (c // 4 if c >= 4 else 1)
            y, mean, rstd = calls.forward(kind, x, w, w, cl, g)
            res += [y, mean, rstd, *calls.backward(kind, dy, x, mean, rstd, w, cl, g)]
        results.append(res)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_equals_channels_first(cpu_target, rng, kind):
    x = rng.standard_normal((2, 6, 5, 7)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(6).astype(np.float32)
    g = _groups(kind, 6)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    dyl = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    y, m, r = calls.forward(kind, x, w, w, False, g)
    yl, ml, rl = calls.forward(kind, xl, w, w, True, g)
    np.testing.assert_allclose(np.moveaxis(yl, -1, 1), y, atol=2e-6)
    np.testing.assert_allclose(ml, m, rtol=1e-6, atol=1e-7)
    dx = calls.backward(kind, dy, x, m, r, w, False, g)[0]
    dxl = calls.backward(kind, dyl, xl, m, r, w, True, g)[0]
    np.testing.assert_allclose(np.moveaxis(dxl, -1, 1), dx, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_out_and_strided_input(cpu_target, rng, kind):
    base = rng.standard_normal((3, 4, 10, 6))
    x = base[:, :, ::2, :]  # strided: copied once
    g = _groups(kind, 4)
    expect = calls.forward(kind, np.ascontiguousarray(x), None, None, False, g)[0]
    out = np.empty(x.shape)
    y = calls.forward(kind, x, None, None, False, g, out=out)[0]
    assert y is out
    np.testing.assert_array_equal(out, expect)
    dx_out = np.empty(x.shape)
    _, m, r = calls.forward(kind, x, None, None, False, g)
    dx = calls.backward(kind, x * 0 + 1, x, m, r, None, False, g, out=dx_out)[0]
    assert dx is dx_out
    # channels-last out must itself be C-contiguous: a transposed view is refused.
    xl = np.ascontiguousarray(np.moveaxis(base, 1, -1))
    bad = np.empty(base.shape)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        calls.forward(kind, xl, None, None, True, g, out=np.moveaxis(bad, 1, -1))


def test_batch_norm_running_stats_update(cpu_target, rng):
    x = rng.standard_normal((6, 3, 4, 5)).astype(np.float32)
    rm = np.full(3, 0.5, np.float32)
    rv = np.full(3, 2.0, np.float32)
    normlab.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.25)
    xd = x.astype(np.float64)
    bm = xd.mean((0, 2, 3))
    bv = xd.var((0, 2, 3), ddof=1)
    np.testing.assert_allclose(rm, 0.75 * 0.5 + 0.25 * bm, rtol=1e-6)
    np.testing.assert_allclose(rv, 0.75 * 2.0 + 0.25 * bv, rtol=1e-6)
    rm2 = rm.copy()
    normlab.batch_norm(x, running_mean=rm2, momentum=0.0)  # running_var optional
    np.testing.assert_array_equal(rm2, rm)


def test_empty_batch(cpu_target):
    x = np.empty((0, 4, 3), np.float32)
    y, m, r = normlab.group_norm(x, 2, return_stats=True)
    assert y.shape == x.shape and m.shape == (0, 2)
    y = normlab.batch_norm(x, running_mean=np.zeros(4, np.float32), running_var=np.ones(4, np.float32),
                           training=False)
    assert y.shape == x.shape


# ---- errors ---------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x = np.zeros((2, 4, 3), np.float32)
    w3 = np.ones(3, np.float32)
    rs = np.zeros(4, np.float32)
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    cases = [
        (ValueError, "weight", lambda: normlab.batch_norm(x, w3)),
        (ValueError, "bias", lambda: normlab.group_norm(x, 2, None, w3)),
        (ValueError, "running_mean", lambda: normlab.batch_norm(x, running_mean=np.zeros(3, np.float32))),
        (TypeError, "running_var", lambda: normlab.batch_norm(x, running_var=np.zeros(4))),
        (ValueError, "read-only", lambda: normlab.batch_norm(x, running_mean=ro)),
        (ValueError, "running_mean", lambda: normlab.batch_norm(x, running_mean=np.zeros(8, np.float32)[::2])),
        (ValueError, "required when training is False", lambda: normlab.batch_norm(x, training=False)),
        (ValueError, "running_var", lambda: normlab.batch_norm(x, running_mean=rs, training=False)),
        (ValueError, "momentum", lambda: normlab.batch_norm(x, momentum=1.5)),
        (ValueError, "momentum", lambda: normlab.batch_norm(x, momentum=-0.1)),
        (TypeError, "momentum", lambda: normlab.batch_norm(x, momentum=None)),
        (ValueError, "more than 1 value per channel", lambda: normlab.batch_norm(np.zeros((1, 4), np.float32))),
        (ValueError, "num_groups", lambda: normlab.group_norm(x, 3)),
        (ValueError, "num_groups", lambda: normlab.group_norm(x, 0)),
        (ValueError, "num_groups", lambda: normlab.group_norm(x, -2)),
        (TypeError, "num_groups", lambda: normlab.group_norm(x, 2.0)),
        (ValueError, "num_groups", lambda: normlab.group_norm_backward(x, x, np.zeros((2, 3), np.float32),
                                                                       np.zeros((2, 3), np.float32), 3)),
        (ValueError, "eps", lambda: normlab.instance_norm(x, eps=0.0)),
        (ValueError, "channel_axis", lambda: normlab.instance_norm(np.zeros((2, 3, 4, 5), np.float32), channel_axis=2)),
        (ValueError, "channel_axis", lambda: normlab.batch_norm(x, channel_axis=5)),
        (TypeError, "channel_axis", lambda: normlab.batch_norm(x, channel_axis=None)),
        (TypeError, "x", lambda: normlab.batch_norm(x.astype(np.int32))),
        (TypeError, "x", lambda: normlab.group_norm([[1.0]], 1)),
        (ValueError, "at least 2 dimensions", lambda: normlab.batch_norm(np.zeros(4, np.float32))),
        (ValueError, "spatial", lambda: normlab.instance_norm(np.zeros((2, 4, 1), np.float32))),
        (TypeError, "weight", lambda: normlab.batch_norm(x, np.ones(4))),
        (ValueError, "mean", lambda: normlab.batch_norm_backward(x, x, np.zeros(3, np.float32), rs)),
        (ValueError, "rstd", lambda: normlab.group_norm_backward(x, x, np.zeros((2, 2), np.float32),
                                                                 np.zeros((2, 4), np.float32), 2)),
        (ValueError, "dy", lambda: normlab.instance_norm_backward(x[:1], x, np.zeros((2, 4), np.float32),
                                                                  np.zeros((2, 4), np.float32))),
        (ValueError, "overlap", lambda: normlab.batch_norm(x, out=x)),
        (ValueError, "out", lambda: normlab.group_norm(x, 2, out=np.zeros((2, 4, 4), np.float32))),
        (TypeError, "return_stats", lambda: normlab.group_norm(x, 2, return_stats="yes")),
        (TypeError, "training", lambda: normlab.batch_norm(x, training=None)),
    ]
    for exc, text, fn in cases:
        with pytest.raises(exc, match=text):
            fn()


@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm", "group_norm"])
def test_out_overlapping_a_strided_input_raises(fn):
    """x is copied to a contiguous array first; the overlap check must see the caller's x."""
    base = np.ones(2 * 4 * 6 * 2, np.float32)
    x = base[::2].reshape(2, 4, 6)
    out = base[48:].reshape(2, 4, 6)
    args = (x, 2) if fn == "group_norm" else (x,)
    with pytest.raises(ValueError, match="out"):
        getattr(normlab, fn)(*args, out=out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["batch", "group"])
def test_sets_in_cache_fused_match_the_two_pass_path(cpu_target, rng, kind, dtype):
    """Channels-first sets that fit in cache go one task per set (statistics, then output while
    the set is still in cache) where there are 8 sets or more; fewer go through the two passes
    over the whole tensor. A set's results depend on its own data only, in either path: the first
    4 channels of an 8-set tensor (fused) equal the same 4 channels alone (two-pass) bitwise."""
    n, c = (6, 8) if kind == "batch" else (1, 32)
    g = None if kind == "batch" else 8
    x = (rng.standard_normal((n, c, 9, 7)) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w = rng.standard_normal(c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    half = c // 2
    fused = calls.forward(kind, x, w, b, False, g)
    alone = calls.forward(kind, np.ascontiguousarray(x[:, :half]), w[:half], b[:half], False, g and g // 2)
    assert np.array_equal(fused[0][:, :half], alone[0])
    for full, part in zip(fused[1:], alone[1:]):
        assert np.array_equal(full.reshape(n, -1)[:, : part.size // n] if kind == "group" else full[:half], part)
    dx, dw, db = calls.backward(kind, dy, x, fused[1], fused[2], w, False, g)
    part_stats = [a.reshape(n, -1)[:, : g // 2] if kind == "group" else a[:half] for a in fused[1:]]
    dxa, dwa, dba = calls.backward(kind, np.ascontiguousarray(dy[:, :half]), np.ascontiguousarray(x[:, :half]),
                                   *part_stats, w[:half], False, g and g // 2)
    assert np.array_equal(dx[:, :half], dxa)
    assert np.array_equal(dw[:half], dwa) and np.array_equal(db[:half], dba)
    if kind == "batch":  # inference backward too
        dx, dw, _ = normlab.batch_norm_backward(dy, x, fused[1], fused[2], w, training=False)
        dxa, dwa, _ = normlab.batch_norm_backward(np.ascontiguousarray(dy[:, :half]), np.ascontiguousarray(x[:, :half]),
                                                  fused[1][:half], fused[2][:half], w[:half], training=False)
        assert np.array_equal(dx[:, :half], dxa) and np.array_equal(dw[:half], dwa)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["instance", "group"])
def test_samples_in_cache_fused_match_the_two_pass_path(cpu_target, num_threads, rng, kind, dtype):
    """Channels-last group and instance norm samples that fit in cache go one task per sample
    (statistics, then output while the sample is still in cache) where there are 8 samples or
    more; fewer go through the two passes over the whole tensor. A sample's results depend on its
    own data only: the first 4 samples of 8 (fused) equal the same 4 alone (two-pass) bitwise,
    for every thread count, and dweight/dbias add every sample's sums."""
    n, c = 8, 32
    g = 8 if kind == "group" else None
    x = (rng.standard_normal((n, 9, 7, c)) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w = rng.standard_normal(c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    alone = calls.forward(kind, x[:4].copy(), w, b, True, g)
    alone_dx = calls.backward(kind, dy[:4].copy(), x[:4].copy(), alone[1], alone[2], w, True, g)[0]
    for threads in (1, 2, 3):
        normlab.set_num_threads(threads)
        fused = calls.forward(kind, x, w, b, True, g)
        for full, part in zip(fused, alone):
            assert np.array_equal(full[:4], part)
        dx, dw, db = calls.backward(kind, dy, x, fused[1], fused[2], w, True, g)
        assert np.array_equal(dx[:4], alone_dx)
        _, rdw, rdb = ref_backward(dy, x, fused[1], fused[2], kind, g, w, True)
        tol = 2e-5 if dtype == np.float32 else 1e-11
        assert np.abs(dw - rdw).max() < tol * (np.abs(rdw).max() + 1)
        assert np.abs(db - rdb).max() < tol * (np.abs(rdb).max() + 1)
    # One sample far from its shift is summed again in double; the others are untouched.
    x[5, 0, 0, :] = 1e18
    y = calls.forward(kind, x, None, None, True, g)[0]
    ry = ref_forward(x, kind, g, cl=True)[0]
    assert (np.abs(y - ry) / np.maximum(1.0, np.abs(ry))).max() < 2e-6
    assert np.array_equal(y[:4], calls.forward(kind, x[:4].copy(), None, None, True, g)[0])
