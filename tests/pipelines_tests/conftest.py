from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """The tests run batch-1, <=32 px forwards: a second intra-op thread only adds overhead, and on a
    busy 2-core machine OpenMP's spinning makes each forward up to 100x slower. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
