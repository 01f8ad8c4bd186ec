"""An evdev node (``/dev/input/eventN``) as the host of virtio-input, through python-evdev.

Upstream's ``vhost-device-input`` reads the node with the ``evdev`` crate and raw
``EVIOCG*`` ioctls; python-evdev gives the same: ``EVIOCGNAME``/``EVIOCGUNIQ``/
``EVIOCGID`` at open, ``EVIOCGBIT`` for every event type and ``EVIOCGABS`` for
every axis (its capabilities), ``EVIOCGPROP``, nonblocking reads of
``struct input_event``, writes of status events, and ``EVIOCGRAB``.  Capabilities
are read once, at open: an input device does not change them while it exists.

This module imports ``evdev`` (the ``hosts`` extra); only ``vhost-device-input``
imports it, and only for ``--event-list`` entries that are paths.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

import evdev

from .input import EV_ABS, EV_SYN, AbsInfo, InputHostError, bitmap

__all__ = ["EvdevInputHost"]


class EvdevInputHost:
    """A host evdev node, opened read-write (read-only if that is refused).

    Raises:
        InputHostError: the node is missing or unreadable, or not an evdev node
            (its ``EVIOCGID``/``EVIOCGBIT`` ioctls fail).
    """

    #: ``fileno()`` yields ``struct input_event`` records: the device may read them
    #: itself (its compiled event path) instead of calling :meth:`read_events`.
    raw_input_events = True

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            st = os.stat(path)
        except OSError as e:
            raise InputHostError(f"{path}: cannot open: {e.strerror}") from None
        if not stat.S_ISCHR(st.st_mode):
            raise InputHostError(f"{path}: not an evdev node (not a character device)")
        try:
            self._dev = evdev.InputDevice(path)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                raise InputHostError(f"{path}: not an evdev node ({e.strerror})") from None
            raise InputHostError(f"{path}: cannot open: {e.strerror}") from None
        # With absinfo, EV_ABS's codes are (axis, AbsInfo) pairs (python-evdev's stubs say int).
        caps: dict[int, list[Any]] = self._dev.capabilities(absinfo=True)
        self._bits: dict[int, bytes] = {}
        self._axes: dict[int, AbsInfo] = {}
        for ev_type, codes in caps.items():
            plain: list[int] = []
            for code in codes:
                if isinstance(code, tuple):
                    axis, info = code
                    plain.append(axis)
                    self._axes[axis] = AbsInfo(info.min, info.max, info.fuzz, info.flat, info.resolution)
                else:
                    plain.append(code)
            self._bits[ev_type] = bitmap(plain)
        if EV_ABS not in caps:
            self._axes.clear()
        # EVIOCGBIT(0) lists the types themselves; python-evdev keeps it as EV_SYN's codes.
        self._bits[EV_SYN] = bitmap(caps)
        self._props = bitmap(self._dev.input_props())

    @property
    def name(self) -> str:
        return self.path

    def fileno(self) -> int:
        return int(self._dev.fd)

    def read_events(self) -> list[tuple[int, int, int]]:
        try:
            return [(e.type, e.code, e.value) for e in self._dev.read()]
        except BlockingIOError:
            return []
        except OSError as e:
            raise InputHostError(f"{self.path}: reading events failed: {e.strerror}") from None

    def write_event(self, ev_type: int, code: int, value: int) -> None:
        try:
            self._dev.write(ev_type, code, value)
        except (OSError, evdev.EvdevError) as e:
            raise InputHostError(f"{self.path}: writing event {ev_type:#x}/{code:#x} failed: {e}") from None

    def device_name(self) -> bytes:
        return str(self._dev.name).encode()

    def serial(self) -> bytes:
        return str(self._dev.uniq or "").encode()

    def ids(self) -> tuple[int, int, int, int]:
        info = self._dev.info
        return (info.bustype, info.vendor, info.product, info.version)

    def properties(self) -> bytes:
        return self._props

    def event_bits(self, ev_type: int) -> bytes:
        return self._bits.get(ev_type, b"")

    def abs_info(self, axis: int) -> AbsInfo | None:
        return self._axes.get(axis)

    def grab(self, on: bool) -> None:
        try:
            if on:
                self._dev.grab()
            else:
                self._dev.ungrab()
        except OSError as e:
            raise InputHostError(f"{self.path}: EVIOCGRAB {int(on)} failed: {e.strerror}") from None

    def close(self) -> None:
        self._dev.close()
