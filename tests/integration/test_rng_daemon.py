"""vhost-device-rng as a process, driven over real sockets by our Python front-end.

The daemon is started through its console script when one is installed, else with
``python -m vhost_backends.cli.rng``.  The entropy source is a file of known bytes,
so what lands in guest memory can be compared exactly; the daemon shares one file
position between its sockets, as upstream does, so sockets and reconnects consume
consecutive bytes of it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

try:
    from vhost_backends.frontend import Frontend, FrontendRing
except ImportError as e:  # pragma: no cover - only while the vhost layer is missing
    pytest.skip(f"vhost_backends.frontend not available yet: {e}", allow_module_level=True)

from daemon_process import DaemonProcess

from virtio_queue.testing import VIRTQ_DESC_F_WRITE, RawDesc, vring_need_event

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# 64 KiB of a recognisable pattern: byte i is a function of i and i // 251.
SOURCE = bytes((i * 31 + i // 251) & 0xFF for i in range(1 << 16))
DEADLINE = 10.0


def daemon_command() -> list[str]:
    script = shutil.which("vhost-device-rng")
    if script is not None:
        return [script]
    return [sys.executable, "-m", "vhost_backends.cli.rng"]


class Daemon:
    """A running vhost-device-rng with its stderr captured in a file."""

    def __init__(self, tmp: Path, args: Sequence[str]) -> None:
        self.tmp = tmp
        self.sock = str(tmp / "rng.sock")
        self.log = tmp / "daemon.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        env.setdefault("RUST_LOG", "info")
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [*daemon_command(), "-s", self.sock, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                cwd=tmp,
            )

    def path(self, index: int) -> str:
        return f"{self.sock}{index}"

    def wait_listening(self, count: int) -> None:
        """Poll until every socket accepts connections (or the daemon died).

        The daemon's "listening" line (RUST_LOG info or more) marks it: the socket
        file appears at bind(), before listen(), and a connect in between is refused.
        """
        deadline = time.monotonic() + DEADLINE
        pending = {self.path(i) for i in range(count)}
        while pending:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not listening on {sorted(pending)}: {self.stderr()}")
            log = self.stderr()
            pending = {p for p in pending if f"{p}: listening" not in log}
            if pending:
                time.sleep(0.01)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def source_file(tmp_path: Path) -> Path:
    p = tmp_path / "entropy.bin"
    p.write_bytes(SOURCE)
    return p


def start(tmp_path: Path, source_file: Path, *args: str, count: int = 1) -> Daemon:
    d = Daemon(tmp_path, ["-f", str(source_file), "-c", str(count), *args])
    d.wait_listening(count)
    return d


@pytest.fixture
def daemon2(tmp_path: Path, source_file: Path) -> Iterator[Daemon]:
    """A two-socket daemon without a rate limit."""
    d = start(tmp_path, source_file, count=2)
    yield d
    assert d.stop() == 0, d.stderr()


def open_device(path: str) -> tuple[Frontend, FrontendRing]:
    fe = Frontend.connect(path, timeout=DEADLINE)
    try:
        fe.negotiate()
        fe.add_memory(1 << 20)
        fe.set_mem_table()
        ring = fe.setup_ring(0, 64)
    except BaseException:
        fe.close()
        raise
    return fe, ring


def submit(ring: FrontendRing, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Add one writable buffer per size; return ``(head, gpa)`` of each.

    Like Linux's ``virtqueue_enable_cb``, the driver first sets ``used_event`` to the
    used index it has seen, so that with EVENT_IDX the next used buffer interrupts.
    """
    ring.mock.set_used_event(ring.mock.used_idx())
    out = []
    for n in sizes:
        gpa = ring.mock.alloc(n)
        head = ring.mock.add_chain([RawDesc(gpa, n, VIRTQ_DESC_F_WRITE, 0)])
        out.append((head, gpa))
    return out


def read_random(fe: Frontend, ring: FrontendRing, sizes: Sequence[int]) -> list[bytes]:
    reqs = submit(ring, sizes)
    fe.kick(0)
    used = dict(fe.wait_used(0, count=len(sizes), timeout=DEADLINE))
    return [fe.memory.read(gpa, used[head]) for head, gpa in reqs]


