"""The privcmd/gntdev ioctl ABI: request numbers, structure sizes and field offsets.

``xen.testing.EXPECTED_LAYOUT`` is written down by hand from the uapi headers.
It is checked against a C program compiled with the real headers (every build,
when a C compiler and linux-libc-dev are present), and the compiled Xen modules
are checked against it (Xen build).  The fake driver decodes ioctls with it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

import virtio_queue
import xen
from xen.testing import EXPECTED_LAYOUT, ioc

if virtio_queue.BUILT_WITH_XEN:  # compiled only by a XEN=1 build
    from xen import _foreign, _grant

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64", "riscv64"),
    reason="EXPECTED_LAYOUT is the LP64 asm-generic ioctl encoding",
)

REPO = Path(xen.__file__).resolve().parent.parent

_FIELDS = {
    "privcmd_mmapbatch_v2": ["num", "dom", "addr", "arr", "err"],
    "ioctl_gntdev_map_grant_ref": ["count", "index", "refs"],
    "ioctl_gntdev_unmap_grant_ref": ["index", "count"],
}
_SIZES = [
    "privcmd_mmapbatch_v2",
    "ioctl_gntdev_grant_ref",
    "ioctl_gntdev_map_grant_ref",
    "ioctl_gntdev_unmap_grant_ref",
]
_IOCTLS = ["IOCTL_PRIVCMD_MMAPBATCH_V2", "IOCTL_GNTDEV_MAP_GRANT_REF", "IOCTL_GNTDEV_UNMAP_GRANT_REF"]


def _probe_source() -> str:
    lines = ['#include "xen/_uapi.h"', "#include <stdio.h>", "int main(void) {"]
    for name in _SIZES:
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
    for struct_name, fields in _FIELDS.items():
        for f in fields:
            lines.append(f'printf("{struct_name}.{f} %zu\\n", offsetof(struct {struct_name}, {f}));')
    lines.append('printf("xen_pfn_t %zu\\n", sizeof(xen_pfn_t));')
    for name in _IOCTLS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


def test_ioc_encoding() -> None:
    # _IOC(dir, type, nr, size) as in include/uapi/asm-generic/ioctl.h.
    assert ioc(0, "P", 4, 32) == 0x00205004
    assert ioc(0, "G", 0, 24) == 0x00184700
    assert ioc(0, "G", 1, 16) == 0x00104701


def test_expected_layout_matches_the_uapi_headers(tmp_path: Path) -> None:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    if not Path("/usr/include/xen/privcmd.h").exists():
        pytest.skip("no uapi Xen headers (apt-get install linux-libc-dev)")
    src = tmp_path / "probe.c"
    src.write_text(_probe_source())
    exe = tmp_path / "probe"
    subprocess.run([cc, "-Wall", "-Werror", f"-I{REPO}", str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    measured = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert measured == EXPECTED_LAYOUT


@pytest.mark.xen
def test_compiled_modules_match_expected_layout() -> None:
    compiled = {**_foreign.ioctl_layout(), **_grant.ioctl_layout()}
    assert compiled == EXPECTED_LAYOUT
