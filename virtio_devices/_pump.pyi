from typing_extensions import disjoint_base

@disjoint_base
class FdPump:
    """Base of the compiled servers of a host fd."""

    error: BaseException | None
    pumped: int
    handed_over: int
    def pump(self) -> bool: ...

@disjoint_base
class EventfdPump(FdPump):
    """An eventfd's reader: the smallest pump (an example, the tests' probe)."""

    fd: int
    total: int
    pending: int
    hand_over_at: int
    raise_at: int
    def __init__(self, fd: int, *, hand_over_at: int = 0, raise_at: int = 0) -> None: ...
