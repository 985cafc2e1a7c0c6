"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module, restored after it.

    Tiny tensors: on a shared 2-core machine OpenMP thread hand-off and spinning dominate (1 s vs
    3 ms per tiny VAE encode; elementwise trig 100x slower). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; module scope, so module fixtures
    that build models or data run single-threaded too.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
