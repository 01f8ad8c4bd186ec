from collections import deque
from collections.abc import Sequence
from typing import Any

from typing_extensions import disjoint_base

from virtio_devices._pump import FdPump
from virtio_queue import DescriptorChain, Queue

INPUT_EVENT_SIZE: int

def event_buffer_ok(chain: DescriptorChain) -> bool: ...

@disjoint_base
class InputState:
    """The input device's hot state, in C."""

    good: int
    active: bool
    broken: bool
    quiesced: bool
    records: bool
    compiled_keep: bool
    host_gone: bool
    skip_to_report: bool
    unnotified: bool
    groups: deque[Sequence[bytes]]
    partial: list[bytes]
    rest: list[tuple[int, int, int]]
    max_pending: int
    fd: int
    delivered: int
    compiled: int
    chains: int
    nbytes: int
    def __init__(self, max_pending: int, *, records: bool, compiled_keep: bool) -> None: ...
    def bind(self, queue: Queue, interrupt: Any) -> None: ...
    def unbind(self) -> None: ...
    @property
    def kept(self) -> int: ...
    def keep_head(self, head: int, ok: bool) -> None: ...
    def take_head(self) -> tuple[int, bool]: ...
    def first_ok(self) -> bool: ...
    def forget(self) -> list[int]: ...
    def write_event(self, head: int, event: bytes) -> int: ...
    def fast(self) -> bool: ...
    def deliver_records(self) -> tuple[int, list[tuple[int, int, int]]]: ...
    def keep(self) -> bool: ...

@disjoint_base
class InputKickPump(FdPump):
    """The input device's eventq kicks served in compiled code."""

    @property
    def state(self) -> InputState: ...
    def __init__(self, state: InputState) -> None: ...

@disjoint_base
class InputPump(FdPump):
    """The input device's host fd served in compiled code."""

    @property
    def state(self) -> InputState: ...
    def __init__(self, state: InputState) -> None: ...
