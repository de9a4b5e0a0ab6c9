"""normlab: fast, accurate CPU normalization kernels for NumPy.

Layer, RMS, batch, instance and group normalization (forward and backward, fused with a residual
add for transformer blocks) and connected-component labelling of 2-D images, with SIMD kernels
chosen at run time and OpenMP threads. See ``help(normlab.norm)``, ``help(normlab.channel_norm)``
and ``help(normlab.ccl)`` for the data-handling rules and ``help(normlab.runtime)`` for targets
and threads.
"""

from . import _core
from .ccl import component_stats, label, largest_component, remove_small_components
from .channel_norm import (
    batch_norm,
    batch_norm_backward,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
)
from .norm import (
    add_layer_norm,
    add_layer_norm_backward,
    add_rms_norm,
    add_rms_norm_backward,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from .runtime import (
    cpu_targets,
    get_cpu_target,
    get_num_threads,
    set_cpu_target,
    set_num_threads,
    show_config,
)
from .runtime import _register_threadpoolctl, _warn_rejected_env_target

__version__ = _core.__version__

__all__ = [
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "add_layer_norm",
    "add_layer_norm_backward",
    "add_rms_norm",
    "add_rms_norm_backward",
    "batch_norm",
    "batch_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "group_norm",
    "group_norm_backward",
    "label",
    "component_stats",
    "largest_component",
    "remove_small_components",
    "cpu_targets",
    "get_cpu_target",
    "set_cpu_target",
    "get_num_threads",
    "set_num_threads",
    "show_config",
]

_warn_rejected_env_target()
_register_threadpoolctl()
del _register_threadpoolctl, _warn_rejected_env_target
