from typing_extensions import disjoint_base

from virtio_queue.source import ByteSource

NONBLOCK: int
INSECURE: int

def vdso_available() -> bool: ...
def _disable_vdso(disabled: bool) -> None: ...

@disjoint_base
class GetrandomSource(ByteSource):
    """``getrandom(2)`` bytes with ``flags``."""

    @property
    def flags(self) -> int: ...
    def __init__(self, fd: int = -1, flags: int = ...) -> None: ...
