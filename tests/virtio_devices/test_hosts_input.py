"""The simulated input hosts and their control socket (virtio_devices.hosts.input).

The control protocol's parser gets hypothesis over arbitrary lines; the server is
driven over a real Unix socket.  The python-evdev backend needs an evdev node,
which this machine may lack: its tests skip with the reason.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_devices.hosts.input import (
    EV_KEY,
    EV_LED,
    EV_SYN,
    INPUT_EVENT,
    KEY_A,
    NAMES,
    SYN_REPORT,
    ControlCommand,
    ControlError,
    ControlServer,
    InputHostError,
    PipeInputHost,
    SimInputHost,
    bitmap,
    parse_control_line,
)


@pytest.fixture
def kbd() -> Iterator[SimInputHost]:
    host = SimInputHost("keyboard")
    yield host
    host.close()


@pytest.fixture
def server(kbd: SimInputHost, tmp_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(kbd, str(tmp_path / "ctl"))
    yield srv
    srv.close()


class Client:
    """A control-socket client (a plain socket: every line is read whole)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def ask(self, line: str | bytes) -> str:
        self.sock.sendall((line.encode() if isinstance(line, str) else line) + b"\n")
        return self.readline().decode().rstrip("\n")

    def close(self) -> None:
        self.sock.close()


def test_bitmap_layout() -> None:
    assert bitmap([]) == b""
    assert bitmap([0, 9]) == b"\x01\x02"
    assert bitmap([15]) == b"\x00\x80"


def test_sim_unknown_kind_refused() -> None:
    with pytest.raises(ValueError, match="sim:mouse: unknown simulated device"):
        SimInputHost("mouse")


def test_sim_inject_makes_fd_readable_and_read_drains(kbd: SimInputHost) -> None:
    assert select.select([kbd.fileno()], [], [], 0)[0] == []
    kbd.inject([(EV_KEY, KEY_A, 1)])
    assert select.select([kbd.fileno()], [], [], 0)[0] == [kbd.fileno()]
    assert kbd.read_events() == [(EV_KEY, KEY_A, 1)]
    assert select.select([kbd.fileno()], [], [], 0)[0] == []
    assert kbd.read_events() == []


def test_sim_status_write_of_code_it_lacks_refused(kbd: SimInputHost) -> None:
    with pytest.raises(InputHostError, match="has no status event type 0x11 code 0x9"):
        kbd.write_event(EV_LED, 9, 1)


def test_sim_unplugged_fails_reads(kbd: SimInputHost) -> None:
    kbd.unplugged = True
    with pytest.raises(InputHostError, match="No such device"):
        kbd.read_events()


# -- the control line parser -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("EV EV_KEY KEY_A 1", ControlCommand("EV", (EV_KEY, KEY_A, 1))),
        ("ev 1 0x1e -1", ControlCommand("EV", (1, 30, -1))),
        ("SYN", ControlCommand("SYN")),
        ("  KEY KEY_CAPSLOCK 0  ", ControlCommand("KEY", (58, 0))),
        ("GET EV_LED LED_CAPSL", ControlCommand("GET", (EV_LED, 1))),
        ("WAIT EV_LED 1 1", ControlCommand("WAIT", (EV_LED, 1, 1))),
        ("WAIT EV_LED 1 1 2.5", ControlCommand("WAIT", (EV_LED, 1, 1), 2.5)),
        ("INFO", ControlCommand("INFO")),
    ],
)
def test_control_line_parses(line: str, want: ControlCommand) -> None:
    assert parse_control_line(line) == want


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("", "empty command"),
        ("JUMP", "unknown command 'JUMP'"),
        ("EV 1 2", "EV takes 3 arguments, not 2"),
        ("EV EV_BOGUS 1 1", "type 'EV_BOGUS' is neither a known name nor a number"),
        ("EV 32 1 1", "type 32 out of range 0..31"),
        ("EV 1 768 1", "code 768 out of range 0..767"),
        ("EV 1 1 2147483648", "value 2147483648 out of range"),
        ("WAIT 1 1 1 forever", "WAIT timeout 'forever' is not a number"),
        ("WAIT 1 1 1 -1", "WAIT timeout -1.0 out of range"),
        ("SYN now", "SYN takes 0 arguments, not 1"),
    ],
)
def test_control_line_refused(line: str, match: str) -> None:
    with pytest.raises(ControlError, match=match):
        parse_control_line(line)


