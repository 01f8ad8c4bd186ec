"""Man pages generated from a daemon's argparse parser (roff, section 1).

The page is made from what ``--help`` knows: the name line from the first line of
the module docstring, the synopsis and every option from ``build_parser()``, the
rest of the docstring as the description.  So the page cannot drift from the
flags.  Usage::

    python -m vhost_backends.cli.manpage vhost_backends.cli.scsi > docs/man/vhost-device-scsi.1
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "render"]


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote on a line."""
    out = []
    # reST literals and literal-block markers read as plain text in a man page.
    text = text.replace("``", "").replace("::", ":")
    for line in text.replace("\\", "\\e").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
    if not action.option_strings:
        return f"\\fI{_roff(action.metavar or action.dest)}\\fR..."  # type: ignore[arg-type]
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    return f"{names} \\fI{_roff(str(metavar))}\\fR"


def render(parser: argparse.ArgumentParser, doc: str | None, version: str = "") -> str:
    """The man page (roff) of ``parser``; ``doc`` is the command module's docstring."""
    prog = parser.prog
    lines = (doc or "").strip().splitlines()
    summary = lines[0].split(":", 1)[-1].strip() if lines else ""
    body = "\n".join(lines[1:]).strip()
    usage = parser.format_usage().removeprefix("usage: ").strip()
    out = [
        f'.TH {prog.upper()} 1 "" "{_roff(version)}" "User Commands"',
        ".SH NAME",
        f"{_roff(prog)} \\- {_roff(summary)}",
        ".SH SYNOPSIS",
        f".B {_roff(usage)}",
        ".SH DESCRIPTION",
    ]
    for para in body.split("\n\n"):
        if para.strip():
            out += [".PP", _roff(" ".join(p.strip() for p in para.splitlines()))]
    out.append(".SH OPTIONS")
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        out += [".TP", _flag(action), _roff(action.help or "")]
    out += [
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBRUST_LOG\\fR",
        "Log level: error, warn, info, debug or trace (errors only when unset).",
        ".TP",
        "\\fBVHD_POLL_US\\fR",
        "Longest polling window of a ring after a service, in microseconds (0: off).",
        ".SH EXIT STATUS",
        "0 after SIGINT or SIGTERM; 1 for a bad value (one line, error: ...); 2 for a usage error.",
    ]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the man page of the daemon whose CLI module is named on the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m vhost_backends.cli.manpage MODULE", file=sys.stderr)
        return 2
    mod = importlib.import_module(args[0])
    sys.stdout.write(render(mod.build_parser(), mod.__doc__))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
