"""SIMD target selection and threads.

normlab compiles every kernel once per SIMD target (x86-64: baseline, avx2, avx512, avx512bf16;
aarch64: baseline, neon) and picks the best one the CPU supports at import. The environment
variable ``NORMLAB_CPU_TARGET`` caps that choice (e.g. ``NORMLAB_CPU_TARGET=avx2``).

Threads: one global count shared by every calling thread, from ``OMP_NUM_THREADS`` or else the
CPUs the process may use. Small calls run on the calling thread. ``threadpoolctl``'s
``threadpool_limits`` limits normlab like any OpenMP library. In a child process created by
``fork()`` normlab runs single-threaded: GNU libgomp cannot start threads there once the parent
has used them, and a hang in a data-loader worker is worse than one thread. A build without
OpenMP (no runtime found when it was compiled, e.g. AppleClang without ``brew install libomp``,
or ``-DNORMLAB_OPENMP=OFF``) always runs single-threaded; ``show_config()`` says which it is.
"""

from __future__ import annotations

import warnings

from . import _core

__all__ = [
    "show_config",
    "cpu_targets",
    "get_cpu_target",
    "set_cpu_target",
    "get_num_threads",
    "set_num_threads",
]


def cpu_targets() -> list[str]:
    """SIMD targets compiled into this build that this CPU supports, worst to best."""
    return list(_core.supported_cpu_targets())


def get_cpu_target() -> str:
    """The SIMD target whose kernels run now."""
    return _core.get_cpu_target()


def set_cpu_target(name: str) -> None:
    """Run every kernel with the SIMD target ``name`` (one of ``cpu_targets()``), in-process."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str naming a cpu target, got {type(name).__name__}")
    _core.set_cpu_target(name)


def get_num_threads() -> int:
    """Threads normlab's parallel kernels use (1 in a forked child, and in a build without
    OpenMP)."""
    return _core.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the threads normlab uses, for calls from every Python thread. A build without OpenMP
    stays single-threaded and warns (RuntimeWarning) when asked for more than one."""
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            import numpy as np

            if isinstance(n, np.integer):
                n = int(n)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"n must be an int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > 1 << 16:
        raise ValueError(f"n must be <= 65536, got {n}")
    if n > 1 and not _core.openmp:
        warnings.warn(
            f"normlab was built without OpenMP and runs single-threaded; set_num_threads({n}) has no "
            "effect (install an OpenMP runtime, e.g. brew install libomp, and reinstall normlab)",
            RuntimeWarning,
            stacklevel=2,
        )
    _core.set_num_threads(n)


def _warn_rejected_env_target() -> None:
    rejected = _core.rejected_env_cpu_target()
    if rejected:
        warnings.warn(
            f"NORMLAB_CPU_TARGET={rejected!r} names no compiled target "
            f"({', '.join(_core.compiled_cpu_targets())}); using {get_cpu_target()!r}",
            RuntimeWarning,
            stacklevel=3,
        )


def _register_threadpoolctl() -> None:
    """Let threadpoolctl see and limit normlab's thread count."""
    try:
        import threadpoolctl
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return
    if not hasattr(threadpoolctl, "register"):  # pragma: no cover - threadpoolctl < 3.5
        return

    class NormlabController(threadpoolctl.LibController):
        user_api = "openmp"
        internal_api = "normlab"
        filename_prefixes = ("_core",)
        check_symbols = ("normlab_get_num_threads", "normlab_set_num_threads")

        def get_num_threads(self):
            get = getattr(self.dynlib, "normlab_get_num_threads", None)
            return get() if get is not None else None

        def set_num_threads(self, num_threads):
            set_ = getattr(self.dynlib, "normlab_set_num_threads", None)
            if set_ is not None:
                set_(int(num_threads))

        def get_version(self):
            return _core.__version__

    threadpoolctl.register(NormlabController)


def _openmp_library() -> str:
    """Path of the OpenMP runtime normlab runs on (Linux), else ''. Other packages (PyTorch)
    may load their own copies; the one bundled with normlab's wheel, else a system one, wins."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if path.rsplit("/", 1)[-1].startswith(("libgomp", "libomp", "libiomp")) and path not in found:
                    found.append(path)
    except OSError:
        return ""
    for preferred in ("normlab", "/usr/lib", ""):
        for path in found:
            if preferred in path:
                return path
    return ""


def _bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n and n % (1 << 20) == 0 else f"{n} bytes"


def show_config() -> None:
    """Print how normlab was built and what it runs with, like numpy.show_config()."""
    lines = [
        f"normlab {_core.__version__}",
        f"  compiler:           {_core.compiler}",
        f"  flags:              {_core.build_flags.strip()}",
        f"  cpu targets built:  {', '.join(_core.compiled_cpu_targets())}",
        f"  supported here:     {', '.join(_core.supported_cpu_targets())}",
        f"  selected:           {get_cpu_target()}",
        f"  OpenMP:             {_core.openmp_version()} ({_openmp_library() or 'runtime not found'})"
        if _core.openmp
        else "  OpenMP:             not in this build (single-threaded)",
        f"  threads:            {get_num_threads()}"
        + (" (forked child: single-threaded)" if _core.in_forked_child() else ""),
        f"  streamed outputs:   from {_bytes(_core.stream_min_bytes())}"
        f" (last-level cache {_bytes(_core.last_level_cache_bytes())},"
        f" counted {_bytes(_core.cache_counted_bytes())})",
        f"  L2 cache:           {_bytes(_core.l2_cache_bytes())} (which long rows split across threads)",
    ]
    print("\n".join(lines))
