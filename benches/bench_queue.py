"""Workload A/B (the Rust anchor's, see queue_table.py): pop + add_used of 1-descriptor chains,
queue size 256, batches of 256, driver and device both timed.

Goals (see queue_table.py for the table with the Rust anchor): the Cython-level loop
>= 1.0x rust-vmm virtio-queue; >= 2 M chains/s through the Python API; the ratio of
the Python API to the Python model (testing.RefQueue) on the same workload.
"""

from __future__ import annotations

from typing import Any

import vq_workloads as W

# Batches per benchmark call: small enough for the --benchmark-disable smoke run.
BATCHES_CY = 16
BATCHES_PY = 2


def test_a_cython(figure: Any) -> None:
    figure(W.make_a_cython(False), BATCHES_CY, group="A")


def test_b_cython_event_idx(figure: Any) -> None:
    figure(W.make_a_cython(True), BATCHES_CY, ref="A", group="A")


def test_a_python_api(figure: Any) -> None:
    figure(W.make_a_python(False), BATCHES_PY, ref="A-ref", group="A-py")


def test_a2_python_api_iter(figure: Any) -> None:
    figure(W.make_a2_python(), BATCHES_PY, ref="A-ref", group="A-py")


def test_a_ref_model(figure: Any) -> None:
    figure(W.make_a_python(True), 1, group="A-py")


def test_a0_python_publish_only(figure: Any) -> None:
    figure(W.make_a0_python(), BATCHES_PY, group="A-py")
