"""Fixtures for the end-to-end tests: a cached guest, daemons, short socket dirs.

Every test here boots a Linux guest under QEMU (see ``harness.py`` and
``README.md`` here) and carries the ``qemu`` marker.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

# harness.py is also a script, so it is imported as a top-level module
# rather than relative to this package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness


@pytest.fixture(scope="session")
def guest() -> harness.Guest:
    """The cached kernel and initramfs, built on first use.

    Skips only when QEMU itself is missing (``scripts/install-system-deps``
    installs it); a failing build is an error, not a skip.
    """
    if not harness.qemu_binary():
        pytest.skip("qemu-system-x86_64 is not installed (run scripts/install-system-deps)")
    built = harness.prepare()
    harness.accel_args()  # probe KVM once, before the first timed test
    return built


def require_qemu(min_version: tuple[int, ...]) -> str:
    """The oldest QEMU the harness has that is at least ``min_version``; skips without one.

    ``require_qemu((11,))`` for VIRTIO_GPIO_F_IRQ in the guest, ``(10,)`` for
    vhost-user-snd-pci. ``harness.py prepare`` (run by ./run-tests) installs
    QEMU 10 and 11 beside the system's 7.2.
    """
    path = harness.qemu_binary(min_version=min_version)
    if path is None:
        have = ", ".join(".".join(map(str, v)) for v, _ in harness.qemu_binaries()) or "none"
        pytest.skip(
            f"needs QEMU >= {'.'.join(map(str, min_version))} (have: {have}; "
            "`python tests/e2e/harness.py prepare` installs 10 and 11 beside the system one)"
        )
    return path


@pytest.fixture(scope="session")
def qemu_at_least(guest: harness.Guest) -> Callable[[tuple[int, ...]], str]:
    """``qemu_at_least((11,))``: a QEMU binary of at least that version, or skip."""
    return require_qemu


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory for sockets (sun_path holds 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vdev-e2e-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Daemons:
    """Start back-end daemons and stop them all at teardown."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._started: list[harness.Daemon] = []

    def __call__(
        self, name: str, *args: str, socket: str | os.PathLike[str], timeout: float = 15.0
    ) -> harness.Daemon:
        """Start the ``vhost-device-<name>`` console script with ``args``.

        Waits until ``socket`` (the path the daemon listens on, e.g. the
        ``-s`` path plus ``0``) exists. Skips if the script is not installed.
        """
        exe = shutil.which(f"vhost-device-{name}")
        if exe is None:
            pytest.skip(f"vhost-device-{name} is not installed")
        return self.start([exe, *args], socket=socket, timeout=timeout)

    def start(
        self, argv: Sequence[str], *, socket: str | os.PathLike[str], timeout: float = 15.0
    ) -> harness.Daemon:
        """Start any back-end command and wait for its socket."""
        n = len(self._started)
        d = harness.Daemon(argv, socket, self._workdir / f"daemon{n}.log")
        self._started.append(d)
        try:
            d.wait_for_socket(timeout)
        except harness.HarnessError as e:
            pytest.fail(str(e))
        return d

    def close(self) -> None:
        for d in reversed(self._started):
            d.stop()


@pytest.fixture
def daemon(sockdir: Path) -> Iterator[Daemons]:
    """``daemon("rng", "-s", path, socket=path + "0")`` starts a back-end."""
    ds = Daemons(sockdir)
    try:
        yield ds
    finally:
        ds.close()
