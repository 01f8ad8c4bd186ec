import collections
import socket
from typing import Any, final

from virtio_queue import Queue

from ._pump import FdPump

@final
class Conn:
    """One connection (§5.10.6.5): its host socket, credit counters and pending rx work."""

    key: tuple[int, int]
    @property
    def lport(self) -> int: ...
    @property
    def pport(self) -> int: ...
    sock: socket.socket
    fd: int
    seq: bool
    est: bool
    dead: bool
    ops: int
    in_ready: bool
    armed: bool
    muted: bool
    readable: bool
    host_eof: bool
    want_write: bool
    connecting: bool
    local_alloc: bool
    ok_reply: bool
    credit_asked: bool
    rx_cnt: int
    fwd_cnt: int
    last_fwd_sent: int
    tx_cnt: int
    peer_buf_alloc: int
    peer_fwd_cnt: int
    guest_shut: int
    host_shut: int
    txbuf: bytearray
    seq_msg: bytearray
    seq_out: collections.deque[bytes]
    seq_in: memoryview | None
    def __init__(self, key: tuple[int, int], sock: socket.socket, seq: bool) -> None: ...
    def peer_free(self) -> int: ...
    def pending_tx(self) -> int: ...

@final
class State:
    """What the compiled paths read of one device, as C fields."""

    compiled: bool
    rx_live: bool
    wait_fd: int
    nap_ns: int
    @property
    def naps(self) -> int: ...
    @property
    def naps_cut(self) -> int: ...
    @property
    def nap_skip(self) -> int: ...
    @property
    def nap_backoff(self) -> int: ...
    nogil: bool
    live: bool
    @property
    def idle(self) -> bool: ...
    @property
    def head_ok(self) -> bool: ...
    @property
    def nogil_chains(self) -> int: ...
    @property
    def chains(self) -> int: ...
    @property
    def part(self) -> bool: ...
    owner: Any
    @property
    def nogil_passes(self) -> int: ...
    @property
    def nogil_handed(self) -> int: ...
    def touch(self) -> None: ...
    def unpend(self) -> None: ...
    def __init__(
        self, conns: dict[tuple[int, int], Conn], ready: collections.deque[Conn],
        loose: collections.deque[tuple[bytes, bytes]], guest_cid: int, buf_alloc: int,
        by_fd: dict[int, Conn] | None = None,
    ) -> None: ...  # fmt: skip
    def set_connect_prefix(self, prefix: bytes | None) -> None: ...

def process_queue(device: Any, index: int) -> None: ...
def drain_tx(device: Any, st: State, queue: Queue) -> int: ...
def fill_rx(device: Any, st: State) -> int: ...

@final
class KickPump(FdPump):
    """The kicks of rx or tx served in compiled code (``VirtioDevice.kick_pump``)."""

    def __init__(self, device: Any, index: int) -> None: ...
    def serve_nogil(self) -> bool: ...

@final
class InputPump(FdPump):
    """A connection's host socket turned readable, served in compiled code."""

    def __init__(self, device: Any, conn: Conn) -> None: ...
    def __call__(self) -> None: ...
    def serve_nogil(self) -> bool: ...
