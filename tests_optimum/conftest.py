"""Set-up of the optimum environment's tests (tox -e optimum): offline, one thread, as the main suite."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read once by huggingface_hub at import: set it first
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "LIGO_CACHE" not in os.environ:  # token caches of the standard library's source stay out of ~/.cache
    import tempfile

    os.environ["LIGO_CACHE"] = tempfile.mkdtemp(prefix="ligo-optimum-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # at import: module-scoped fixtures compute with the tests' thread count


@pytest.fixture(autouse=True)
def one_thread():
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
