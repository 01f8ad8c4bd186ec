"""Back-end state of the vrings of one vhost-user connection, and the device's interrupt.

rust-vmm's vhost-user-backend keeps this in ``vring.rs`` (``VringState``): per ring the
:class:`~virtio_queue.Queue`, the kick, call and err eventfds and the started/enabled
flags of the spec's "Ring states".  The handler (handler.py) owns the rings and
changes them only on its loop thread, so nothing here locks.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from virtio_queue import Queue

    from .event_loop import FillRing
    from .handler import VhostUserHandler
    from .inflight import InflightQueueRegion

__all__ = ["VhostUserInterrupt", "Vring"]


class Vring:
    """Back-end state of one vring ("Ring states" of the vhost-user spec).

    A ring is *started* by SET_VRING_KICK with an fd and stopped by GET_VRING_BASE,
    *enabled* by SET_VRING_ENABLE (or by SET_FEATURES without
    VHOST_USER_F_PROTOCOL_FEATURES), and *polled* while started, enabled and fully
    configured (:meth:`VhostUserHandler._update_ring`).
    """

    __slots__ = (
        "addr_set",
        "call_fd",
        "enabled",
        "err_fd",
        "fill",
        "index",
        "inflight",
        "kick_fd",
        "polled",
        "queue",
        "started",
    )

    def __init__(self, index: int, queue: Queue) -> None:
        self.index = index
        self.queue = queue
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.started = False
        self.enabled = False
        self.addr_set = False
        self.polled = False
        self.inflight: InflightQueueRegion | None = None
        # Set while the ring's kicks are served in compiled code (see _update_ring).
        self.fill: FillRing | None = None

    def signal_err(self) -> None:
        """Tell the front-end the ring failed (SET_VRING_ERR's eventfd), if it gave one.

        vhost-user's equivalent of the VIRTIO NEEDS_RESET status bit: QEMU reports the
        error and can restart the ring.  A lost write (the fd gone) changes nothing.
        """
        if self.err_fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self.err_fd, 1)


class VhostUserInterrupt:
    """The device's :class:`~virtio_devices.base.Interrupt`: call eventfds, and
    CONFIG_CHANGE_MSG on the back-end channel."""

    __slots__ = ("_handler", "call_fds")

    def __init__(self, handler: VhostUserHandler, num_queues: int) -> None:
        self.call_fds = [-1] * num_queues
        self._handler = handler

    def signal_used(self, queue_index: int) -> None:
        fd = self.call_fds[queue_index]
        if fd >= 0:
            # A saturated counter means the front-end has a pending call anyway.
            # (try/except, not contextlib.suppress: this runs once per batch.)
            try:  # noqa: SIM105
                os.eventfd_write(fd, 1)
            except BlockingIOError:
                pass

    def signal_config_change(self) -> None:
        self._handler.send_config_change()
