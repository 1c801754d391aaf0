"""Shared test set-up: offline hub, small deterministic CPU runs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read once by huggingface_hub at import: set it first
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny test models run fastest (and steadiest) on one thread


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
