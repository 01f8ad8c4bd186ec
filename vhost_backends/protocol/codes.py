"""Request codes, header flags and feature bits of the vhost-user protocol.

Numbers and names are QEMU's ``docs/interop/vhost-user.rst`` ("Front-end message
types", "Back-end message types", "Protocol features"); the class names follow
rust-vmm's ``vhost::vhost_user::message`` so logs line up with the Rust daemons.
"""

from __future__ import annotations

import enum

__all__ = [
    "INFLIGHT_ALIGNMENT",
    "MAX_ATTACHED_FDS",
    "MAX_MEM_SLOTS",
    "MAX_MSG_SIZE",
    "VHOST_SET_CONFIG_TYPE_FRONTEND",
    "VHOST_SET_CONFIG_TYPE_MIGRATION",
    "VHOST_USER_CONFIG_SPACE_SIZE",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_MAX_CONFIG_SIZE",
    "VHOST_USER_VERSION",
    "VHOST_USER_VERSION_MASK",
    "VHOST_USER_VRING_IDX_MASK",
    "VHOST_USER_VRING_NOFD_MASK",
    "VHOST_VRING_F_LOG",
    "BackendReq",
    "FrontendReq",
    "VhostUserHeaderFlag",
    "VhostUserProtocolFeatures",
]


class FrontendReq(enum.IntEnum):
    """Requests a front-end sends to a back-end ("Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendReq(enum.IntEnum):
    """Requests a back-end sends on the channel of SET_BACKEND_REQ_FD ("Back-end message types")."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class VhostUserProtocolFeatures(enum.IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES, "Protocol features")."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


class VhostUserHeaderFlag(enum.IntFlag):
    """Bits of the header's ``flags`` word ("Header")."""

    VERSION = 0x1  # bits 0-1 hold the version, which is 1
    REPLY = 0x4
    NEED_REPLY = 0x8


VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
#: Every bit of ``flags`` that the spec does not define must be zero.
VHOST_USER_HEADER_RESERVED = 0xFFFFFFFF & ~(VHOST_USER_VERSION_MASK | 0x4 | 0x8)

#: Virtio feature bit 30, which vhost-user reuses to announce protocol features.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

#: SET_VRING_KICK/CALL/ERR payload: bits 0-7 are the vring index, bit 8 says
#: "no fd attached" (polling mode / notifications disabled).
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x100

#: ``vring address`` flags: log the used ring (dirty logging for migration).
VHOST_VRING_F_LOG = 0x1

#: Device config space offsets must stay below this (4 KiB minus nothing: the spec
#: bounds the message, rust-vmm bounds ``offset + size`` by 0x1000 too).
VHOST_USER_CONFIG_SPACE_SIZE = 0x1000
#: QEMU's VHOST_USER_MAX_CONFIG_SIZE: a GET/SET_CONFIG payload holds up to 256 bytes.
VHOST_USER_MAX_CONFIG_SIZE = 256
VHOST_SET_CONFIG_TYPE_FRONTEND = 0
VHOST_SET_CONFIG_TYPE_MIGRATION = 1

#: Largest payload we accept.  The spec's size field is a u32, but only
#: SET_MEM_TABLE and GET/SET_CONFIG vary, and both fit in 4 KiB (rust-vmm uses the
#: same bound); anything bigger is refused before it is read.
MAX_MSG_SIZE = 0x1000
#: Most fds one message may carry (SET_MEM_TABLE: one per region).  Ancillary
#: space for recvmsg is sized for exactly this many.
MAX_ATTACHED_FDS = 32
#: What GET_MAX_MEM_SLOTS answers (the value QEMU and rust-vmm use for
#: CONFIGURE_MEM_SLOTS back-ends).
MAX_MEM_SLOTS = 509

# The ``xen_mmap_flags`` of the Xen region descriptor are defined and validated in
# xen.flags (one definition for every layer).

#: Each queue's region in the inflight area is padded to this ("Inflight I/O tracking").
INFLIGHT_ALIGNMENT = 64
