"""virtio-scsi (VIRTIO 1.2 §5.6): a SCSI disk target over raw image files.

* :mod:`virtio_devices.scsi.device`: the virtio device (framing, queues, workers);
* :mod:`virtio_devices.scsi.emulation`: the SCSI commands (SPC-5, SBC-4), no I/O.
"""

from __future__ import annotations

from .device import QUEUE_SIZE, REQUEST_QUEUES, VIRTIO_ID_SCSI, ScsiDevice, parse_lun
from .emulation import BLOCK_SIZE, BlockIO, CheckCondition, LogicalUnit, Sense, Target

__all__ = [
    "BLOCK_SIZE",
    "QUEUE_SIZE",
    "REQUEST_QUEUES",
    "VIRTIO_ID_SCSI",
    "BlockIO",
    "CheckCondition",
    "LogicalUnit",
    "ScsiDevice",
    "Sense",
    "Target",
    "parse_lun",
]
