import os

import pytest
import torch

import fastitm


def pytest_collection_modifyitems(config, items):
    # GPU tests run only where a CUDA device exists; everything else always runs.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
