"""The plain calls of the channel norms (batch, group, instance; forward and backward) run in one
C++ step (normlab._core.*_plain): their results must be bitwise those of the fully checked
path, and every other call must be turned down (None) so that the Python layer checks it."""

import ml_dtypes
import numpy as np
import pytest

import normlab
from normlab import _core

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]  # half: float32 parameters
LAYOUTS = [((2, 8, 4, 4), 1), ((2, 4, 4, 8), -1), ((3, 8, 5), 1), ((3, 5, 8), -1), ((4, 8), 1), ((4, 8), -1)]


def _same(a, b):
    """Bitwise equality of two results: arrays, None, or tuples of them."""
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    if len(a) != len(b):
        return False
    for p, q in zip(a, b):
        if p is None or q is None:
            if p is not q:
                return False
        elif not (p.dtype == q.dtype and p.shape == q.shape
                  and np.array_equal(p.reshape(-1).view(np.uint8), q.reshape(-1).view(np.uint8))):
            return False
    return True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("stats", [False, True])
def test_plain_channel_calls_match_the_checked_path(cpu_target, dtype, shape, axis, stats):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    n, s = shape[0], int(np.prod(shape)) // (shape[0] * c)
    dtype = np.float32 if np.dtype(dtype).itemsize == 2 else dtype  # of parameters and statistics
    w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    checked_axis = np.int64(axis)  # not an int: the Python layer checks the call in full
    for weight, bias in ((None, None), (w, None), (w, b)):
        for training in (True, False):
            rm1, rv1 = rng.standard_normal(c).astype(dtype), rng.random(c).astype(dtype) + 0.5
            rm2, rv2 = rm1.copy(), rv1.copy()
            out = np.full_like(x, np.nan)
            plain = _core.batch_norm_plain(x, weight, bias, rm1, rv1, training, 0.25, 1e-3, axis, out, stats)
            assert plain is not None and (plain[0] if stats else plain) is out
            checked = normlab.batch_norm(x, weight, bias, rm2, rv2, training=training, momentum=0.25, eps=1e-3,
                                         channel_axis=checked_axis, return_stats=stats)
            assert _same(plain, checked) and _same(rm1, rm2) and _same(rv1, rv2)
            assert _same(normlab.batch_norm(x, weight, bias, rm1.copy(), rv1.copy(), training=training,
                                            momentum=0.25, eps=1e-3, channel_axis=axis, return_stats=stats),
                         normlab.batch_norm(x, weight, bias, rm1.copy(), rv1.copy(), training=training,
                                            momentum=0.25, eps=1e-3, channel_axis=checked_axis,
                                            return_stats=stats))
            mean, invstd = rng.standard_normal(c).astype(dtype), rng.random(c).astype(dtype) + 0.5
            plain = _core.batch_norm_backward_plain(dy, x, mean, invstd, weight, training, axis, None)
            assert plain is not None
            checked = normlab.batch_norm_backward(dy, x, mean, invstd, weight, training=training,
                                                  channel_axis=checked_axis)
            assert _same(plain, checked)
        for groups, instance in ((2, False), (c, False), (None, True)):
            if instance and s == 1:
                continue  # not a plain call (instance_norm needs 2 spatial elements)
            g = c if instance else groups
            out = np.full_like(x, np.nan)
            plain = _core.group_norm_plain(x, groups, weight, bias, 1e-3, axis, out, stats, instance)
            assert plain is not None and (plain[0] if stats else plain) is out
            if instance:
                checked = normlab.instance_norm(x, weight, bias, eps=1e-3, channel_axis=checked_axis,
                                                return_stats=stats)
            else:
                checked = normlab.group_norm(x, groups, weight, bias, eps=1e-3, channel_axis=checked_axis,
                                             return_stats=stats)
            assert _same(plain, checked)
            mean, rstd = rng.standard_normal((n, g)).astype(dtype), rng.random((n, g)).astype(dtype) + 0.5
            plain = _core.group_norm_backward_plain(dy, x, mean, rstd, groups, weight, axis, None, instance)
            assert plain is not None
            if instance:
                checked = normlab.instance_norm_backward(dy, x, mean, rstd, weight, channel_axis=checked_axis)
            else:
                checked = normlab.group_norm_backward(dy, x, mean, rstd, groups, weight, channel_axis=checked_axis)
            assert _same(plain, checked)


