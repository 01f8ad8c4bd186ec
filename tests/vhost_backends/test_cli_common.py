"""Shared CLI pieces: RUST_LOG parsing, socket suffixing, integer flags, --version."""

from __future__ import annotations

import argparse
import io
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

import virtio_queue
from vhost_backends.cli._common import (
    TRACE,
    USIZE_MAX,
    ConfigError,
    add_socket_count_args,
    add_socket_or_fd_args,
    add_socket_path_arg,
    make_parser,
    parse_rust_log,
    serve,
    setup_logging,
    socket_paths,
    uint,
    verbatim_socket_path,
    version_string,
)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    saved = {n: logging.getLogger(n).level for n in ("virtio_devices", "vhost_backends", "foo.bar")}
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    for n, lvl in saved.items():
        logging.getLogger(n).setLevel(lvl)


# -- RUST_LOG ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "level"),
    [
        (None, logging.ERROR),
        ("", logging.ERROR),
        ("error", logging.ERROR),
        ("warn", logging.WARNING),
        ("INFO", logging.INFO),
        ("debug", logging.DEBUG),
        ("trace", TRACE),
    ],
)
def test_rust_log_default_level(spec: str | None, level: int) -> None:
    assert parse_rust_log(spec)[0] == level


def test_rust_log_off_silences_errors() -> None:
    assert parse_rust_log("off")[0] > logging.CRITICAL


def test_rust_log_targets_and_bad_directives() -> None:
    default, targets, bad = parse_rust_log("info,vhost_device_rng=debug, foo::bar=warn,x=loud/regex")
    assert default == logging.INFO
    assert targets == {"vhost_device_rng": logging.DEBUG, "foo.bar": logging.WARNING}
    assert bad == ["x=loud"]


