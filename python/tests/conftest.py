"""Shared pytest setup: import the in-tree package, find the headers, load the library.

Environment: MOEKIT_LIB (the library to test; meson sets it to the one it just built),
MOEKIT_INCLUDE_DIR (default: the repository's include/), MOEKIT_TEST_CC (a C compiler for the
layout test; default cc).
"""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.dirname(HERE)
REPO = os.path.dirname(PYTHON_DIR)
if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs torch and a CUDA device (skipped visibly otherwise)")


@pytest.fixture(scope="session")
def include_dir():
    return os.environ.get("MOEKIT_INCLUDE_DIR", os.path.join(REPO, "include"))


@pytest.fixture(scope="session")
def header(include_dir):
    import cheader
    return cheader.Header(include_dir)


@pytest.fixture(scope="session")
def lib():
    """The loaded libmoekit. With MOEKIT_LIB set, failing to load it is an error; without it, a
    tree with no build skips the tests that need the library."""
    from moekit import _lib
    try:
        return _lib.lib()
    except OSError as e:
        if os.environ.get("MOEKIT_LIB"):
            raise
        pytest.skip("libmoekit is not built: %s" % e)


@pytest.fixture(scope="session")
def cuda(lib):
    """torch with a CUDA device, or a visible skip. TF32 off: references compare in full fp32."""
    torch = pytest.importorskip("torch", reason="torch is not installed (the GPU tests compare against PyTorch)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda", torch.cuda.current_device())
