"""Foreign and grant regions through the fake driver (Xen build only).

Everything above the system calls is real: the ioctl structures the driver
receives, the pfn and grant-reference lists, the mmap arguments, error handling,
and the unmap (and grant release) when the last reference goes away.
"""

from __future__ import annotations

import errno
import gc
import mmap
import os
from collections.abc import Iterator

import pytest

import virtio_queue
import xen
from virtio_queue import GuestMemory, GuestRegion
from virtio_queue.errors import GuestMemoryError
from xen.errors import InvalidXenFlags, XenMapError
from xen.flags import GNTDEV_PATH, PRIVCMD_PATH, XEN_GRANT_ADDR_OFF, XenMmapFlags
from xen.testing import EXPECTED_LAYOUT, FakeXenSys

if virtio_queue.BUILT_WITH_XEN:  # compiled only by a XEN=1 build
    from xen import _foreign, _grant
    from xen._foreign import SYS, LinuxXenSys, XenForeignRegion
    from xen._grant import XenGrantRegion

pytestmark = pytest.mark.xen

PAGE = mmap.PAGESIZE
FOREIGN, GRANT, NO_ADV = XenMmapFlags.FOREIGN, XenMmapFlags.GRANT, XenMmapFlags.NO_ADVANCE_MAP
MAPPING = mmap.MAP_SHARED | getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python 3.12 has it
RW = mmap.PROT_READ | mmap.PROT_WRITE


@pytest.fixture
def fake() -> Iterator[FakeXenSys]:
    sys = FakeXenSys()
    yield sys
    gc.collect()
    # Whatever a test did, every mapping, reservation and fd must be gone by now.
    assert sys.mappings == {}
    assert sys.live_grants == {}
    assert sys.open_fds == {}


def _counters() -> dict[str, int]:
    return {
        **{f"f_{k}": v for k, v in _foreign.debug_counters().items()},
        **{f"g_{k}": v for k, v in _grant.debug_counters().items()},
    }


# --- foreign (privcmd) --------------------------------------------------------------


