"""Host backends: what a device talks to on the host side, behind small Protocols.

A device takes its host backend in its constructor and never opens device nodes
itself (DESIGN.md, "virtio_devices").  Each backend has a simulated twin usable in
tests and, where upstream offers one, from the CLI.

* :mod:`virtio_devices.hosts.files`: entropy sources for virtio-rng.
* :mod:`virtio_devices.hosts.gpio`: the GPIO chip Protocol, the simulated chip and
  its ``--sim-control`` server; :mod:`virtio_devices.hosts.gpiod_chip`: host chips
  through python ``gpiod`` (libgpiod v2, the ``hosts`` extra).
* :mod:`virtio_devices.hosts.audio`: the audio backend Protocol of virtio-sound and
  its ``null`` backend; :mod:`~virtio_devices.hosts.alsa` (pyalsaaudio) and
  :mod:`~virtio_devices.hosts.pulse` (libpulse-simple) the real ones.

This package imports nothing on its own: a backend's optional dependency (gpiod,
pyalsaaudio, smbus2) is needed only by whoever imports that backend's module, never
to start another daemon.  Import the module you need
(``from virtio_devices.hosts.files import FileEntropySource``).
"""

from __future__ import annotations
