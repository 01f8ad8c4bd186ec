from collections import deque
from typing import Any

from typing_extensions import disjoint_base

from virtio_devices._pump import FdPump
from virtio_queue import DescriptorChain, Queue

INPUT_EVENT_SIZE: int

def pump(
    fd: int, queue: Queue, buffers: deque[tuple[DescriptorChain, bool]], max_pending: int
) -> tuple[int, list[tuple[int, int, int]]]: ...
def event_buffer_ok(chain: DescriptorChain) -> bool: ...
def keep(queue: Queue, buffers: deque[tuple[DescriptorChain, bool]]) -> tuple[int, bool]: ...

@disjoint_base
class InputKickPump(FdPump):
    """The input device's eventq kicks served in compiled code."""

    device: Any
    def __init__(self, device: Any) -> None: ...

@disjoint_base
class InputPump(FdPump):
    """The input device's host fd served in compiled code."""

    device: Any
    fd: int
    rest: list[tuple[int, int, int]]
    def __init__(self, device: Any, fd: int) -> None: ...
