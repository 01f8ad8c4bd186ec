"""Fixtures for the device tests: a fake clock, event loop and interrupt."""

from __future__ import annotations

import pytest

from virtio_devices.testing import FakeClock, FakeInterrupt, FakeLoop


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def loop(clock: FakeClock) -> FakeLoop:
    return FakeLoop(clock)


@pytest.fixture
def interrupt() -> FakeInterrupt:
    return FakeInterrupt()
