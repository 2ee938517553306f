"""Introspection: version, build description, CUDA availability, the thread setting."""
import importlib.metadata
import io
import warnings

import curvkit


def test_version_matches_package_metadata():
    assert curvkit.__version__ == importlib.metadata.version("curvkit")


def test_show_config_names_blas_threads_and_cuda():
    buf = io.StringIO()
    curvkit.show_config(file=buf)
    text = buf.getvalue()
    for key in ("version", "compiler", "blas", "threads", "cuda", "openmp"):
        assert f"  {key}" in text
    assert "OpenBLAS" in curvkit.config()["blas"]
    info = curvkit.config()
    # "yes (built with nvcc ...)" or "no (<why>: <what to install>)"
    assert info["cuda"].startswith("yes (built with nvcc" if curvkit._core.built_with_cuda() else "no (")
    if curvkit._core.built_with_cuda():
        assert info["cuda_architectures"] and info["cublas"]


def test_has_cuda_agrees_with_build_and_devices():
    assert curvkit.has_cuda() == (curvkit._core.built_with_cuda() and curvkit._core.cuda_device_count() > 0)


def test_one_thread_setting_governs_openmp_and_openblas():
    before = curvkit.get_num_threads()
    try:
        curvkit.set_num_threads(1)
        assert curvkit.get_num_threads() == 1
        assert curvkit.config()["blas_threads"] == "1"
        with warnings.catch_warnings():  # 3 may exceed this machine's cores (a RuntimeWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            curvkit.set_num_threads(3)
        assert curvkit.config()["threads"] == "3"
        assert curvkit.config()["blas_threads"] in ("3", curvkit.config()["blas_cores"])
    finally:
        curvkit.set_num_threads(before)
