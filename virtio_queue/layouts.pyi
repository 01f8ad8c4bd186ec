import struct

__all__ = [
    "INFLIGHT_DESC_SPLIT",
    "INFLIGHT_QUEUE_REGION_SPLIT",
    "MEMORY_REGION",
    "XEN_MEMORY_REGION",
    "Field",
    "Layout",
]

class Field(tuple[str, int, int]):
    def __new__(cls, name: str, offset: int, size: int) -> Field: ...
    @property
    def name(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def size(self) -> int: ...

class Layout:
    name: str
    size: int
    fields: tuple[Field, ...]
    struct: struct.Struct
    names: tuple[str, ...]
    def __init__(self, name: str, size: int, fields: list[Field] | tuple[Field, ...]) -> None: ...
    def offset(self, name: str) -> int: ...

MEMORY_REGION: Layout
XEN_MEMORY_REGION: Layout
INFLIGHT_DESC_SPLIT: Layout
INFLIGHT_QUEUE_REGION_SPLIT: Layout