@given(st.text(max_size=80))
def test_control_any_line_parses_or_raises_control_error(line: str) -> None:
    try:
        cmd = parse_control_line(line)
    except ControlError:
        return
    assert cmd.verb in {"EV", "SYN", "KEY", "GET", "WAIT", "INFO"}
    assert all(isinstance(a, int) for a in cmd.args)


_word = st.one_of(st.sampled_from(sorted(NAMES)), st.integers(-(2**40), 2**40).map(str))


@given(
    verb=st.sampled_from(["EV", "SYN", "KEY", "GET", "WAIT", "INFO", "ev"]), words=st.lists(_word, max_size=5)
)
def test_control_structured_lines_parse_or_raise_control_error(verb: str, words: list[str]) -> None:
    try:
        cmd = parse_control_line(" ".join([verb, *words]))
    except ControlError:
        return
    for word, arg in zip(words, cmd.args, strict=False):
        assert arg == NAMES.get(word, int(word) if word.lstrip("-").isdigit() else arg)


@given(st.binary(max_size=60))
def test_control_server_any_bytes_reply_one_line(raw: bytes) -> None:
    host = SimInputHost("keyboard")
    try:
        srv = ControlServer.__new__(ControlServer)
        srv.host = host
        reply = srv.handle_line(raw.replace(b"\n", b""))
        assert "\n" not in reply
        assert reply.startswith(("ok", "error: "))
    finally:
        host.close()


# -- the control server over a socket ------------------------------------------------------------


def test_control_server_injects_events(kbd: SimInputHost, server: ControlServer) -> None:
    c = Client(server.path)
    try:
        assert c.ask("EV EV_KEY KEY_A 1") == "ok"
        assert c.ask("SYN") == "ok"
        assert c.ask("KEY 31 1") == "ok"
        assert kbd.read_events() == [(EV_KEY, KEY_A, 1), (EV_SYN, SYN_REPORT, 0), (EV_KEY, 31, 1), (0, 0, 0)]
        assert c.ask("INFO") == "ok vhost-device-input simulated keyboard"
        assert c.ask("nonsense").startswith("error: unknown command")
        assert c.ask(b"\xff\xfe").startswith("error: line is not UTF-8")
    finally:
        c.close()


def test_control_server_get_and_wait_status(kbd: SimInputHost, server: ControlServer) -> None:
    c = Client(server.path)
    try:
        assert c.ask("GET EV_LED LED_CAPSL") == "ok 0"
        kbd.write_event(EV_LED, 1, 1)
        assert c.ask("GET EV_LED LED_CAPSL") == "ok 1"
        assert c.ask("WAIT EV_LED LED_CAPSL 1 5") == "ok"
        assert c.ask("WAIT EV_LED LED_NUML 1 0").startswith("error: timeout after 0.0 s")
    finally:
        c.close()


def test_control_server_overlong_line_cut_off(server: ControlServer) -> None:
    c = Client(server.path)
    try:
        c.sock.sendall(b"x" * 1000)
        assert c.readline().startswith(b"error: line longer than 256 bytes")
        assert c.readline() == b""  # closed
    finally:
        c.close()


def test_control_server_close_removes_socket(kbd: SimInputHost, tmp_path: Path) -> None:
    path = tmp_path / "ctl"
    srv = ControlServer(kbd, str(path))
    c = Client(str(path))
    srv.close()
    assert not path.exists()
    assert c.readline() == b""
    c.close()
    srv.close()  # twice is harmless