def test_foreign_region_maps_every_pfn_of_the_range(fake: FakeXenSys) -> None:
    gpa = 0x4000_0000
    r = xen.map_region(None, 3 * PAGE + 10, gpa, 0, FOREIGN, 7, xen_sys=fake)
    assert isinstance(r, XenForeignRegion)
    assert (r.guest_addr, r.size, r.domid, r.map_len) == (gpa, 3 * PAGE + 10, 7, 4 * PAGE)
    assert r.xen_mmap_flags == FOREIGN
    [batch] = fake.batches
    assert batch.num == 4 and batch.dom == 7
    assert batch.pfns == tuple(range(gpa // PAGE, gpa // PAGE + 4))
    assert batch.addr == r.host_addr
    # mmap of the privcmd fd at offset 0, whole pages, shared; then the batch; then close.
    ops = [c[0] for c in fake.calls]
    assert ops == ["open", "mmap", "ioctl", "close"]
    assert fake.calls[0] == ("open", PRIVCMD_PATH)
    assert fake.calls[1][1:] == (4 * PAGE, RW, MAPPING, batch.fd, 0)
    assert fake.calls[2][2] == EXPECTED_LAYOUT["IOCTL_PRIVCMD_MMAPBATCH_V2"]
    # The mapping is real memory in the fake: the region works as guest memory.
    mem = GuestMemory([r])
    mem.write(gpa + 3 * PAGE, b"xen!")
    assert mem.read(gpa + 3 * PAGE, 4) == b"xen!"
    assert mem.check_range(gpa, 3 * PAGE + 10)
    assert not mem.check_range(gpa, 3 * PAGE + 11)
    del mem, r


def test_foreign_region_unmapped_when_last_user_goes(fake: FakeXenSys) -> None:
    before = _counters()
    r = xen.map_region(None, PAGE, 0, 0, FOREIGN, 1, xen_sys=fake)
    addr = r.host_addr
    mem = GuestMemory([r])
    del r
    gc.collect()
    assert addr in fake.mappings  # GuestMemory still holds it
    mem.clear()
    del mem
    gc.collect()
    assert fake.mappings == {}
    assert fake.calls[-1] == ("munmap", addr, PAGE)
    after = _counters()
    assert after["f_maps"] - before["f_maps"] == 1
    assert after["f_unmaps"] - before["f_unmaps"] == 1


def test_foreign_region_uses_the_front_ends_fd_and_leaves_it_open(fake: FakeXenSys) -> None:
    fd = fake.open(PRIVCMD_PATH)
    r = xen.map_region(fd, PAGE, PAGE, 0, FOREIGN, 3, xen_sys=fake)
    assert fake.batches[0].fd == fd
    assert fd in fake.open_fds  # the caller closes its fd
    assert ("open", PRIVCMD_PATH) not in fake.calls[1:]
    del r
    fake.close(fd)


def test_foreign_region_read_only(fake: FakeXenSys) -> None:
    r = xen.map_region(None, PAGE, 0, 0, FOREIGN, 1, writable=False, xen_sys=fake)
    assert not r.writable
    assert fake.calls[1][2] == mmap.PROT_READ
    mem = GuestMemory([r])
    with pytest.raises(GuestMemoryError, match="read-only"):
        mem.write(0, b"x")
    del mem, r


def test_missing_privcmd_is_a_clear_error(fake: FakeXenSys) -> None:
    fake.missing.add(PRIVCMD_PATH)
    msg = r"cannot open /dev/xen/privcmd: No such file or directory \(not a Xen"
    with pytest.raises(XenMapError, match=msg):
        xen.map_region(None, PAGE, 0, 0, FOREIGN, 1, xen_sys=fake)


def test_foreign_ioctl_failure_unmaps_and_closes(fake: FakeXenSys) -> None:
    req = EXPECTED_LAYOUT["IOCTL_PRIVCMD_MMAPBATCH_V2"]
    fake.fail[req] = OSError(errno.EPERM, os.strerror(errno.EPERM))
    with pytest.raises(XenMapError, match=r"IOCTL_PRIVCMD_MMAPBATCH_V2 for pfns 0x10\.\.\+0x2 of domain 4"):
        xen.map_region(None, 2 * PAGE, 0x10 * PAGE, 0, FOREIGN, 4, xen_sys=fake)
    assert [c[0] for c in fake.calls] == ["open", "mmap", "ioctl", "munmap", "close"]


def test_foreign_per_frame_error_is_not_ignored(fake: FakeXenSys) -> None:
    # MMAPBATCH_V2 returns 0 and reports per-frame failures in err[] only.
    fake.page_errors[0x21] = -errno.EFAULT
    fake.page_errors[0x23] = -errno.EFAULT
    msg = r"could not map pfn 0x21 of domain 2: Bad address \(2 of 4 pages failed\)"
    with pytest.raises(XenMapError, match=msg):
        xen.map_region(None, 4 * PAGE, 0x20 * PAGE, 0, FOREIGN, 2, xen_sys=fake)


def test_foreign_mmap_failure(fake: FakeXenSys) -> None:
    fake.fail["mmap"] = OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
    with pytest.raises(XenMapError, match=r"mmap of 0x.* bytes of privcmd fd .* Cannot allocate memory"):
        xen.map_region(None, PAGE, 0, 0, FOREIGN, 1, xen_sys=fake)
    assert fake.batches == []


def test_foreign_limits_checked_before_any_system_call(fake: FakeXenSys) -> None:
    with pytest.raises(XenMapError, match="domid"):
        xen.map_region(None, PAGE, 0, 0, FOREIGN, 0x10000, xen_sys=fake)
    with pytest.raises(XenMapError, match="not page aligned"):
        xen.map_region(None, PAGE, 0x10, 0, FOREIGN, 1, xen_sys=fake)
    with pytest.raises(InvalidXenFlags):
        xen.map_region(None, PAGE, 0, 0, FOREIGN | NO_ADV, 1, xen_sys=fake)
    assert fake.calls == []


# --- grant (gntdev) ---------------------------------------------------------------


def test_grant_region_maps_refs_then_mmaps_at_index(fake: FakeXenSys) -> None:
    fake._next_index = 0x5000 * PAGE  # a non-zero offset, to see it used
    gpa = XEN_GRANT_ADDR_OFF | (0x30 * PAGE)
    r = xen.map_region(None, 2 * PAGE, gpa, 0, GRANT, 9, xen_sys=fake)
    assert isinstance(r, XenGrantRegion)
    assert (r.guest_addr, r.domid, r.index, r.map_len) == (gpa, 9, 0x5000 * PAGE, 2 * PAGE)
    [gm] = fake.grant_maps
    assert gm.refs == ((9, 0x30), (9, 0x31))
    assert [c[0] for c in fake.calls] == ["open", "ioctl", "mmap"]
    assert fake.calls[0] == ("open", GNTDEV_PATH)
    assert fake.calls[1][2] == EXPECTED_LAYOUT["IOCTL_GNTDEV_MAP_GRANT_REF"]
    assert fake.calls[2][1:] == (2 * PAGE, RW, MAPPING, gm.fd, 0x5000 * PAGE)
    mem = GuestMemory([r])
    mem.write_u64(gpa + PAGE, 0x1122334455667788)
    assert mem.read_u64(gpa + PAGE) == 0x1122334455667788
    del mem, r


def test_grant_region_teardown_order(fake: FakeXenSys) -> None:
    before = _counters()
    r = xen.map_region(None, PAGE, 0, 0, GRANT, 1, xen_sys=fake)
    assert isinstance(r, XenGrantRegion)
    fd, index, addr = fake.grant_maps[0].fd, r.index, r.host_addr
    n = len(fake.calls)
    del r
    gc.collect()
    # munmap first, then release the grants, then the region's own fd (rust-vmm's order;
    # the fake refuses UNMAP_GRANT_REF on a still-mapped range).
    assert fake.calls[n:] == [
        ("munmap", addr, PAGE),
        ("ioctl", fd, EXPECTED_LAYOUT["IOCTL_GNTDEV_UNMAP_GRANT_REF"]),
        ("close", fd),
    ]
    assert fake.grant_unmaps == [(index, 1)]
    after = _counters()
    for key in ("g_maps", "g_unmaps", "g_grant_maps", "g_grant_unmaps"):
        assert after[key] - before[key] == 1, key


def test_grant_region_dups_the_front_ends_fd(fake: FakeXenSys) -> None:
    fd = fake.open(GNTDEV_PATH)
    r = xen.map_region(fd, PAGE, 0, 0, GRANT, 1, xen_sys=fake)
    own = fake.grant_maps[0].fd
    assert own != fd and fake.calls[1] == ("dup", fd)
    fake.close(fd)  # the caller may close its fd at once
    del r
    gc.collect()
    assert own not in fake.open_fds


def test_grant_mmap_failure_releases_grants_and_fd(fake: FakeXenSys) -> None:
    fake.fail["mmap"] = OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
    with pytest.raises(
        XenMapError,
        match="mmap of 0x2000 bytes of gntdev at index 0x0 failed" if PAGE == 0x1000 else "mmap of",
    ):
        xen.map_region(None, 2 * PAGE, 0, 0, GRANT, 1, xen_sys=fake)
    assert fake.grant_unmaps == [(0, 2)]


def test_grant_ioctl_failure_closes_fd(fake: FakeXenSys) -> None:
    fake.fail[EXPECTED_LAYOUT["IOCTL_GNTDEV_MAP_GRANT_REF"]] = OSError(errno.EINVAL, "Invalid argument")
    msg = r"IOCTL_GNTDEV_MAP_GRANT_REF for grant refs 0x3\.\.\+0x1 of domain 6"
    with pytest.raises(XenMapError, match=msg):
        xen.map_region(None, PAGE, 3 * PAGE, 0, GRANT, 6, xen_sys=fake)


def test_missing_gntdev_is_a_clear_error(fake: FakeXenSys) -> None:
    fake.missing.add(GNTDEV_PATH)
    with pytest.raises(XenMapError, match="cannot open /dev/xen/gntdev"):
        xen.map_region(None, PAGE, 0, 0, GRANT, 1, xen_sys=fake)


def test_grant_no_advance_map_is_refused_clearly(fake: FakeXenSys) -> None:
    with pytest.raises(XenMapError, match="NO_ADVANCE_MAP: on-demand grant mapping is not supported"):
        xen.map_region(None, PAGE, 0, 0, GRANT | NO_ADV, 1, xen_sys=fake)
    assert fake.calls == []


# --- unix and the real system calls ----------------------------------------------------


def test_unix_flag_maps_the_fd_plainly() -> None:
    fd = os.memfd_create("xen-unix")
    try:
        os.ftruncate(fd, 2 * PAGE)
        os.pwrite(fd, b"hello", PAGE + 3)
        r = xen.map_region(fd, PAGE, 0x1000_0000, PAGE, 0, 0)
        assert type(r) is GuestRegion
        assert GuestMemory([r]).read(0x1000_0003, 5) == b"hello"
        with pytest.raises(XenMapError, match="needs the region's fd"):
            xen.map_region(None, PAGE, 0, 0, 0, 0)
    finally:
        os.close(fd)


def test_linux_sys_reports_errors_as_oserror() -> None:
    assert isinstance(SYS, LinuxXenSys)
    with pytest.raises(FileNotFoundError):
        SYS.open("/nonexistent/xen/privcmd")
    with pytest.raises(OSError) as info:
        SYS.ioctl(-1, EXPECTED_LAYOUT["IOCTL_PRIVCMD_MMAPBATCH_V2"], 0)
    assert info.value.errno == errno.EBADF
    addr = SYS.mmap(PAGE, RW, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, -1, 0)
    SYS.munmap(addr, PAGE)
    with pytest.raises(OSError):
        SYS.mmap(PAGE, RW, mmap.MAP_SHARED, -1, 0)


def test_default_sys_without_xen_fails_cleanly() -> None:
    # On these machines /dev/xen does not exist: the real path must say so.
    if os.path.exists(PRIVCMD_PATH):
        pytest.skip("a real Xen host")
    with pytest.raises(XenMapError, match="cannot open /dev/xen/privcmd"):
        xen.map_region(None, PAGE, 0, 0, FOREIGN, 1)
