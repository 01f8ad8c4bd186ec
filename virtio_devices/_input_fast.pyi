from collections import deque

from virtio_queue import DescriptorChain, Queue

INPUT_EVENT_SIZE: int

def pump(
    fd: int, queue: Queue, buffers: deque[tuple[DescriptorChain, bool]], max_pending: int
) -> tuple[int, list[tuple[int, int, int]]]: ...
def event_buffer_ok(chain: DescriptorChain) -> bool: ...
def keep(queue: Queue, buffers: deque[tuple[DescriptorChain, bool]]) -> tuple[int, bool]: ...
