"""Shared test set-up: offline hub (downloads fail fast), few CPU threads, fixed seeds."""

import os

# Set before timm / huggingface_hub are imported anywhere: huggingface_hub reads it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the test machines have 2 cores shared with other work, and with the cores
# oversubscribed torch's 2-thread kernels ran 20-30x slower (threads stalling at barriers) than one.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