def test_rng_daemon_serves_source_bytes(daemon2: Daemon) -> None:
    fe, ring = open_device(daemon2.path(0))
    with fe:
        assert fe.get_queue_num() >= 1
        chunks = read_random(fe, ring, [64, 1000, 7])
    assert b"".join(chunks) == SOURCE[:1071]


def test_rng_daemon_two_sockets_share_the_source(daemon2: Daemon) -> None:
    fe0, ring0 = open_device(daemon2.path(0))
    fe1, ring1 = open_device(daemon2.path(1))
    with fe0, fe1:
        a = read_random(fe0, ring0, [100])[0]
        b = read_random(fe1, ring1, [100])[0]
        c = read_random(fe0, ring0, [100])[0]
    # One shared file position, as upstream's Arc<Mutex<File>>.
    assert a + b + c == SOURCE[:300]


def test_rng_daemon_serves_again_after_disconnect(daemon2: Daemon) -> None:
    fe, ring = open_device(daemon2.path(0))
    with fe:
        first = read_random(fe, ring, [32])[0]
    fe, ring = open_device(daemon2.path(0))
    with fe:
        second = read_random(fe, ring, [32])[0]
    assert first + second == SOURCE[:64]
    assert daemon2.proc.poll() is None


def test_rng_daemon_rate_limit_bounds_a_window(tmp_path: Path, source_file: Path) -> None:
    d = start(tmp_path, source_file, "-p", "1000", "-m", "4096")
    try:
        fe, ring = open_device(d.path(0))
        with fe:
            t0 = time.monotonic()
            reqs = submit(ring, [3000, 3000, 3000])
            fe.kick(0)
            used = fe.wait_used(0, count=2, timeout=DEADLINE)
            in_first_window = time.monotonic() - t0 < 0.9
            # 4096 bytes per 1000 ms: the first request is whole, the second is cut
            # to the rest of the quota.
            assert [ln for _, ln in used] == [3000, 1096]
            if in_first_window:
                # The third waits for the next window (the daemon is not blocked).
                assert ring.mock.used_idx() == 2
                assert fe.get_queue_num() >= 1  # vhost-user requests still answered
            ring.mock.set_used_event(ring.mock.used_idx())  # the driver re-arms its interrupt
            later = fe.wait_used(0, count=1, timeout=DEADLINE)
            assert later == [(reqs[2][0], 3000)]
            assert time.monotonic() - t0 >= 0.5
            assert fe.memory.read(reqs[2][1], 3000) == SOURCE[4096:7096]
    finally:
        assert d.stop() == 0, d.stderr()


def test_rng_daemon_sigterm_exits_0_and_removes_socket(tmp_path: Path, source_file: Path) -> None:
    d = start(tmp_path, source_file)
    fe, _ring = open_device(d.path(0))
    with fe:
        assert d.stop() == 0, d.stderr()
    assert not os.path.exists(d.path(0))


