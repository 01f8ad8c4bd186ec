"""Pieces every ``vhost-device-<name>`` command shares.

* :func:`setup_logging`: the ``RUST_LOG`` convention of env_logger, which the Rust
  daemons use (levels error, warn, info, debug, trace, off; ``target=level``
  directives; errors only when unset).  Only the CLI installs log handlers.
* The socket flags, spelled as upstream's daemons spell them:
  :func:`add_socket_count_args` (``-s/--socket-path`` + ``-c/--socket-count``, the
  index always appended: :func:`socket_paths`), :func:`add_socket_path_arg`
  (``-s/--socket-path`` used verbatim: :func:`verbatim_socket_path`) and
  :func:`add_socket_or_fd_args` (``--socket`` or ``--socket-fd``, exactly one).
* :func:`serve`: the one call at the end of every ``run``: the daemon layer imported
  late (parsing and validation work without it), ``VHD_POLL_US`` read, a fresh
  device per connection from the factory.  CLI tests patch this one function.
* :class:`ConfigError`: a bad command line found by ``Config.from_args``;
  :func:`run_main` prints ``error: ...`` and exits 1.  argparse usage errors exit 2
  with one line, as clap's do.
* :func:`add_version_argument`: ``-V/--version`` printing the version and the build
  features (``xen=on|off debug=on|off``).
* Typed argument parsers for clap's integer types (``u32``, ``usize``, ``u128``).
* :func:`env_poll_max_us`, :func:`env_switch`: settings that upstream has no flag
  for (``VHD_POLL_US``, the adaptive ring polling window; ``VHD_RNG_VDSO``, the
  vDSO's getrandom for the kernel's random device), environment variables so that
  the command lines stay upstream's.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NoReturn, TypeVar

import virtio_queue

__all__ = [
    "TRACE",
    "U32_MAX",
    "USIZE_MAX",
    "ConfigError",
    "add_socket_count_args",
    "add_socket_or_fd_args",
    "add_socket_path_arg",
    "add_version_argument",
    "env_poll_max_us",
    "env_switch",
    "make_parser",
    "parse_rust_log",
    "run_main",
    "serve",
    "setup_logging",
    "socket_paths",
    "uint",
    "verbatim_socket_path",
    "version_string",
]

#: Python level for env_logger's ``trace`` (below DEBUG).
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

U32_MAX = 2**32 - 1
#: clap's ``usize::MAX`` on the 64-bit hosts the daemons run on.
USIZE_MAX = 2**64 - 1
U128_MAX = 2**128 - 1

_LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}

_LEVEL_NAMES = "error, warn, info, debug, trace, off"

# The packages whose loggers RUST_LOG configures when a directive names no target.
_OUR_PACKAGES = ("virtio_queue", "virtio_devices", "vhost_backends", "xen")


class ConfigError(ValueError):
    """The command line is well formed but its values cannot work together.

    Raised by ``Config.from_args`` (a period out of range, a socket count of 0...)
    and by ``run`` for setup failures the user must fix (an unreadable
    ``--rng-source``).  :func:`run_main` prints ``error: <message>`` and exits 1.
    """


# -- logging ----------------------------------------------------------------------------


def parse_rust_log(spec: str | None) -> tuple[int, dict[str, int], list[str]]:
    """Parse an env_logger ``RUST_LOG`` value.

    Returns the default level, per-logger levels (``target=level``; Rust's ``::``
    becomes ``.``, and a target naming an upstream crate such as
    ``vhost_device_rng`` applies to our packages), and the directives it could not
    understand, each once: a bad level, or a bare word that is neither a level nor
    a target of this program (env_logger would take it as a target and say
    nothing).  Unset or empty means errors only.
    """
    default = logging.ERROR
    targets: dict[str, int] = {}
    bad: list[str] = []
    if not spec:
        return default, targets, bad
    # env_logger allows a trailing "/regex" filter on messages; we ignore it.
    for raw in spec.split("/", 1)[0].split(","):
        directive = raw.strip()
        if not directive:
            continue
        name, sep, level = directive.partition("=")
        if not sep:
            lvl = _LEVELS.get(name.lower())
            if lvl is not None:
                default = lvl
            elif _known_target(name.replace("::", ".")):
                # A bare target enables everything for it (env_logger semantics).
                targets[name.replace("::", ".")] = TRACE
            elif directive not in bad:
                # Neither a level nor anything that logs here: most likely a
                # misspelt level ("warning", "verbose"), which would otherwise
                # change nothing without a word.
                bad.append(directive)
            continue
        lvl = _LEVELS.get(level.strip().lower())
        if lvl is None or not name:
            if directive not in bad:
                bad.append(directive)
            continue
        targets[name.strip().replace("::", ".")] = lvl
    return default, targets, bad


def _is_upstream_crate(target: str) -> bool:
    """Whether ``target`` names a Rust crate whose part our packages play."""
    return target.startswith("vhost_device") or target in ("vhost_user_backend", "virtio_queue")


def _known_target(target: str) -> bool:
    """Whether a ``RUST_LOG`` target can select any of this program's loggers."""
    return _is_upstream_crate(target) or target.split(".", 1)[0] in _OUR_PACKAGES


