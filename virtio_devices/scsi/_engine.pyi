from collections.abc import Callable, Sequence
from typing import final

from virtio_devices._pump import FdPump
from virtio_queue import DescriptorChain, Queue

@final
class Engine:
    fd: int
    inline_reads: int
    ring_requests: int
    pool_requests: int
    direct_threads: int
    fixed_max: int
    fixed_requests: int
    fixed_registrations: int
    fixed_error: int
    fixed_bytes: int
    fixed_populate_max: int
    fixed_retry_ns: int
    vec_fixed: bool
    pool_min_read: int
    pool_min_write: int
    pool_min_cached_read: int
    pool_min_cached_write: int
    submit_batch: int
    submit_lead: int
    submit_calls: int
    signal_every: int
    early_signals: int
    signal_adapt: bool
    switch_counter: Callable[[], int] | None
    early_preempted: int
    pumped_chains: int
    reaps_pumped: int
    defer_taskrun: bool
    ring_moves: int
    pumped_bytes: int
    hold_min_ns: int
    hold_max_ns: int
    inline_writes: int
    slow_writes: int
    slow_ns: int
    spin_ns: int
    spin_min: int
    spin_max_ns: int
    spin_give_way: bool
    loop_fd: int
    spin_reaps: int
    spin_preempted: int
    def __init__(
        self,
        fds: Sequence[int],
        blocks: Sequence[int],
        read_only: Sequence[bool],
        entries: int = 256,
        inline_writes: bool = True,
        direct_fds: Sequence[int] | None = None,
        defer_taskrun: bool = True,
    ) -> None: ...
    def release_fixed(self) -> bool: ...
    def attach(
        self, queues: Sequence[Queue], signallers: Sequence[Callable[[], None]] | None = None
    ) -> None: ...
    def in_flight(self, index: int = -1) -> int: ...
    def submit(self, index: int, chain: DescriptorChain) -> int: ...
    def serve(
        self, index: int
    ) -> tuple[
        int,
        int,
        int,
        list[tuple[int, DescriptorChain, bool, bool, int, int, int, int, int]],
        list[DescriptorChain],
        int,
    ]: ...
    def flush(self) -> None: ...
    def wait(self, timeout: float) -> bool: ...
    def reap(
        self,
    ) -> tuple[int, int, int, list[tuple[int, DescriptorChain, bool, bool, int, int, int, int, int]]]: ...

@final
class RequestPump(FdPump):
    def __init__(self, engine: Engine, index: int, device: object) -> None: ...

@final
class ReapPump(FdPump):
    def __init__(self, engine: Engine, device: object) -> None: ...
