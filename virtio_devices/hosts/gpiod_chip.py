"""A host GPIO chip (``/dev/gpiochipN``) through the python ``gpiod`` 2.x binding.

libgpiod v2's model, as rust-vmm's vhost-device-gpio uses it (``src/gpio.rs``,
``PhysDevice``): the chip is opened once; each line the guest gives a direction is
requested on its own (one ``gpiod.LineRequest`` per line, with the consumer name
:data:`CONSUMER`), reconfigured in place with ``reconfigure_lines`` when its
direction or edge detection changes, and released when the guest sets its direction
to none.  Edge events queue in the request's kernel buffer; the request's fd is
readable while some wait, which the device watches on its event loop (upstream
polls each waiting line from a thread with a 1 s timeout).

Needs the ``hosts`` extra (``pip install 'vhost-device-py[hosts]'``): the ``gpiod``
package on PyPI builds libgpiod itself.  Only this module imports it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Self

import gpiod
from gpiod.line import Direction, Edge, Value

from .gpio import (
    DIRECTION_IN,
    DIRECTION_NONE,
    DIRECTION_OUT,
    EDGE_BOTH,
    EDGE_FALLING,
    EDGE_NONE,
    EDGE_RISING,
    GpioChipError,
)

__all__ = ["CONSUMER", "GpiodChip", "chip_path"]

#: The consumer name of our line requests (``gpioinfo`` shows it), upstream's.
CONSUMER = "vhu-gpio"

_EDGE = {EDGE_NONE: Edge.NONE, EDGE_RISING: Edge.RISING, EDGE_FALLING: Edge.FALLING, EDGE_BOTH: Edge.BOTH}


class GpiodChip:
    """The :class:`~virtio_devices.hosts.gpio.GpioChip` of a host GPIO character device.

    Args:
        path: ``/dev/gpiochipN``.

    Raises:
        GpioChipError: the path does not exist, cannot be opened, or is not a GPIO
            chip (upstream: "Could not open gpio device").
    """

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.exists(path):
            raise GpioChipError(f"cannot open {path}: no such device")
        try:
            if not gpiod.is_gpiochip_device(path):
                raise GpioChipError(f"{path} is not a GPIO chip device")
            self._chip = gpiod.Chip(path)
        except OSError as e:
            raise GpioChipError(f"cannot open {path}: {e.strerror or e}") from e
        try:
            self._num_lines = int(self._chip.get_info().num_lines)
        except OSError as e:
            self._chip.close()
            raise GpioChipError(f"{path}: cannot read chip info: {e.strerror or e}") from e
        self._requests: dict[int, Any] = {}
        self._closed = False

    @property
    def name(self) -> str:
        return self.path

    def num_lines(self) -> int:
        return self._num_lines

    def line_name(self, line: int) -> str:
        """The kernel's name of the line, ``""`` when it has none."""
        return str(self._chip.get_line_info(line).name or "")

    def line_direction(self, line: int) -> int:
        """The kernel's view of the line (its line info), requested or not."""
        direction = self._chip.get_line_info(line).direction
        if direction == Direction.OUTPUT:
            return DIRECTION_OUT
        if direction == Direction.INPUT:
            return DIRECTION_IN
        return DIRECTION_NONE

    def configure(self, line: int, direction: int, value: int = 0, edges: int = EDGE_NONE) -> None:
        """Request ``line`` with these settings, or reconfigure its request.

        Raises:
            GpioChipError: an unknown direction or edge set (a device bug).
            OSError: the kernel refused (line busy: EBUSY; chip gone: ENODEV).
        """
        if direction == DIRECTION_OUT:
            settings = gpiod.LineSettings(
                direction=Direction.OUTPUT, output_value=Value.ACTIVE if value else Value.INACTIVE
            )
        elif direction == DIRECTION_IN:
            edge = _EDGE.get(edges)
            if edge is None:
                raise GpioChipError(f"{self.path}: line {line}: bad edge set {edges}")
            settings = gpiod.LineSettings(direction=Direction.INPUT, edge_detection=edge)
        else:
            raise GpioChipError(f"{self.path}: line {line}: cannot request direction {direction}")
        request = self._requests.get(line)
        if request is None:
            self._requests[line] = self._chip.request_lines(config={line: settings}, consumer=CONSUMER)
        else:
            request.reconfigure_lines(config={line: settings})

    def release(self, line: int) -> None:
        request = self._requests.pop(line, None)
        if request is not None:
            request.release()

    def get_value(self, line: int) -> int:
        return 1 if self._request(line).get_value(line) == Value.ACTIVE else 0

    def set_value(self, line: int, value: int) -> None:
        self._request(line).set_value(line, Value.ACTIVE if value else Value.INACTIVE)

    def event_fd(self, line: int) -> int:
        return int(self._request(line).fd)

    def read_edges(self, line: int) -> list[int]:
        """Every edge event queued for ``line`` (reads only while some wait: a read
        of an empty request blocks)."""
        request = self._request(line)
        edges: list[int] = []
        while request.wait_edge_events(0):
            events = request.read_edge_events()
            if not events:
                break  # readable without events (a hang-up): nothing more to read now
            for event in events:
                rising = event.event_type == gpiod.EdgeEvent.Type.RISING_EDGE
                edges.append(EDGE_RISING if rising else EDGE_FALLING)
        return edges

    def close(self) -> None:
        for line in list(self._requests):
            with contextlib.suppress(OSError):  # the chip is gone: its requests are too
                self.release(line)
        if not self._closed:
            self._closed = True
            self._chip.close()

    def _request(self, line: int) -> Any:
        request = self._requests.get(line)
        if request is None:
            raise GpioChipError(f"{self.path}: line {line} is not requested")
        return request

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GpiodChip({self.path!r})"


def chip_path(number: int) -> str:
    """``/dev/gpiochip<number>``, the device upstream opens for a ``-l`` entry."""
    return os.path.join("/dev", f"gpiochip{number}")