def test_rng_second_daemon_on_a_live_path_refuses_and_first_keeps_serving(
    tmp_path: Path, source_file: Path
) -> None:
    first = start(tmp_path, source_file)
    try:
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        env["PYTHONPATH"] = str(REPO)
        second = subprocess.run(
            [*daemon_command(), "-s", first.sock, "-f", str(source_file)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            env=env,
            check=False,
        )
        assert second.returncode == 1
        refusal = f"error: cannot listen on {first.path(0)}: another process is listening on it\n"
        assert second.stderr == refusal
        # The path still leads to the first daemon, which serves a guest as before.
        fe, ring = open_device(first.path(0))
        with fe:
            assert read_random(fe, ring, [16])[0] == SOURCE[:16]
    finally:
        assert first.stop() == 0, first.stderr()


def test_rng_daemon_replaces_a_stale_socket_file(tmp_path: Path, source_file: Path) -> None:
    # A socket file whose listener is gone, as a killed daemon leaves it.
    path = str(tmp_path / "rng.sock0")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    d = DaemonProcess(path, [*daemon_command(), "-s", str(tmp_path / "rng.sock"), "-f", str(source_file)])
    try:
        d.wait_for(f"{path}: listening")
        fe, ring = open_device(path)
        with fe:
            assert read_random(fe, ring, [16])[0] == SOURCE[:16]
    finally:
        assert d.terminate() == 0, d.log


def test_rng_daemon_unreadable_source_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    r = subprocess.run(
        [*daemon_command(), "-s", str(tmp_path / "s.sock"), "-f", str(missing)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=False,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: RNG source file {missing}")


def test_rng_daemon_usage_error_exits_2(tmp_path: Path) -> None:
    r = subprocess.run(
        [*daemon_command(), "-c", "2"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=False,
    )
    assert r.returncode == 2
    assert "--socket-path" in r.stderr


def test_rng_daemon_compiled_path_leaves_bad_requests_to_the_device(
    tmp_path: Path, source_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Well-formed requests (one device-writable buffer) are filled in compiled code;
    at a chain of two buffers the kick goes to the device, which completes that one
    empty as upstream does and drains the rest itself; later kicks are compiled
    again."""
    monkeypatch.setenv("RUST_LOG", "debug")
    d = start(tmp_path, source_file)
    try:
        fe, ring = open_device(d.path(0))
        with fe:
            mock = ring.mock
            mock.set_used_event(mock.used_idx())
            g1, g2, b1, b2 = (mock.alloc(16) for _ in range(4))
            first = mock.add_chain([RawDesc(g1, 16, VIRTQ_DESC_F_WRITE, 0)])
            bad = mock.add_chain(
                [RawDesc(b1, 16, VIRTQ_DESC_F_WRITE, 0), RawDesc(b2, 16, VIRTQ_DESC_F_WRITE, 0)]
            )
            last = mock.add_chain([RawDesc(g2, 16, VIRTQ_DESC_F_WRITE, 0)])
            fe.kick(0)
            used = dict(fe.wait_used(0, count=3, timeout=DEADLINE))
            assert used == {first: 16, bad: 0, last: 16}
            assert fe.memory.read(g1, 16) + fe.memory.read(g2, 16) == SOURCE[:32]
            # More kicks, all on the compiled path.
            assert b"".join(read_random(fe, ring, [100, 200])) == SOURCE[32:332]
    finally:
        assert d.stop() == 0, d.stderr()
    log = d.stderr()
    # first, 100, 200 filled in compiled code; the bad request is process_queue's
    # (a kick can find the daemon polling: how many it read varies)
    filled = r"q0: \d+ kicks, 3 chains / 316 bytes filled in compiled code, 1 calls of process_queue"
    assert re.search(filled, log), log
    assert "rng q0: served 2 chains, 16 bytes" in log, log  # bad, last
    assert "expected 1" in log  # the device's own report of the bad chain


def test_rng_daemon_compiled_path_follows_the_ring_lifecycle(tmp_path: Path, source_file: Path) -> None:
    """The compiled kick path through what a VMM does to a running ring: a new call
    eventfd (the old one is no longer signalled), memory added and removed while it
    runs, GET_VRING_BASE (stopped: a kick serves nothing, the request stays
    available) and a restart from the returned base (the request is served)."""
    d = start(tmp_path, source_file)
    try:
        fe, ring = open_device(d.path(0))
        with fe:
            assert read_random(fe, ring, [16]) == [SOURCE[:16]]
            old_call = ring.call_fd
            with contextlib.suppress(BlockingIOError):
                # wait_used returns as soon as the used entry is visible: a call
                # signalled before the replacement may still be unread.
                os.eventfd_read(old_call)
            new_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fe.set_vring_call(0, new_call)
            ring.call_fd = new_call
            assert read_random(fe, ring, [16]) == [SOURCE[16:32]]
            with pytest.raises(BlockingIOError):
                os.eventfd_read(old_call)  # nothing signalled on the replaced fd

            extra = fe.add_memory(1 << 16, guest_addr=1 << 24)
            fe.add_mem_reg(extra)
            assert read_random(fe, ring, [16]) == [SOURCE[32:48]]
            fe.rem_mem_reg(extra)
            assert read_random(fe, ring, [16]) == [SOURCE[48:64]]

            base = fe.get_vring_base(0)
            assert base == 4
            ((head, gpa),) = submit(ring, [16])
            fe.kick(0)
            time.sleep(0.3)
            assert ring.mock.used_idx() == 4  # stopped: not served

            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            ring.kick_fd, ring.call_fd = kick, call
            mock = ring.mock
            fe.set_vring_num(0, mock.size)
            fe.set_vring_base(0, base)
            fe.set_vring_addr(
                0, fe.user_addr(mock.desc_table), fe.user_addr(mock.avail_ring), fe.user_addr(mock.used_ring)
            )
            fe.set_vring_call(0, call)
            fe.set_vring_kick(0, kick)
            fe.set_vring_enable(0, True)
            fe.kick(0)
            assert fe.wait_used(0, timeout=DEADLINE) == [(head, 16)]
            assert fe.memory.read(gpa, 16) == SOURCE[64:80]
    finally:
        assert d.stop() == 0, d.stderr()
    assert "Traceback" not in d.stderr()


@pytest.mark.parametrize("poll_us", ["1000000", "0"])
def test_rng_daemon_polls_after_a_service_as_vhd_poll_us_says(
    tmp_path: Path, source_file: Path, monkeypatch: pytest.MonkeyPatch, poll_us: str
) -> None:
    """Requests that keep coming soon after each other teach the daemon to poll the
    ring after each service (VHD_POLL_US bounds the window): a request then made
    without a kick is served; with VHD_POLL_US=0 it waits for the kick."""
    monkeypatch.setenv("RUST_LOG", "debug")
    monkeypatch.setenv("VHD_POLL_US", poll_us)
    d = start(tmp_path, source_file)
    try:
        fe, ring = open_device(d.path(0))
        with fe:
            for _ in range(15):  # 50 ms apart: the window doubles from 4 µs to ~65 ms
                read_random(fe, ring, [8])
                time.sleep(0.05)
            assert b"".join(read_random(fe, ring, [8])) == SOURCE[120:128]
            old = ring.mock.avail_idx()
            ((head, gpa),) = submit(ring, [16])
            # A driver kicks only when the device asks (EVENT_IDX, VIRTIO 1.2
            # §2.7.10): not while it polls.  Polling gives way to any other task
            # that wants the daemon's CPU, and then the device asks again.
            asked = vring_need_event(ring.mock.avail_event(), old + 1, old)
            if poll_us == "0":
                assert asked
                with pytest.raises(TimeoutError):  # no kick yet: not served
                    fe.wait_used(0, count=1, timeout=0.3)
            if asked:
                fe.kick(0)
            used = dict(fe.wait_used(0, count=1, timeout=DEADLINE))
            assert used == {head: 16}
            assert fe.memory.read(gpa, 16) == SOURCE[128:144]
    finally:
        assert d.stop() == 0, d.stderr()
    log = d.stderr()
    m = re.search(
        r"q0: \d+ kicks, 17 chains / 144 bytes filled in compiled code, 0 calls of process_queue,"
        r" (\d+) services found by polling",
        log,
    )
    assert m is not None, log
    gave_way = re.search(r"ring polling gave the CPU away (\d+) times", log)
    if poll_us == "0":
        assert int(m[1]) == 0 and gave_way is None, log
    else:
        # Polled: a request was found by the spin, or the spin gave way (a loaded
        # machine); both only happen with polling on.
        assert int(m[1]) >= 1 or gave_way is not None, log


@pytest.mark.parametrize("vdso", ["1", "0"])
def test_rng_daemon_serves_urandom_through_the_vdso_or_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vdso: str
) -> None:
    """The default source, /dev/urandom: random bytes in both compiled paths (one
    request per kick, a batch), made by the vDSO's getrandom where the kernel has it
    (said at info level), read from the file with VHD_RNG_VDSO=0."""
    from virtio_devices.hosts._getrandom import vdso_available  # noqa: PLC0415

    monkeypatch.setenv("VHD_RNG_VDSO", vdso)
    d = Daemon(tmp_path, [])
    d.wait_listening(1)
    try:
        fe, ring = open_device(d.path(0))
        with fe:
            single = [b"".join(read_random(fe, ring, [4096])) for _ in range(4)]
            batch = read_random(fe, ring, [4096] * 16)
    finally:
        assert d.stop() == 0, d.stderr()
    chunks = single + batch
    assert all(len(c) == 4096 for c in chunks)
    blocks = [c[i : i + 32] for c in chunks for i in range(0, 4096, 32)]
    assert len(set(blocks)) == len(blocks)  # nothing repeated, nothing constant
    said = "its bytes come from the vDSO's getrandom" in d.stderr()
    assert said == (vdso == "1" and vdso_available()), d.stderr()


def test_rng_daemon_two_sockets_on_urandom_never_share_bytes(tmp_path: Path) -> None:
    """-c 2 on the default source: the two sockets' loops fill at the same time
    (each thread with its own vDSO state where the kernel has one), and no 32-byte
    block appears twice across both guests."""
    d = Daemon(tmp_path, ["-c", "2"])
    d.wait_listening(2)
    try:
        devices = [open_device(d.path(i)) for i in range(2)]
        try:
            chunks: list[bytes] = []
            for _ in range(4):
                reqs = [submit(ring, [4096] * 16) for _, ring in devices]
                for fe, _ in devices:
                    fe.kick(0)  # both in flight before either is waited for
                for (fe, _), sub in zip(devices, reqs, strict=True):
                    used = dict(fe.wait_used(0, count=len(sub), timeout=DEADLINE))
                    chunks += [fe.memory.read(gpa, used[head]) for head, gpa in sub]
        finally:
            for fe, _ in devices:
                fe.close()
    finally:
        assert d.stop() == 0, d.stderr()
    assert len(chunks) == 128 and all(len(c) == 4096 for c in chunks)
    blocks = [c[i : i + 32] for c in chunks for i in range(0, 4096, 32)]
    assert len(set(blocks)) == len(blocks)


# Guest RAM as three memfd regions that follow each other in guest-physical memory
# (QEMU does this with several memory backends, DIMMs or NUMA nodes): each is its own
# mapping in the daemon, so nothing crossing a boundary is contiguous on its side.
REGIONS = [(0, 0x8000), (0x8000, 0x18000), (0x20000, 0xE0000)]


@pytest.mark.parametrize(
    "ring_gpa",
    [
        0x7E00,  # the descriptor table crosses 0x8000 (descriptor 32 is the first after it)
        0x7BC0,  # the available ring crosses 0x8000 between ring[29] and ring[30]
        0x7B00,  # the used ring crosses 0x8000 between id and len of ring[14]
    ],
)
def test_rng_daemon_serves_rings_and_buffers_across_regions(daemon2: Daemon, ring_gpa: int) -> None:
    """VIRTIO 1.2 §2.7: the driver places rings and buffers by guest-physical address,
    unaware of the VMM's regions; the daemon serves a ring part and buffers that run
    from one region into the next exactly as from one region."""
    fe = Frontend.connect(daemon2.path(0), timeout=DEADLINE)
    with fe:
        fe.negotiate()
        for gpa, size in REGIONS:
            fe.add_memory(size, gpa)
        fe.set_mem_table()
        ring = fe.setup_ring(0, 64, gpa=ring_gpa)
        # virtio-rng takes one device-writable buffer per chain (VIRTIO 1.2 §5.4.6.1):
        # one that ends at 0x20000, one across it (16 KiB: one read into two
        # segments) and one after it.
        ring.mock.set_used_event(ring.mock.used_idx())
        layouts = [[(0x1FE00, 0x180)], [(0x1FF80, 0x4000)], [(0x24000, 0x40)]]
        heads = [
            ring.mock.add_chain([RawDesc(g, n, VIRTQ_DESC_F_WRITE, 0) for g, n in bufs]) for bufs in layouts
        ]
        fe.kick(0)
        used = dict(fe.wait_used(0, count=len(heads), timeout=DEADLINE))
        got = [b"".join(fe.memory.read(g, n) for g, n in bufs) for bufs in layouts]
    sizes = [sum(n for _, n in bufs) for bufs in layouts]
    assert [used[h] for h in heads] == sizes
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    assert got == [SOURCE[o : o + n] for o, n in zip(offsets, sizes, strict=True)]
    assert daemon2.proc.poll() is None
