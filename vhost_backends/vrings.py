"""Back-end state of the vrings of one vhost-user connection, and the device's interrupt.

rust-vmm's vhost-user-backend keeps this in ``vring.rs`` (``VringState``): per ring the
:class:`~virtio_queue.Queue`, the kick, call and err eventfds and the started/enabled
flags of the spec's "Ring states".  The handler (handler.py) owns the rings and
changes them only on its loop thread, so nothing here locks.

Each ring's compiled kick path, a :class:`~vhost_backends._fastpath.KickRing`, lives
as long as the ring: the loop serves the ring's kicks with it while the ring is
polled, and it is the one owner of the ring's call eventfd, through which the
device's interrupt signals.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from .event_loop import KickRing

if TYPE_CHECKING:
    from virtio_devices._pump import RingWorker
    from virtio_queue import Queue

    from .handler import VhostUserHandler
    from .inflight import InflightQueueRegion

__all__ = ["VhostUserInterrupt", "Vring"]


class Vring:
    """Back-end state of one vring ("Ring states" of the vhost-user spec).

    A ring is *started* by SET_VRING_KICK with an fd and stopped by GET_VRING_BASE,
    *enabled* by SET_VRING_ENABLE (or by SET_FEATURES without
    VHOST_USER_F_PROTOCOL_FEATURES), and *polled* while started, enabled and fully
    configured (:meth:`VhostUserHandler._update_ring`).

    ``serve(index)`` serves the ring in Python (the device's ``process_queue``): the
    one call the ring's :attr:`kick` path makes per kick.
    """

    __slots__ = (
        "addr_set",
        "enabled",
        "err_fd",
        "index",
        "inflight",
        "kick",
        "kick_fd",
        "polled",
        "queue",
        "started",
        "worker",
    )

    def __init__(self, index: int, queue: Queue, serve: Callable[[int], object]) -> None:
        self.index = index
        self.queue = queue
        self.kick = KickRing(queue, index, serve)
        self.kick_fd = -1
        self.err_fd = -1
        self.started = False
        self.enabled = False
        self.addr_set = False
        self.polled = False
        self.inflight: InflightQueueRegion | None = None
        # The device's RingWorker serving this ring on its own thread, while polled
        # (VirtioDevice.ring_worker); None: the loop serves the kicks with `kick`.
        self.worker: RingWorker | None = None

    @property
    def call_fd(self) -> int:
        """The call eventfd (-1: none); its owner is :attr:`kick`."""
        return self.kick.call_fd

    def set_call_fd(self, fd: int) -> None:
        """SET_VRING_CALL: :attr:`kick` owns ``fd`` from now on and closes the one it
        replaces (-1: none)."""
        self.kick.set_call_fd(fd)

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

    __slots__ = ("_handler", "_rings")

    def __init__(self, handler: VhostUserHandler, rings: list[Vring]) -> None:
        self._rings = [r.kick for r in rings]
        self._handler = handler

    def signal_used(self, queue_index: int) -> None:
        """Write the ring's call eventfd, through its owner (the ring's KickRing)."""
        self._rings[queue_index].signal_used()

    def signaller(self, queue_index: int) -> Callable[[], None]:
        """Queue ``queue_index``'s :meth:`signal_used` as a callable of no argument:
        the ring's :class:`~virtio_devices._pump.Signaller`, which a compiled
        device path calls without a Python frame (or without the GIL).  Valid
        while this interrupt is (the rings it holds)."""
        return self._rings[queue_index].signaller

    def signal_config_change(self) -> None:
        self._handler.send_config_change()