def _not_plain():
    """(label, function name, arguments) of channel-norm calls the plain path turns down."""
    x = np.ones((2, 8, 4, 4), np.float32)
    w = np.ones(8, np.float32)
    st = np.ones(8, np.float32)
    read_only = np.ones(8, np.float32)
    read_only.flags.writeable = False
    out = np.empty_like(x)
    gst = np.ones((2, 4), np.float32)

    def bn(**k):
        a = dict(x=x, weight=w, bias=None, running_mean=None, running_var=None, training=True, momentum=0.1,
                 eps=1e-5, channel_axis=1, out=None, return_stats=False)
        a.update(k)
        return tuple(a.values())

    def gn(**k):
        a = dict(x=x, num_groups=4, weight=w, bias=None, eps=1e-5, channel_axis=1, out=None, return_stats=False,
                 instance=False)
        a.update(k)
        return tuple(a.values())

    def bnb(**k):
        a = dict(dy=x, x=x, mean=st, invstd=st, weight=w, training=True, channel_axis=1, out=None)
        a.update(k)
        return tuple(a.values())

    def gnb(**k):
        a = dict(dy=x, x=x, mean=gst, rstd=gst, num_groups=4, weight=w, channel_axis=1, out=None, instance=False)
        a.update(k)
        return tuple(a.values())

    return [
        ("numpy int channel_axis", "batch_norm_plain", bn(channel_axis=np.int64(1))),
        ("channel_axis 2", "batch_norm_plain", bn(channel_axis=2)),
        ("channel_axis True", "batch_norm_plain", bn(channel_axis=True)),
        ("channel_axis 1.0", "group_norm_plain", gn(channel_axis=1.0)),
        ("huge channel_axis", "group_norm_plain", gn(channel_axis=2**70)),
        ("1-d x", "batch_norm_plain", bn(x=np.ones(8, np.float32))),
        ("float16 x with float16 weight", "batch_norm_plain", bn(x=x.astype(np.float16), weight=w.astype(np.float16))),
        ("bfloat16 x with bfloat16 running_mean", "batch_norm_plain",
         bn(x=x.astype(ml_dtypes.bfloat16), running_mean=st.astype(ml_dtypes.bfloat16), running_var=st.copy())),
        ("float16 x with float16 stats", "group_norm_backward_plain",
         gnb(dy=x.astype(np.float16), x=x.astype(np.float16), mean=gst.astype(np.float16))),
        ("int x", "batch_norm_plain", bn(x=x.astype(np.int32), weight=None)),
        ("strided x", "group_norm_plain", gn(x=np.ones((2, 8, 4, 8), np.float32)[..., ::2])),
        ("no spatial elements", "group_norm_plain", gn(x=np.ones((2, 8, 0), np.float32))),
        ("training numpy bool", "batch_norm_plain", bn(training=np.True_)),
        ("momentum above 1", "batch_norm_plain", bn(momentum=1.5)),
        ("momentum int", "batch_norm_plain", bn(momentum=0)),
        ("eps 0", "batch_norm_plain", bn(eps=0.0)),
        ("read-only running_mean", "batch_norm_plain", bn(running_mean=read_only, running_var=st.copy())),
        ("short running_var", "batch_norm_plain", bn(running_mean=st.copy(), running_var=st[:4].copy())),
        ("float64 running_mean", "batch_norm_plain", bn(running_mean=st.astype(np.float64), running_var=st.copy())),
        ("running_mean in out", "batch_norm_plain", bn(running_mean=out.reshape(-1)[:8], running_var=st.copy(),
                                                      out=out)),
        ("running_var is running_mean", "batch_norm_plain", bn(running_mean=st, running_var=st)),
        ("running_mean is weight", "batch_norm_plain", bn(running_mean=w, running_var=st.copy())),
        ("one value per channel", "batch_norm_plain", bn(x=np.ones((1, 8, 1, 1), np.float32))),
        ("inference without running stats", "batch_norm_plain", bn(training=False)),
        ("out is x", "batch_norm_plain", bn(out=x)),
        ("groups not dividing", "group_norm_plain", gn(num_groups=3)),
        ("groups 0", "group_norm_plain", gn(num_groups=0)),
        ("numpy int groups", "group_norm_plain", gn(num_groups=np.int64(4))),
        ("groups True", "group_norm_plain", gn(num_groups=True)),
        ("groups None", "group_norm_plain", gn(num_groups=None)),
        ("instance of one spatial element", "group_norm_plain", gn(x=np.ones((2, 8), np.float32), instance=True)),
        ("return_stats 1", "group_norm_plain", gn(return_stats=1)),
        ("backward short mean", "batch_norm_backward_plain", bnb(mean=np.ones(9, np.float32))),
        ("backward float64 dy", "batch_norm_backward_plain", bnb(dy=x.astype(np.float64))),
        ("backward one value per channel", "batch_norm_backward_plain",
         bnb(dy=np.ones((1, 8, 1, 1), np.float32), x=np.ones((1, 8, 1, 1), np.float32))),
        ("backward out is dy", "batch_norm_backward_plain", bnb(dy=out, out=out)),
        ("backward group stats shape", "group_norm_backward_plain", gnb(mean=np.ones((2, 2), np.float32))),
        ("backward groups not dividing", "group_norm_backward_plain", gnb(num_groups=3)),
        ("backward out is x", "group_norm_backward_plain", gnb(out=x)),
    ]


@pytest.mark.parametrize("label, name, args", _not_plain(), ids=[c[0] for c in _not_plain()])
def test_channel_calls_that_are_not_plain_are_turned_down(label, name, args):
    assert getattr(_core, name)(*args) is None
