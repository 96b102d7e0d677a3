import os
import sys

import pytest
import torch


# The helpers (tiny_models, mask_reference) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

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