def test_setup_logging_unset_shows_errors_only(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging({}, out)
    log = logging.getLogger("virtio_devices.test")
    log.warning("not shown")
    log.error("shown %d", 1)
    assert "not shown" not in out.getvalue()
    line = out.getvalue().strip()
    assert line.endswith("ERROR virtio_devices.test] shown 1")
    assert line.startswith("[")


def test_setup_logging_rust_crate_target_maps_to_our_packages(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging({"RUST_LOG": "vhost_device_rng=debug"}, out)
    logging.getLogger("virtio_devices.rng").debug("dbg")
    logging.getLogger("elsewhere").warning("other")
    text = out.getvalue()
    assert "DEBUG virtio_devices.rng] dbg" in text
    assert "other" not in text


def test_setup_logging_warn_level_name_is_rusts(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging({"RUST_LOG": "warn"}, out)
    logging.getLogger("vhost_backends.x").warning("careful")
    assert "WARN  vhost_backends.x] careful" in out.getvalue()


def test_setup_logging_bad_directive_warns(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging({"RUST_LOG": "foo=loud"}, io.StringIO())
    assert "invalid logging spec 'foo=loud'" in capsys.readouterr().err


def test_rust_log_misspelt_level_is_bad_once() -> None:
    default, targets, bad = parse_rust_log("verbose,x=loud,verbose,x=loud")
    assert (default, targets, bad) == (logging.ERROR, {}, ["verbose", "x=loud"])


def test_rust_log_bare_target_of_ours_is_accepted() -> None:
    _default, targets, bad = parse_rust_log("vhost_backends::daemon,vhost_device_rng")
    assert targets == {"vhost_backends.daemon": TRACE, "vhost_device_rng": TRACE}
    assert bad == []


def test_setup_logging_unknown_level_reported_once_on_stderr(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging({"RUST_LOG": "verbose,verbose"}, io.StringIO())
    err = capsys.readouterr().err
    assert err == (
        "warning: invalid logging spec 'verbose' in RUST_LOG "
        "(levels: error, warn, info, debug, trace, off), ignoring it\n"
    )


# -- socket paths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "count", "want"),
    [
        ("/some/socket_path", 1, ["/some/socket_path0"]),
        ("/tmp/x.sock", 3, ["/tmp/x.sock0", "/tmp/x.sock1", "/tmp/x.sock2"]),
        ("x.sock", 2, ["x.sock0", "x.sock1"]),
        ("dir/", 1, ["dir0"]),
    ],
)
def test_socket_paths_always_suffixed(path: str, count: int, want: list[str]) -> None:
    assert socket_paths(path, count) == want


@pytest.mark.parametrize("path", ["/", "", ".", ".."])
def test_socket_paths_without_file_name_is_config_error(path: str) -> None:
    with pytest.raises(ConfigError, match="no file name"):
        socket_paths(path, 1)


def test_socket_paths_zero_count_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^--socket-count must be at least 1, not 0$"):
        socket_paths("/tmp/x", 0)


# -- integers like clap's --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("+7", 7), ("4294967295", 2**32 - 1)])
def test_uint_accepts_decimal(text: str, value: int) -> None:
    assert uint(32)(text) == value


@pytest.mark.parametrize("text", ["-1", "1_000", "0x10", " 1", "", "\u0663", "4294967296"])
def test_uint_rejects_what_clap_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        uint(32)(text)


def test_uint_usize_max() -> None:
    assert uint(64)(str(USIZE_MAX)) == USIZE_MAX


# -- version and help ---------------------------------------------------------------------------


def test_version_string_names_build_features() -> None:
    v = version_string("vhost-device-x")
    assert v.startswith(f"vhost-device-x {virtio_queue.__version__} (")
    assert "xen=on" in v or "xen=off" in v
    assert "debug=on" in v or "debug=off" in v


def test_version_flag_prints_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    parser = make_parser("vhost-device-x", "First line.\n\nMore.")
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["-V"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("vhost-device-x ")


def test_help_description_is_docstring_first_line() -> None:
    parser = make_parser("vhost-device-x", "vhost-device-x: does a thing.\n\nDetails.")
    assert parser.description == "vhost-device-x: does a thing."
    assert "Details" not in parser.format_help()


# -- socket flags ---------------------------------------------------------------------------------


def test_socket_count_args_suffix_every_path() -> None:
    p = make_parser("vhost-device-x", None)
    add_socket_count_args(p)
    ns = p.parse_args(["--socket-path", "/tmp/x.sock", "-c", "2"])
    assert socket_paths(ns.socket_path, ns.socket_count) == ["/tmp/x.sock0", "/tmp/x.sock1"]
    ns = p.parse_args(["-s", "/tmp/x.sock"])
    assert socket_paths(ns.socket_path, ns.socket_count) == ["/tmp/x.sock0"]


def test_socket_path_arg_is_verbatim_and_required(capsys: pytest.CaptureFixture[str]) -> None:
    p = make_parser("vhost-device-x", None)
    add_socket_path_arg(p)
    assert verbatim_socket_path(p.parse_args(["-s", "/tmp/foo.sock"]).socket_path) == "/tmp/foo.sock"
    with pytest.raises(SystemExit) as exc:
        p.parse_args([])
    assert exc.value.code == 2
    with pytest.raises(ConfigError, match="no file name"):
        verbatim_socket_path("/")


@pytest.mark.parametrize(
    ("argv", "socket", "fd"),
    [(["--socket", "/tmp/snd.sock"], "/tmp/snd.sock", None), (["--socket-fd", "3"], None, 3)],
)
def test_socket_or_fd_args_take_one(argv: list[str], socket: str | None, fd: int | None) -> None:
    p = make_parser("vhost-device-x", None)
    add_socket_or_fd_args(p)
    ns = p.parse_args(argv)
    assert (ns.socket, ns.socket_fd) == (socket, fd)


@pytest.mark.parametrize("argv", [[], ["--socket", "/a", "--socket-fd", "3"], ["--socket-fd", "x"]])
def test_socket_or_fd_args_need_exactly_one(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Upstream sound's clap group "socket group" is required and takes one member."""
    p = make_parser("vhost-device-x", None)
    add_socket_or_fd_args(p)
    with pytest.raises(SystemExit) as exc:
        p.parse_args(argv)
    assert exc.value.code == 2


# -- serve ------------------------------------------------------------------------------------------


@pytest.fixture
def run_daemons(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], Any, int | None]]:
    """Replace vhost_backends.daemon.run_daemons (the real module) with a recorder."""
    import vhost_backends.daemon  # noqa: PLC0415

    calls: list[tuple[str, list[str], Any, int | None]] = []

    def fake(
        name: str, paths: Sequence[str], factory: Callable[[int], Any], *, poll_max_us: int | None = None
    ) -> int:
        calls.append((name, list(paths), factory(0), poll_max_us))
        return 7

    monkeypatch.setattr(vhost_backends.daemon, "run_daemons", fake)
    monkeypatch.delenv("VHD_POLL_US", raising=False)
    return calls


def test_serve_passes_paths_factory_and_exit_status(run_daemons: list[Any]) -> None:
    assert serve("vhost-device-x", ["/tmp/a0"], lambda i: ("dev", i)) == 7
    assert run_daemons == [("vhost-device-x", ["/tmp/a0"], ("dev", 0), None)]


@pytest.mark.parametrize(("value", "want"), [("0", 0), (" 250 ", 250), ("", None)])
def test_serve_polling_window_comes_from_vhd_poll_us(
    run_daemons: list[Any], monkeypatch: pytest.MonkeyPatch, value: str, want: int | None
) -> None:
    monkeypatch.setenv("VHD_POLL_US", value)
    serve("vhost-device-x", ["/tmp/a0"], lambda i: None)
    assert run_daemons[0][3] == want


@pytest.mark.parametrize(("value", "want"), [("", 0), ("250", 250), ("0", 0)])
def test_serve_default_poll_us_applies_only_when_vhd_poll_us_is_unset(
    run_daemons: list[Any], monkeypatch: pytest.MonkeyPatch, value: str, want: int
) -> None:
    """A daemon's own default (input: no polling); VHD_POLL_US still decides."""
    monkeypatch.setenv("VHD_POLL_US", value)
    serve("vhost-device-x", ["/tmp/a0"], lambda i: None, default_poll_us=0)
    assert run_daemons[0][3] == want


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "1000001", "\u0663"])
def test_serve_bad_vhd_poll_us_is_config_error_before_serving(
    run_daemons: list[Any], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("VHD_POLL_US", value)
    with pytest.raises(ConfigError, match="VHD_POLL_US must be a number"):
        serve("vhost-device-x", ["/tmp/a0"], lambda i: None)
    assert run_daemons == []


def test_cli_modules_import_without_the_daemon_layer() -> None:
    """Parsing and validation need no vhost_backends.daemon: serve imports it late."""
    code = (
        "import sys; import vhost_backends.cli.rng, vhost_backends.cli.template; "
        "print('vhost_backends.daemon' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"
