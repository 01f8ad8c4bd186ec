from collections.abc import Callable

from typing_extensions import disjoint_base

@disjoint_base
class FdPump:
    """Base of the compiled servers of a host fd."""

    error: BaseException | None
    pumped: int
    handed_over: int
    pumped_nogil: int
    @property
    def offers_nogil(self) -> bool: ...
    def pump(self) -> bool: ...
    def mute(self, on: bool = True) -> bool: ...

@disjoint_base
class EventfdPump(FdPump):
    """An eventfd's reader: the smallest pump (an example, the tests' probe)."""

    fd: int
    total: int
    pending: int
    hand_over_at: int
    raise_at: int
    notify_fd: int
    def __init__(
        self,
        fd: int,
        *,
        hand_over_at: int = 0,
        raise_at: int = 0,
        nogil: bool = False,
        notify_fd: int = -1,
    ) -> None: ...

@disjoint_base
class Signaller:
    """One queue's interrupt to the driver as a compiled object."""

    @property
    def call_fd(self) -> int: ...
    def set_fd(self, fd: int) -> None: ...
    def __call__(self) -> None: ...

@disjoint_base
class RingWorker:
    """Base of the compiled servers of a ring on a thread of its own."""

    error: BaseException | None
    notify_fd: int
    @property
    def kicks(self) -> int: ...
    @property
    def services(self) -> int: ...
    @property
    def nogil_services(self) -> int: ...
    @property
    def running(self) -> bool: ...
    def start(
        self,
        kick_fd: int,
        fail: Callable[[Exception], object] | None = None,
        post: Callable[[Callable[[], None]], object] | None = None,
    ) -> None: ...
    def wake(self) -> None: ...
    def stop(self) -> None: ...
    def take_failure(self) -> BaseException | None: ...
    def _run(self) -> None: ...

@disjoint_base
class EventfdRingWorker(RingWorker):
    """The smallest ring worker (an example, the tests' probe)."""

    served: int
    gate_fd: int
    raise_at: int
    entered_fd: int
    serve: Callable[[], object] | None
    nogil: bool
    hand_over_at: int
    nogil_calls: int
    def __init__(
        self,
        gate_fd: int = -1,
        raise_at: int = 0,
        entered_fd: int = -1,
        serve: Callable[[], object] | None = None,
        *,
        nogil: bool = False,
        hand_over_at: int = 0,
    ) -> None: ...
