"""normlab.show_config() reports the build and the runtime choices."""

import os
import pathlib

import normlab


def test_show_config_reports_targets_threads_and_openmp(capsys):
    normlab.show_config()
    text = capsys.readouterr().out
    assert f"normlab {normlab.__version__}" in text
    assert f"selected:           {normlab.get_cpu_target()}" in text
    assert f"threads:            {normlab.get_num_threads()}" in text
    if normlab._core.openmp:
        assert "libgomp" in text or "libomp" in text
    else:
        assert "OpenMP:             not in this build (single-threaded)" in text
    for target in normlab.cpu_targets():
        assert target in text


def test_core_stub_lists_every_binding():
    """_core.pyi describes every function and attribute the compiled module has."""
    import ast
    import pathlib

    from normlab import _core

    stub = pathlib.Path(normlab.__file__).with_name("_core.pyi")
    tree = ast.parse(stub.read_text())
    stubbed = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    stubbed |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
    compiled = {name for name in dir(_core) if not name.startswith("__")}
    assert compiled - stubbed == set()


def _sysfs_last_level_cache_bytes():
    """cpu0's highest-level cache as sysfs lists it (what lscpu shows), or None."""
    import pathlib

    best = None
    for index in sorted(pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        value = int(size.rstrip("KMG")) * scale
        if best is None or level > best[0]:
            best = (level, value)
    return None if best is None else best[1]


def test_last_level_cache_comes_from_sysfs_where_it_is_listed():
    """sysconf can report a VM host's whole L3 (320 MiB where lscpu shows 32 MiB): the size
    that decides streamed stores is the one sysfs lists for this CPU."""
    from normlab import _core

    expected = _sysfs_last_level_cache_bytes()
    got = _core.last_level_cache_bytes()
    assert got > 0
    if expected is not None:
        assert got == expected
    if "NORMLAB_STREAM_MIN_BYTES" not in os.environ:
        assert _core.stream_min_bytes() == _core.cache_counted_bytes() // 2


def test_cache_counted_is_at_most_32_mib_per_usable_cpu():
    """A VM's sysfs can list the whole host socket's L3 (260 MiB for 2 vCPUs): at most 32 MiB
    per CPU of the process's affinity mask count towards the streaming threshold."""
    from normlab import _core

    cpus = len(os.sched_getaffinity(0))
    assert _core.cache_counted_bytes() == min(_core.last_level_cache_bytes(), cpus * (32 << 20))


def test_show_config_reports_the_streaming_threshold(capsys):
    from normlab import _core

    normlab.show_config()
    text = capsys.readouterr().out
    assert f"last-level cache {_core.last_level_cache_bytes() >> 20} MiB" in text


def test_l2_cache_size_is_sysfs_l2(capsys):
    """The L2 size that picks the split rows comes from sysfs where it lists an L2, and
    show_config() reports it."""
    from normlab import _core

    sizes = set()
    for index in pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if level == "2" and kind != "Instruction":
            sizes.add(int(size[:-1]) << {"K": 10, "M": 20}[size[-1]])
    assert _core.l2_cache_bytes() > 0
    if sizes:
        assert _core.l2_cache_bytes() in sizes
    normlab.show_config()
    assert f"L2 cache:           {normlab.runtime._bytes(_core.l2_cache_bytes())}" in capsys.readouterr().out
