import os

import pytest
import torch

import fastitm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def tiny():
    return fastitm.testing.tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny.save(path)
    return path


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def triton_interpret():
    """Tests that run Triton kernels on CPU tensors through the interpreter (CPU-only machines;
    on a CUDA machine the `gpu` tests exercise the same kernels for real)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs compiled on this CUDA machine; the gpu tests cover it")
    yield
