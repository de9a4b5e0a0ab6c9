"""One calling convention for the three channel norms, shared by the channel-norm tests:
``kind`` is "batch", "instance" or "group", ``cl`` picks channels-last, and the forward returns
(y, mean, rstd)."""

import normlab


def forward(kind, x, w=None, b=None, cl=False, groups=None, **kw):
    ax = -1 if cl else 1
    if kind == "batch":
        return normlab.batch_norm(x, w, b, channel_axis=ax, return_stats=True, **kw)
    if kind == "instance":
        return normlab.instance_norm(x, w, b, channel_axis=ax, return_stats=True, **kw)
    return normlab.group_norm(x, groups, w, b, channel_axis=ax, return_stats=True, **kw)


def backward(kind, dy, x, mean, rstd, w=None, cl=False, groups=None, **kw):
    ax = -1 if cl else 1
    if kind == "batch":
        return normlab.batch_norm_backward(dy, x, mean, rstd, w, channel_axis=ax, **kw)
    if kind == "instance":
        return normlab.instance_norm_backward(dy, x, mean, rstd, w, channel_axis=ax, **kw)
    return normlab.group_norm_backward(dy, x, mean, rstd, groups, w, channel_axis=ax, **kw)


def stats_shape(kind, n, c, groups):
    return {"batch": (c,), "instance": (n, c), "group": (n, groups)}[kind]
