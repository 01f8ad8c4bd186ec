"""Host backends: what a device talks to on the host side, behind small Protocols.

A device takes its host backend in its constructor and never opens device nodes
itself (DESIGN.md, "virtio_devices").  Each backend has a simulated twin usable in
tests and, where upstream offers one, from the CLI.

* :mod:`virtio_devices.hosts.files`: entropy sources for virtio-rng.
"""

from __future__ import annotations

from .files import BytesEntropySource, EntropySource, FdEntropySource, FileEntropySource

__all__ = ["BytesEntropySource", "EntropySource", "FdEntropySource", "FileEntropySource"]
