import os
import sys

import pytest
import torch


# The helpers (tiny_models, mask_reference) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# Under pytest-xdist (`-n N`) the workers share the machine's cores: each gets its share of torch's threads instead of
# all of them (oversubscribed OpenMP threads spin against each other and slow every worker down).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "original_tiny")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def reference_dir():
    path = os.environ.get("DYNAMIC_LLAVA_REFERENCE", REFERENCE_DIR)
    if not os.path.isdir(path):
        pytest.fail(f"Reference folder {path} not found (set DYNAMIC_LLAVA_REFERENCE)")
    return os.path.abspath(path)
