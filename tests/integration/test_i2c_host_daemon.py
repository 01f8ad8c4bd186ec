"""vhost-device-i2c as a process on a /dev/i2c-N: the compiled path on its ring worker.

This host has no I2C adapter; the daemon runs with ``benches/i2c_fake_adapter.c``
preloaded (built here with ``cc``), whose ``/dev/i2c-99`` answers the i2c-dev
ioctls at once as an SMBus-only adapter with one chip of 256 byte registers
(register 0x10 holds 0x5a).  Every request then goes the way a real adapter's do:
the compiled request path served by the ring's worker thread, which makes the
``I2C_SMBUS`` ioctls itself.  Checked through our ``Frontend`` over real sockets:
byte and word data through both sockets (one adapter, one worker per ring), a ring
stopped (GET_VRING_BASE) while a long kick is being served, reconnects, SIGTERM.
The real adapter's side (i2c-stub) is the e2e host-play test's.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import DaemonProcess
from device_drivers import console_script
from test_i2c_daemon import FN, OK, TIMEOUT, Guest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fake_adapter(tmp_path_factory: pytest.TempPathFactory) -> str:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build the preloaded fake /dev/i2c-99")
    lib = str(tmp_path_factory.mktemp("i2cfake") / "i2c_fake_adapter.so")
    subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", lib, str(ROOT / "benches" / "i2c_fake_adapter.c"), "-ldl"],
        check=True,
    )
    return lib


@pytest.fixture
def daemon(tmp_path: Path, fake_adapter: str) -> Iterator[tuple[DaemonProcess, str]]:
    sock = str(tmp_path / "i2c.sock")
    d = DaemonProcess(
        sock + "0",
        [*console_script("vhost-device-i2c", "vhost_backends.cli.i2c"), "-s", sock, "-c", "2", "-l", "99:80"],
        env={"LD_PRELOAD": fake_adapter},
    )
    try:
        d.wait_for("listening", TIMEOUT)
        d.wait_for("listening", TIMEOUT)
        yield d, sock
    finally:
        if d.alive():
            assert d.terminate() == 0, d.log[-5:]


def test_byte_and_word_data_through_both_sockets(daemon: tuple[DaemonProcess, str]) -> None:
    """An SMBus byte-data read as Linux sends it (register write with FAIL_NEXT,
    then a 1-byte read), word data written on one socket and read on the other."""
    _, sock = daemon
    g0, g1 = Guest(sock + "0"), Guest(sock + "1")
    try:
        a = g0.write(80, b"\x10", FN)
        h, buf, s = g0.read(80, 1)
        assert g0.kick(2) == [(a[0], 1), (h, 2)]
        assert g0.mem(buf, 1) == b"\x5a" and g0.mem(s, 1) == OK
        w, ws = g1.write(80, b"\x20\x34\x12")  # write word data 0x20 = 0x1234
        assert g1.kick(1) == [(w, 1)] and g1.mem(ws, 1) == OK
        a = g0.write(80, b"\x20", FN)
        h, buf, s = g0.read(80, 2)
        assert g0.kick(2) == [(a[0], 1), (h, 3)]
        assert g0.mem(buf, 2) == b"\x34\x12"
    finally:
        g0.close()
        g1.close()


def test_ring_stopped_during_a_kick_answers_what_it_popped(daemon: tuple[DaemonProcess, str]) -> None:
    """GET_VRING_BASE while the worker serves a kick of many groups: the reply comes
    after that service ended, so every chain before the base is answered (used)
    and none after it was touched; the next connection serves the rest."""
    d, sock = daemon
    g = Guest(sock + "0", queue_size=256)
    n = 120
    try:
        for i in range(n):
            g.write(80, bytes([0x80 + (i & 0x3F), i]))  # write byte data
        g.fe.kick(0)
        base = g.fe.get_vring_base(0)
        assert 0 <= base <= n
        assert g.ring.mock.used_idx() == base  # answered before the reply, not after
        used = g.ring.mock.used_elems()
        assert len(used) == base and all(length == 1 for _, length in used)
        g.fe.get_features()  # a round trip later, still nothing more
        assert g.ring.mock.used_idx() == base
    finally:
        g.close()
    g = Guest(sock + "0")
    try:
        a = g.write(80, b"\x10", FN)
        h, buf, _ = g.read(80, 1)
        assert [u[0] for u in g.kick(2)] == [a[0], h]
        assert g.mem(buf, 1) == b"\x5a"
    finally:
        g.close()
    assert d.alive()


def test_reconnects_then_sigterm(daemon: tuple[DaemonProcess, str]) -> None:
    d, sock = daemon
    for i in range(3):
        g = Guest(sock + str(i % 2))
        h, s = g.write(80, b"\x11\x22")
        assert g.kick(1) == [(h, 1)] and g.mem(s, 1) == OK
        g.close()
    assert d.terminate() == 0
