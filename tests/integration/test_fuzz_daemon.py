"""Hypothesis fuzzer of vhost-user message sequences against a running daemon.

Sequences are mostly well-framed (a valid header, the payload size the request
takes, the fds it takes) with mutations: random request codes, flags, sizes,
payload bytes, fd counts, truncation.  Every example is one connection; the daemon
must neither crash nor hang (every read has a timeout), and a well-formed session
must work after the whole run.  At least 10,000 messages are sent per run.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
from pathlib import Path

import pytest
from daemon_process import DaemonProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_echo_daemon import serve_one

from vhost_backends.frontend import Frontend
from vhost_backends.protocol import messages as m
from vhost_backends.protocol.codes import FrontendReq
from virtio_queue import BUILT_WITH_XEN
from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc

pytestmark = pytest.mark.slow

MESSAGES_PER_RUN = 10_000
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
# A message the daemon had already refused the connection for is not counted as
# sent; plan a margin so that every run sends at least MESSAGES_PER_RUN.
PER_EXAMPLE = MESSAGES_PER_RUN * 11 // 10 // EXAMPLES

# Payload sizes each request takes when well-formed.
_SIZES = {
    FrontendReq.SET_FEATURES: 8,
    FrontendReq.SET_PROTOCOL_FEATURES: 8,
    FrontendReq.SET_VRING_NUM: 8,
    FrontendReq.SET_VRING_BASE: 8,
    FrontendReq.GET_VRING_BASE: 8,
    FrontendReq.SET_VRING_ENABLE: 8,
    FrontendReq.SET_VRING_ADDR: 40,
    FrontendReq.SET_VRING_KICK: 8,
    FrontendReq.SET_VRING_CALL: 8,
    FrontendReq.SET_VRING_ERR: 8,
    FrontendReq.SET_STATUS: 8,
    FrontendReq.GET_INFLIGHT_FD: 24,
    FrontendReq.SET_INFLIGHT_FD: 24,
    FrontendReq.ADD_MEM_REG: 40,
    FrontendReq.REM_MEM_REG: 40,
    FrontendReq.GET_CONFIG: 20,
    FrontendReq.SET_CONFIG: 20,
    FrontendReq.SET_MEM_TABLE: 40,
}

_SPECIAL = [0xFF, 0x100, 0x101, 0xFFFF, 1 << 32, (1 << 64) - 1]
_ALL = list(FrontendReq)


def _small(rnd: random.Random) -> int:
    k = rnd.randrange(3)
    return rnd.randrange(4) if k == 0 else rnd.randrange(301) if k == 1 else rnd.choice(_SPECIAL)


def message(rnd: random.Random) -> tuple[bytes, int]:
    """One message as (bytes, number of fds to attach).

    Hypothesis draws the seed: 200 composite draws per example would exceed its
    buffer (and be slow), and a seeded generator keeps examples replayable.
    """
    req = rnd.choice(_ALL) if rnd.randrange(8) else rnd.randrange(61)
    known = req in FrontendReq.__members__.values()
    size = _SIZES.get(FrontendReq(req), 0) if known else 0
    if size and rnd.randrange(4):
        # Structured payload: small numbers in every u64 slot.
        payload = b"".join(struct.pack("<Q", _small(rnd) & ((1 << 64) - 1)) for _ in range(size // 8))
        if req == FrontendReq.SET_MEM_TABLE:
            fields = [(_small(rnd) << 12) & ((1 << 64) - 1) for _ in range(3)]
            if BUILT_WITH_XEN:  # a Xen build reads the Xen region layout (UNIX mapping)
                region = m.XEN_MEMORY_REGION.pack(*fields, 0, 0, 0)
            else:
                region = m.MEMORY_REGION.pack(*fields, 0)
            payload = m.MEMORY_TABLE_HEADER.pack(1, 0) + region
        elif req in (FrontendReq.GET_CONFIG, FrontendReq.SET_CONFIG):
            payload = m.pack_config(rnd.randrange(13), bytes(8))
    else:
        payload = rnd.randbytes(rnd.randrange(65))
    lo, _hi = m.expected_fds(req, payload) if known else (0, 0)
    nfds = min(rnd.choice([lo, lo, lo, 0, 1, 2]), 40)
    flags = rnd.choice([1, 1, 1, 9, 5, 0, 0x11])
    raw = struct.pack("<III", req, flags, len(payload)) + payload
    if rnd.randrange(31) == 0:
        raw = raw[: rnd.randrange(len(raw) + 1)]
    return raw, nfds


sent = 0
OWNER = m.pack_header(FrontendReq.SET_OWNER, 0)


def run_sequence(daemon: DaemonProcess, msgs: list[tuple[bytes, int]]) -> None:
    """Send every message of ``msgs``; when the daemon closes the connection (as it
    must on a bad message), wait until it has cleaned up, reconnect and go on."""
    global sent
    memfd = os.memfd_create("fuzz")
    os.ftruncate(memfd, 1 << 20)
    efd = os.eventfd(0)
    todo = list(msgs)
    try:
        while todo:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect(daemon.socket_path)
                # Most sessions get past the owner check, so deeper states are reached.
                if todo[0][0][:4] != OWNER[:4] and len(todo) % 4:
                    todo.insert(0, (OWNER, 0))
                while todo:
                    raw, nfds = todo.pop(0)
                    fds = [memfd if i % 2 else efd for i in range(nfds)]
                    anc = (
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
                        if fds
                        else []
                    )
                    try:
                        sock.sendmsg([raw], anc)
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    sent += 1
                    # Drain replies so the daemon never blocks writing to us; EOF
                    # means it refused something: reconnect.
                    try:
                        sock.setblocking(False)
                        if sock.recv(65536) == b"":
                            break
                        while sock.recv(65536):
                            pass
                    except BlockingIOError:
                        pass
                    except ConnectionResetError:
                        break
                    finally:
                        sock.settimeout(5)
            finally:
                sock.close()
            # The session must end (no hang) and the daemon must live on.
            daemon.wait_for("session ended", timeout=10)
            assert daemon.alive()
    finally:
        os.close(memfd)
        os.close(efd)


def _fuzz(daemon: DaemonProcess) -> None:
    global sent
    sent = 0

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 2**64 - 1))
    def fuzz(seed: int) -> None:
        rnd = random.Random(seed)
        run_sequence(daemon, [message(rnd) for _ in range(PER_EXAMPLE)])

    fuzz()
    assert sent >= MESSAGES_PER_RUN, sent


def _no_traceback(daemon: DaemonProcess) -> None:
    assert not any("Traceback" in line for line in daemon.log), [
        line for line in daemon.log if "Traceback" in line
    ]


def test_fuzz_message_sequences(echo_daemon: DaemonProcess) -> None:
    _fuzz(echo_daemon)
    serve_one(echo_daemon.socket_path, b"after the fuzzer")
    assert echo_daemon.terminate() == 0
    _no_traceback(echo_daemon)


def test_fuzz_message_sequences_rng(tmp_path: Path) -> None:
    """The same against vhost-device-rng, whose rings the transport serves in
    compiled code (vhost_backends._fastpath): rings start and stop, memory tables
    and call fds change under it; afterwards a session still reads random bytes."""
    base = str(tmp_path / "rng.sock")
    daemon = DaemonProcess(
        base + "0", [sys.executable, "-m", "vhost_backends.cli.rng", "-s", base, "-f", "/dev/urandom"]
    )
    try:
        daemon.wait_for("listening")
        _fuzz(daemon)
        with Frontend.connect(daemon.socket_path, timeout=10) as fe:
            fe.negotiate()
            fe.add_memory(1 << 20)
            fe.set_mem_table()
            ring = fe.setup_ring(0, 64)
            ring.mock.set_used_event(ring.mock.used_idx())
            gpa = ring.mock.alloc(256)
            head = ring.mock.add_chain([RawDesc(gpa, 256, VIRTQ_DESC_F_WRITE, 0)])
            fe.kick(0)
            assert fe.wait_used(0, timeout=10) == [(head, 256)]
            assert len(set(fe.memory.read(gpa, 256))) > 1
        assert daemon.terminate() == 0
        _no_traceback(daemon)
    finally:
        if daemon.alive():
            daemon.proc.kill()
            daemon.terminate()


def serve_parked(path: str) -> None:
    """A well-formed session on the parking device: chains completed by workers and
    chains parked then resumed from a worker thread all come back echoed."""
    with Frontend.connect(path, timeout=10) as fe:
        fe.negotiate()
        fe.add_memory(1 << 20)
        fe.set_mem_table()
        ring = fe.setup_ring(0, 128)
        want = {}
        for i in range(8):
            payload = f"chain {i} ".encode() * 3
            a, b = ring.mock.alloc(4), ring.mock.alloc(len(payload) - 4)
            dst = ring.mock.alloc(len(payload))
            fe.memory.write(a, payload[:4])
            fe.memory.write(b, payload[4:])
            # Three descriptors each: heads 0, 3, 6, ... alternate worker / park.
            head = ring.mock.add_chain(
                [
                    RawDesc(a, 4, 0, 0),
                    RawDesc(b, len(payload) - 4, 0, 0),
                    RawDesc(dst, len(payload), VIRTQ_DESC_F_WRITE, 0),
                ]
            )
            want[head] = (dst, payload)
        fe.kick(0)
        got: list[tuple[int, int]] = []
        while len(got) < len(want):
            got += fe.wait_used(0, timeout=10)
        assert sorted(got) == sorted((h, len(p)) for h, (_, p) in want.items())
        for dst, payload in want.values():
            assert fe.memory.read(dst, len(payload)) == payload


def test_fuzz_message_sequences_parking_device(tmp_path: Path) -> None:
    """The same against a device that parks chains and completes them from worker
    threads: rings stop, memory tables change and connections drop with work in
    flight; afterwards a session still gets every chain back."""
    sock = str(tmp_path / "parking.sock")
    daemon = DaemonProcess(sock, [sys.executable, str(Path(__file__).parent / "parking_device.py"), sock])
    try:
        daemon.wait_for("listening")
        serve_parked(daemon.socket_path)
        _fuzz(daemon)
        serve_parked(daemon.socket_path)
        assert daemon.terminate() == 0
        _no_traceback(daemon)
    finally:
        if daemon.alive():
            daemon.proc.kill()
            daemon.terminate()
