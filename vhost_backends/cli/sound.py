"""vhost-device-sound: a vhost-user backend for the virtio sound device.

Same flags as rust-vmm's ``vhost-device-sound``: ``--socket PATH`` (used verbatim)
or ``--socket-fd FD`` (a listening socket the daemon inherits, from systemd or
libvirt), exactly one, and ``--backend``, required.  The backends: ``null`` (no
host audio; playback consumed and silence recorded at the stream's real-time
rate), ``alsa`` (pyalsaaudio; the PCM device is ``default`` as upstream, or
``VHD_SOUND_ALSA_DEVICE``), ``pulseaudio`` (a PulseAudio server, through
libpulse's simple API) and ``pipewire`` (PipeWire through its PulseAudio server,
``pipewire-pulse``: the same client).  Upstream's ``gstreamer`` is not offered.
``VHD_SOUND_RT_PRIORITY`` (1-99, our addition; unset: none, as upstream) gives the
thread that serves a connection ``SCHED_FIFO`` at that priority, so that a loaded
host does not hold the streams' periods back.

Example::

    vhost-device-sound --socket /tmp/snd.sock --backend pulseaudio
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from virtio_devices.hosts.audio import AudioBackend, AudioError, NullAudio
from virtio_devices.sound import SoundDevice

from ._common import ConfigError, add_socket_or_fd_args, make_parser, run_main, serve, verbatim_socket_path

__all__ = ["BACKENDS", "Config", "build_parser", "main", "open_backend", "run"]

PROG = "vhost-device-sound"
#: ``--backend`` values.
BACKENDS = ("null", "alsa", "pulseaudio", "pipewire")
#: Environment variable naming the ALSA PCM device (our addition; upstream: ``default``).
ALSA_DEVICE_ENV = "VHD_SOUND_ALSA_DEVICE"
#: Environment variable: a SCHED_FIFO priority for the serving thread (our addition).
RT_PRIORITY_ENV = "VHD_SOUND_RT_PRIORITY"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``vhost-device-sound``, as upstream's ``SoundArgs``."""
    p = make_parser(PROG, __doc__)
    add_socket_or_fd_args(p)
    p.add_argument("--backend", required=True, choices=BACKENDS, help="audio backend to be used")
    return p


@dataclass(frozen=True)
class Config:
    """A validated ``vhost-device-sound`` configuration (upstream's ``SoundConfig``)."""

    socket: str | None
    socket_fd: int | None
    backend: str
    alsa_device: str = "default"
    rt_priority: int = 0

    @classmethod
    def from_args(cls, ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
        """Validate the parsed flags (and ``VHD_SOUND_ALSA_DEVICE``,
        ``VHD_SOUND_RT_PRIORITY``).

        Raises:
            ConfigError: the socket path names no file; ``--socket-fd`` is not an
                open file descriptor; ``VHD_SOUND_ALSA_DEVICE`` is set but empty;
                ``VHD_SOUND_RT_PRIORITY`` is not a number from 1 to 99.
        """
        socket = verbatim_socket_path(ns.socket) if ns.socket is not None else None
        if ns.socket_fd is not None:
            try:
                os.fstat(ns.socket_fd)
            except OSError as e:
                raise ConfigError(
                    f"--socket-fd {ns.socket_fd} is not an open file descriptor: {e.strerror}"
                ) from e
        environ = os.environ if env is None else env
        device = environ.get(ALSA_DEVICE_ENV)
        if device is not None and not device.strip():
            raise ConfigError(f"{ALSA_DEVICE_ENV} must name an ALSA PCM device, not {device!r}")
        rt = environ.get(RT_PRIORITY_ENV, "").strip()
        if rt and not (rt.isdigit() and 1 <= int(rt) <= 99):
            raise ConfigError(f"{RT_PRIORITY_ENV} must be a SCHED_FIFO priority from 1 to 99, not {rt!r}")
        return cls(socket, ns.socket_fd, ns.backend, device.strip() if device else "default", int(rt or 0))

    @property
    def label(self) -> str:
        """What logs call the socket: its path, or ``fd N``."""
        return self.socket if self.socket is not None else f"fd {self.socket_fd}"


def open_backend(config: Config) -> AudioBackend:
    """The audio backend ``config`` selects, opened once for every connection.

    Raises:
        ConfigError: its library is missing or the host refuses it.
    """
    try:
        if config.backend == "null":
            return NullAudio()
        if config.backend == "alsa":
            from virtio_devices.hosts.alsa import AlsaAudio  # noqa: PLC0415 - optional library

            return AlsaAudio(config.alsa_device)
        from virtio_devices.hosts.pulse import PulseAudio  # noqa: PLC0415 - optional library

        return PulseAudio(client_name=PROG)
    except (AudioError, OSError) as e:
        raise ConfigError(f"--backend {config.backend}: {e}") from e


def run(config: Config) -> int:
    """Serve the socket until SIGINT/SIGTERM, a fresh device per connection."""
    backend = open_backend(config)
    try:
        return serve(
            PROG,
            [config.label],
            lambda index: SoundDevice(backend, rt_priority=config.rt_priority),
            listen_fd=config.socket_fd,
        )
    finally:
        backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhost-device-sound`` console script."""
    return run_main(build_parser(), Config.from_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
