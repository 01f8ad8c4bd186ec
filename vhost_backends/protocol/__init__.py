"""vhost-user wire protocol: request codes, message structs, validation and errors."""

from __future__ import annotations

from .codes import (
    MAX_ATTACHED_FDS,
    MAX_MEM_SLOTS,
    MAX_MSG_SIZE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendReq,
    FrontendReq,
    VhostUserHeaderFlag,
    VhostUserProtocolFeatures,
)
from .errors import (
    Disconnected,
    FeatureMismatch,
    InactiveFeature,
    InactiveOperation,
    IncorrectFds,
    InvalidMessage,
    OversizedMessage,
    PartialMessage,
    VhostUserError,
)

__all__ = [
    "MAX_ATTACHED_FDS",
    "MAX_MEM_SLOTS",
    "MAX_MSG_SIZE",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "BackendReq",
    "Disconnected",
    "FeatureMismatch",
    "FrontendReq",
    "InactiveFeature",
    "InactiveOperation",
    "IncorrectFds",
    "InvalidMessage",
    "OversizedMessage",
    "PartialMessage",
    "VhostUserError",
    "VhostUserHeaderFlag",
    "VhostUserProtocolFeatures",
]
