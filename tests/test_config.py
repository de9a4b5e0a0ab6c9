"""normlab.show_config() reports the build and the runtime choices."""

import normlab


def test_show_config_reports_targets_threads_and_openmp(capsys):
    normlab.show_config()
    text = capsys.readouterr().out
    assert f"normlab {normlab.__version__}" in text
    assert f"selected:           {normlab.get_cpu_target()}" in text
    assert f"threads:            {normlab.get_num_threads()}" in text
    assert "libgomp" in text or "libomp" in text
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
