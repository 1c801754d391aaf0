"""Shared test set-up: offline hub, small deterministic CPU runs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read once by huggingface_hub at import: set it first
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "LIGO_CACHE" not in os.environ:  # token caches of read-only corpora (the standard library) stay out of ~/.cache
    import tempfile

    os.environ["LIGO_CACHE"] = tempfile.mkdtemp(prefix="ligo-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models run no faster on two threads, and far slower when the cores are busy.  Set at import so that
# module-scoped fixtures compute with the same thread count as the tests that compare against them.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def one_thread():
    """Keep one thread in every test, whatever an earlier test set."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
