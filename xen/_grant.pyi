from virtio_queue import GuestRegion
from xen.flags import XenMmapFlags, XenSys

def debug_counters() -> dict[str, int]: ...
def ioctl_layout() -> dict[str, int]: ...

class XenGrantRegion(GuestRegion):
    """A region of granted pages mapped through gntdev (xen mmap flags GRANT)."""

    @property
    def domid(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def xen_mmap_flags(self) -> XenMmapFlags: ...
    @property
    def map_len(self) -> int: ...
    @classmethod
    def map(
        cls,
        fd: int | None,
        size: int,
        guest_addr: int,
        domid: int,
        *,
        writable: bool = True,
        xen_sys: XenSys | None = None,
    ) -> XenGrantRegion: ...