class _RustStyleFormatter(logging.Formatter):
    """``[2026-07-16T10:00:00Z WARN  virtio_devices.rng] message``, env_logger's shape."""

    @staticmethod
    def converter(secs: float | None = None, /) -> time.struct_time:
        """Timestamps in UTC, as env_logger prints them."""
        return time.gmtime(secs)

    _NAMES: ClassVar[dict[int, str]] = {logging.WARNING: "WARN", logging.CRITICAL: "ERROR"}

    def format(self, record: logging.LogRecord) -> str:
        record.rust_level = self._NAMES.get(record.levelno, record.levelname)
        return super().format(record)


def setup_logging(env: Mapping[str, str] | None = None, stream: Any = None) -> logging.Handler:
    """Install the one stderr handler of a daemon, levels taken from ``RUST_LOG``.

    Returns the handler (tests remove it again).
    """
    env = os.environ if env is None else env
    default, targets, bad = parse_rust_log(env.get("RUST_LOG"))
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(
        _RustStyleFormatter("[%(asctime)s %(rust_level)-5s %(name)s] %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(default)
    for pkg in _OUR_PACKAGES:
        logging.getLogger(pkg).setLevel(logging.NOTSET)
    for target, level in targets.items():
        if _is_upstream_crate(target):
            # An upstream crate name: the Python packages play its part.
            for pkg in _OUR_PACKAGES:
                logging.getLogger(pkg).setLevel(level)
        else:
            logging.getLogger(target).setLevel(level)
    for directive in bad:
        print(
            f"warning: invalid logging spec '{directive}' in RUST_LOG (levels: {_LEVEL_NAMES}), ignoring it",
            file=sys.stderr,
        )
    return handler


# -- sockets ------------------------------------------------------------------------------


def socket_paths(path: str | os.PathLike[str], count: int) -> list[str]:
    """``<dir>/<name>0 .. <dir>/<name>{count-1}``: upstream's socket naming for ``-c``.

    The index is appended to the file name even for one socket
    (``-s /tmp/rng.sock`` serves ``/tmp/rng.sock0``), as
    ``generate_socket_paths`` does in vhost-device-rng, -gpio, -i2c, -console...

    Raises:
        ConfigError: ``count`` is below 1, or ``path`` names no file (upstream
            panics: "socket_path has no filename").
    """
    if count < 1:
        raise ConfigError(f"--socket-count must be at least 1, not {count}")
    p = pathlib.PurePath(os.fspath(path))
    if p.name in ("", ".", ".."):
        raise ConfigError(f"socket path {os.fspath(path)!r} has no file name")
    return [str(p.parent / f"{p.name}{i}") for i in range(count)]


def verbatim_socket_path(path: str | os.PathLike[str]) -> str:
    """``path`` as the socket to serve, unchanged (daemons without ``-c``).

    Raises:
        ConfigError: ``path`` names no file.
    """
    text = os.fspath(path)
    if pathlib.PurePath(text).name in ("", ".", ".."):
        raise ConfigError(f"socket path {text!r} has no file name")
    return text


def add_socket_count_args(
    parser: argparse.ArgumentParser,
    *,
    count_help: str = "Number of guests (sockets) to connect to [default: 1]",
) -> None:
    """``-c/--socket-count`` (default 1) and a required ``-s/--socket-path``, whose
    paths :func:`socket_paths` makes (``ns.socket_path``, ``ns.socket_count``)."""
    parser.add_argument(
        "-c",
        "--socket-count",
        type=uint(32),
        default=1,
        metavar="SOCKET_COUNT",
        help=count_help,
    )
    parser.add_argument(
        "-s",
        "--socket-path",
        required=True,
        metavar="SOCKET",
        help="Location of vhost-user Unix domain socket. This is suffixed by 0,1,2..socket_count-1.",
    )


def add_socket_path_arg(
    parser: argparse.ArgumentParser,
    *,
    help: str = "Location of vhost-user Unix domain socket. This supports a single socket / guest.",
) -> None:
    """A required ``-s/--socket-path`` used verbatim (:func:`verbatim_socket_path`)."""
    parser.add_argument("-s", "--socket-path", required=True, metavar="SOCKET", help=help)


def add_socket_or_fd_args(parser: argparse.ArgumentParser) -> None:
    """``--socket PATH`` or ``--socket-fd FD``, exactly one (upstream sound's group).

    ``ns.socket`` is the path used verbatim, ``ns.socket_fd`` a listening socket
    the daemon inherited; the other is None.
    """
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--socket", metavar="SOCKET", help="vhost-user Unix domain socket path")
    group.add_argument(
        "--socket-fd", type=uint(32), metavar="FD", help="vhost-user Unix domain socket file descriptor"
    )


def serve(
    prog: str,
    paths: Sequence[str],
    factory: Callable[[int], Any],
    *,
    listen_fd: int | None = None,
    default_poll_us: int | None = None,
) -> int:
    """Serve ``factory(i)`` devices on ``paths[i]`` until SIGINT/SIGTERM; the exit status.

    With ``listen_fd`` (``--socket-fd``), the one daemon serves that inherited
    listening socket and ``paths[0]`` only names it in logs.  ``default_poll_us``
    is the polling window when ``VHD_POLL_US`` is unset (None: the daemon's own).

    The end of every daemon's ``run``: a fresh device per front-end connection,
    the polling window from ``VHD_POLL_US``.  The daemon layer is imported here,
    so that parsing and validation work without it; tests patch this function.

    Raises:
        ConfigError: ``VHD_POLL_US`` is not a number of microseconds.
    """
    poll_max_us = env_poll_max_us()
    if poll_max_us is None:
        poll_max_us = default_poll_us
    from vhost_backends.daemon import run_daemons  # noqa: PLC0415 - late, see above

    if listen_fd is None:
        return run_daemons(prog, paths, factory, poll_max_us=poll_max_us)
    return run_daemons(prog, paths, factory, poll_max_us=poll_max_us, listen_fds=[listen_fd])


def _env_text(name: str, env: Mapping[str, str] | None) -> str:
    """Environment variable ``name`` (from ``env``, else the process's), stripped;
    empty when unset."""
    return (os.environ if env is None else env).get(name, "").strip()


def env_poll_max_us(env: Mapping[str, str] | None = None) -> int | None:
    """``VHD_POLL_US`` from the environment: the longest adaptive polling window in
    µs (0: never poll); None when unset or empty (the daemon's default).

    Raises:
        ConfigError: not a whole number from 0 to 1000000.
    """
    text = _env_text("VHD_POLL_US", env)
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or int(text) > 1_000_000:
        raise ConfigError(f"VHD_POLL_US must be a number of microseconds from 0 to 1000000, not {text!r}")
    return int(text)


def env_switch(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """An on/off setting from environment variable ``name``: ``1`` or ``0``;
    ``default`` when unset or empty.

    Raises:
        ConfigError: any other value.
    """
    text = _env_text(name, env)
    if not text:
        return default
    if text not in ("0", "1"):
        raise ConfigError(f"{name} must be 0 or 1, not {text!r}")
    return text == "1"


# -- argument types ---------------------------------------------------------------------------


def uint(bits: int, *, minimum: int = 0) -> Callable[[str], int]:
    """An argparse ``type`` for clap's unsigned integer of ``bits`` bits.

    Accepts decimal only, as clap's ``FromStr`` for integers (an optional ``+``,
    no underscores); anything else is a usage error (exit 2).
    """
    maximum = 2**bits - 1

    def parse(text: str) -> int:
        digits = text[1:] if text.startswith("+") else text
        if not digits.isascii() or not digits.isdigit():
            raise argparse.ArgumentTypeError(f"invalid value '{text}': invalid digit found in string")
        value = int(digits)
        if value > maximum:
            raise argparse.ArgumentTypeError(
                f"invalid value '{text}': number too large to fit in target type"
            )
        if value < minimum:
            raise argparse.ArgumentTypeError(f"invalid value '{text}': must be at least {minimum}")
        return value

    parse.__name__ = f"u{bits}"
    return parse


# -- version and parser -----------------------------------------------------------------------


def version_string(prog: str) -> str:
    """``<prog> <version> (xen=on|off debug=on|off)`` from the compiled core."""
    xen = "on" if virtio_queue.BUILT_WITH_XEN else "off"
    debug = "on" if virtio_queue.BUILT_WITH_DEBUG else "off"
    return f"{prog} {virtio_queue.__version__} (xen={xen} debug={debug})"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kw: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kw: Any) -> NoReturn:
        print(version_string(parser.prog))
        parser.exit(0)


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``-V/--version`` (clap's spelling), printing version and build features."""
    parser.add_argument("-V", "--version", action=_VersionAction, help="Print version and build features")


def make_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the first line of ``doc``, with ``-V``."""
    first = (doc or "").strip().splitlines()
    parser = argparse.ArgumentParser(prog=prog, description=first[0] if first else None)
    add_version_argument(parser)
    return parser


# -- main ---------------------------------------------------------------------------------------

_C = TypeVar("_C")


def run_main(
    parser: argparse.ArgumentParser,
    from_args: Callable[[argparse.Namespace], _C],
    run: Callable[[_C], int],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse, validate, run: the body of every daemon's ``main``.

    Usage errors exit 2 inside argparse.  A :class:`ConfigError` from validation or
    setup, or a socket path the daemon cannot listen on
    (:class:`~vhost_backends.daemon.ListenError`), prints ``error: <message>`` on
    stderr and returns 1.  Logging is set up from ``RUST_LOG`` before validation, so
    setup messages follow it.
    """
    ns = parser.parse_args(argv)
    # The daemon layer, which run() imports anyway, raises ListenError for a socket
    # path it cannot take: a bad value like any other.
    from vhost_backends.daemon import ListenError  # noqa: PLC0415

    handler = setup_logging()
    try:
        config = from_args(ns)
        return run(config)
    except (ConfigError, ListenError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        logging.getLogger().removeHandler(handler)
