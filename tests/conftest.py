"""Shared pytest configuration: hypothesis profiles and the basic guest-memory fixtures.

Hypothesis profiles: ``ci`` (the default; few, derandomized examples, no deadline since
the CI machine's two cores are shared) and ``dev`` (more examples).  Pick one with
``HYPOTHESIS_PROFILE=dev``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from virtio_queue import GuestMemory
from virtio_queue.testing import MockSplitQueue

settings.register_profile(
    "ci",
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Size of the default test guest memory (1 MiB from guest address 0).
GUEST_MEMORY_SIZE = 1 << 20


@pytest.fixture
def guest_memory() -> Iterator[GuestMemory]:
    """1 MiB of memfd-backed guest memory at guest address 0."""
    mem, fd = GuestMemory.memfd(GUEST_MEMORY_SIZE)
    try:
        yield mem
    finally:
        os.close(fd)


@pytest.fixture
def mock_queue(guest_memory: GuestMemory) -> MockSplitQueue:
    """A 16-entry MockSplitQueue (driver side) laid out from guest address 0."""
    return MockSplitQueue(guest_memory, 16)
