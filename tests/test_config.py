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
