"""The vhost-user side: wire protocol, back-end handler, event loop, daemons, front-end.

The equivalent of rust-vmm ``vhost`` (back-end half) and ``vhost-user-backend``.
Submodules are imported on demand; ``vhost_backends.protocol`` has no dependency
beyond :mod:`virtio_queue.errors`.
"""

from __future__ import annotations

__all__: list[str] = []
