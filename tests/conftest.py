"""Shared test setup.

Triton kernels run on CPU tensors under the Triton interpreter, which must be switched on before Triton is
first imported (``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is decorated).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # NOTE: the marker itself, not ``"gpu" in item.keywords``: keywords also hold the names of the parent
        # folders, so a checkout in a folder named gpu would skip every test.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tests use tiny tensors: one intra-op thread is faster for them and makes timings independent of the load
# on the machine. Subprocesses (CLI, distributed tests) are unaffected.
torch.set_num_threads(1)