def test_control_server_replaces_stale_socket_but_not_a_file(kbd: SimInputHost, tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    ControlServer(kbd, str(stale)).close()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(OSError):
        ControlServer(kbd, str(regular))
    assert regular.read_text() == "keep me"


# -- python-evdev -------------------------------------------------------------------------------------


def test_evdev_backend_refuses_missing_and_non_evdev_nodes(tmp_path: Path) -> None:
    pytest.importorskip("evdev", reason="python-evdev (the hosts extra) is not installed")
    from virtio_devices.hosts.evdev_input import EvdevInputHost  # noqa: PLC0415

    with pytest.raises(InputHostError, match="cannot open: No such file"):
        EvdevInputHost(str(tmp_path / "nope"))
    regular = tmp_path / "event0"
    regular.write_bytes(b"")
    with pytest.raises(InputHostError, match="not an evdev node"):
        EvdevInputHost(str(regular))
    with pytest.raises(InputHostError, match="not an evdev node"):
        EvdevInputHost("/dev/null")


def test_evdev_backend_on_a_real_node() -> None:
    pytest.importorskip("evdev", reason="python-evdev (the hosts extra) is not installed")
    from virtio_devices.hosts.evdev_input import EvdevInputHost  # noqa: PLC0415

    nodes = sorted(Path("/dev/input").glob("event*")) if Path("/dev/input").is_dir() else []
    readable = [n for n in nodes if os.access(n, os.R_OK)]
    if not readable:
        pytest.skip(
            "no readable /dev/input/event* node on this machine (the guest-plays-host test covers it)"
        )
    host = EvdevInputHost(str(readable[0]))
    try:
        assert host.device_name()
        assert host.event_bits(EV_SYN)[0] & 1
        assert isinstance(host.read_events(), list)
    finally:
        host.close()


def test_control_server_pipelined_lines_all_arrive_before_replies_are_read(
    kbd: SimInputHost, server: ControlServer
) -> None:
    """A client that writes many lines before reading any reply: every event arrives
    (replies go one send per read, not one small message per line)."""
    c = Client(server.path)
    try:
        c.sock.sendall(b"".join(b"KEY 30 %d\n" % (i & 1) for i in range(1000)))
        got: list[tuple[int, int, int]] = []
        while len(got) < 2000 and select.select([kbd.fileno()], [], [], 10)[0]:
            got += kbd.read_events()
        assert len(got) == 2000
        assert [c.readline() for _ in range(1000)] == [b"ok\n"] * 1000
    finally:
        c.close()


# -- the pipe twin of an evdev node ---------------------------------------------------------------


def test_pipe_twin_records_are_struct_input_event() -> None:
    """The twin's records have the size the compiled path reads (``sizeof(struct
    input_event)`` from linux/input.h), and come back as written, in order."""
    from virtio_devices import _input_fast  # noqa: PLC0415

    assert INPUT_EVENT.size == _input_fast.INPUT_EVENT_SIZE
    host = PipeInputHost("keyboard")
    try:
        assert host.raw_input_events
        events = [(EV_KEY, KEY_A, i & 1) for i in range(500)] + [(EV_SYN, SYN_REPORT, 0), (3, 0, -7)]
        host.inject(events)
        raw = os.read(host.fileno(), 24 * 3)
        assert [(t, c, v) for _s, _u, t, c, v in INPUT_EVENT.iter_unpack(raw)] == events[:3]
        assert host.read_events() == events[3:]
        assert host.read_events() == []
    finally:
        host.close()


def test_pipe_twin_unplugged_reads_fail_and_the_fd_ends() -> None:
    host = PipeInputHost("tablet")
    try:
        host.unplugged = True
        with pytest.raises(InputHostError, match="reading events failed"):
            host.read_events()
        assert os.read(host.fileno(), 24) == b""  # end of file: the compiled path's "gone"
    finally:
        host.close()
