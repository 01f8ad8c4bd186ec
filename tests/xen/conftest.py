"""Xen tests: those marked ``xen`` need a ``XEN=1`` build and are skipped otherwise."""

from __future__ import annotations

import pytest

import virtio_queue


@pytest.fixture(autouse=True)
def _skip_without_xen_build(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("xen") is None:
        return
    if not virtio_queue.BUILT_WITH_XEN:
        pytest.skip("needs a XEN=1 build (XEN=1 python setup.py build_ext --inplace)")
