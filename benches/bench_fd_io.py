"""fd I/O: the Writer filling a 16-descriptor 64 KiB chain from a file in the page cache
(``Writer.read_from_fd(fd, offset=0)``) against one ``os.preadv`` of the same bytes
into one host buffer, measured in the same run (goal: >= 0.9x).  The Cython-level
variants split the Python call overhead from the kernel's cost of 16 iovecs.
"""

from __future__ import annotations

from typing import Any

import vq_workloads as W

ITERS = 8


def test_fd_preadv_reference(figure: Any) -> None:
    figure(W.make_fd_preadv(), ITERS, group="fd")


def test_fd_writer_read_from_fd(figure: Any) -> None:
    figure(W.make_fd_writer(16), ITERS, ref="preadv", group="fd")


def test_fd_writer_read_from_fd_spread(figure: Any) -> None:
    figure(W.make_fd_writer(16, spread=True), ITERS, ref="preadv", group="fd")


def test_fd_preadv_c_reference(figure: Any) -> None:
    figure(W.make_fd_preadv_c(1), ITERS, ref="preadv", group="fd")


def test_fd_preadv_c_16_iovecs(figure: Any) -> None:
    figure(W.make_fd_preadv_c(16), ITERS, ref="preadv-c1", group="fd")


def test_fd_writer_cython(figure: Any) -> None:
    figure(W.make_fd_writer_cython(16), ITERS, ref="preadv-c1", group="fd")
