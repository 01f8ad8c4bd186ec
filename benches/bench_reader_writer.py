"""Workload C (the Rust anchor's, see queue_table.py): a 64 KiB chain of 1, 4 or 16 descriptors
through Writer and Reader, at every placement of the Python-side buffer (page-aligned,
page+1, page+16, a plain bytearray), against a page-aligned glibc memcpy of the same
bytes measured in the same run (goal: >= 0.8x everywhere).  Also glibc memcpy and our
vq_copy at those placements (glibc's `rep movsb` path collapses at some relative
alignments: the reason for vq_copy), the Python-API variant of C (information), and a
correctness check of vq_copy at every small size and alignment.  The anchor's
16 buffers are back to back in guest memory, which the Reader/Writer joins into
one segment; the "spread" figures leave a page between them (nothing to join).
"""

from __future__ import annotations

from typing import Any

import pytest
import vq_workloads as W

_bench = W._bench

ITERS = 8  # 64 KiB copies per benchmark call


COPY_CASES = [
    (pl, th, mode)
    for pl in W.ALIGNMENTS
    for th in (True, False)
    for mode in ("libc", "vq")
    if pl != "pg" or th
]  # page-aligned both ways is one case


@pytest.mark.parametrize(
    ("placement", "to_host", "mode"),
    COPY_CASES,
    ids=[f"{m}-{'G2H' if th else 'H2G'}-{pl}" for pl, th, m in COPY_CASES],
)
def test_copy_routine(figure: Any, placement: str, to_host: bool, mode: str) -> None:
    wl = W.make_memcpy(placement, to_host, mode)
    figure(wl, ITERS, ref=None if wl.name == "memcpy" else "memcpy", group="copy")


@pytest.mark.parametrize("placement", W.ALIGNMENTS)
@pytest.mark.parametrize("ndesc", W.NDESCS)
@pytest.mark.parametrize("device_writes", [True, False], ids=["Writer", "Reader"])
def test_c_cython(figure: Any, device_writes: bool, ndesc: int, placement: str) -> None:
    figure(
        W.make_c_cython(ndesc, device_writes, placement),
        ITERS,
        ref="memcpy",
        group=f"C-{'W' if device_writes else 'R'}{ndesc}",
    )


@pytest.mark.parametrize("placement", W.ALIGNMENTS)
@pytest.mark.parametrize("device_writes", [True, False], ids=["Writer", "Reader"])
def test_c_cython_spread(figure: Any, device_writes: bool, placement: str) -> None:
    """16 buffers that are not back to back: no segment joining (information)."""
    figure(
        W.make_c_cython(16, device_writes, placement, spread=True),
        ITERS,
        ref="memcpy",
        group=f"C-{'W' if device_writes else 'R'}16s",
    )


@pytest.mark.parametrize("ndesc", W.NDESCS)
@pytest.mark.parametrize("device_writes", [True, False], ids=["Writer", "Reader"])
def test_c_python_api(figure: Any, device_writes: bool, ndesc: int) -> None:
    figure(
        W.make_c_python(ndesc, device_writes, "pg"),
        ITERS,
        ref="memcpy",
        group=f"C-{'W' if device_writes else 'R'}{ndesc}",
    )


@pytest.mark.slow
def test_vq_copy_every_small_size_and_alignment() -> None:
    """vq_copy: every size 0..300 at every (src, dst) offset pair mod 64, guard bytes
    around the destination; the sizes around its vector threshold; a few large odd
    sizes; and the AVX2 routine alone at every size from 32 (its minimum)."""
    assert _bench.vq_copy_check(range(301)) == 301 * 64 * 64
    edge = [2046, 2047, 2048, 2049, 2050, 2079, 2081, 3001, 4095, 4096, 4097]
    assert _bench.vq_copy_check(edge) == len(edge) * 64 * 64
    big = [8191, 65535, 65536, 65537, 131071]
    assert _bench.vq_copy_check(big, max_align=9) == len(big) * 81
    if _bench.have_vector_copy():
        assert _bench.vq_copy_check(range(32, 301), vector_only=True) == 269 * 64 * 64
