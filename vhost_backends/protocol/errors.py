"""The vhost-user branch of the error tree (STYLE.md §4).

Names follow rust-vmm's ``vhost::vhost_user::Error`` variants.  Every error here is a
front-end fault or a connection event: it stops at the connection, which is closed
with a logged reason while the daemon goes on listening.  ``should_reconnect`` says
whether a front-end may simply connect again (rust-vmm's ``should_reconnect``
classifier): true for a peer that went away or broke framing, false for a
negotiation that will fail the same way next time.
"""

from __future__ import annotations

from virtio_queue.errors import VirtioError

__all__ = [
    "Disconnected",
    "FeatureMismatch",
    "InactiveFeature",
    "InactiveOperation",
    "IncorrectFds",
    "InvalidMessage",
    "OversizedMessage",
    "PartialMessage",
    "VhostUserError",
]


class VhostUserError(VirtioError):
    """Root of the vhost-user errors; the connection that raised it is closed."""

    #: Whether the session may be retried as is on a new connection.
    should_reconnect: bool = False


class InvalidMessage(VhostUserError, ValueError):
    """A message breaks the vhost-user spec: bad header flags, unknown request, wrong
    payload size, an out-of-range field, or a request out of order.  Close the
    connection; the same front-end will do the same again."""


class PartialMessage(VhostUserError):
    """The peer stopped sending in the middle of a message (EOF or read timeout)."""

    should_reconnect = True


class OversizedMessage(InvalidMessage):
    """A header announces a payload larger than the bound for its request
    (:data:`~vhost_backends.protocol.codes.MAX_MSG_SIZE`); nothing of it is read."""


class IncorrectFds(InvalidMessage):
    """A message carries more or fewer file descriptors than its request takes, or
    the kernel truncated the ancillary data.  Every received fd is closed."""


class InactiveFeature(InvalidMessage):
    """A request needs a (protocol) feature that was not negotiated, e.g.
    SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES or GET_CONFIG without
    the CONFIG protocol feature."""


class InactiveOperation(InvalidMessage):
    """A request the back-end does not implement, or one that is not allowed in the
    current state (before SET_OWNER, on a stopped ring)."""


class FeatureMismatch(InvalidMessage):
    """The front-end acknowledged (protocol) feature bits the back-end never offered,
    or omitted one the back-end requires (XEN_MMAP in a Xen build)."""


class Disconnected(VhostUserError):
    """The peer closed the connection (EOF between messages, ECONNRESET, EPIPE)."""

    should_reconnect = True
