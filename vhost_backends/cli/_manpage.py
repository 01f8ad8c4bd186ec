"""A roff man page made from a daemon's argparse parser and module docstring.

``python -m vhost_backends.cli._manpage vhost_backends.cli.vsock > vhost-device-vsock.1``
prints the page of that command: NAME and DESCRIPTION from the module docstring,
SYNOPSIS and OPTIONS from ``build_parser()``, so the page cannot drift from the
flags (a test compares the committed page with a fresh one).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["render"]


def _esc(text: str) -> str:
    """Escape roff: backslashes, and a leading dot or quote that roff takes as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line if line[:1] in (".", "'") else line) for line in text.split("\n"))


def _option(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_esc(o)}\\fR" for o in action.option_strings)
    if action.nargs != 0:
        meta = action.metavar or action.dest.upper()
        names += f" \\fI{_esc(str(meta))}\\fR"
    text = (action.help or "").replace("%%", "%")
    return f".TP\n{names}\n{_esc(text)}\n"


def render(module_name: str, date: str = "") -> str:
    """The man page of the command whose CLI module is ``module_name``."""
    mod = importlib.import_module(module_name)
    parser: argparse.ArgumentParser = mod.build_parser()
    doc = (mod.__doc__ or "").strip()
    first, _, rest = doc.partition("\n")
    summary = first.partition(":")[2]
    prog = parser.prog
    out = [
        f'.TH {prog.upper()} 1 "{date}" "{prog}" "User Commands"',
        ".SH NAME",
        f"{_esc(prog)} \\- {_esc(summary.strip())}",
        ".SH SYNOPSIS",
        f".B {_esc(prog)}",
        _esc(" ".join(parser.format_usage().split()[2:])),
        ".SH DESCRIPTION",
    ]
    for para in rest.strip().split("\n\n"):
        if para.startswith("    "):
            out += [".PP", ".nf", _esc("\n".join(line[4:] for line in para.splitlines())), ".fi"]
        else:
            out += [".PP", _esc(" ".join(para.split()).replace("``", "'"))]
    out.append(".SH OPTIONS")
    out += [_option(a).rstrip("\n") for a in parser._actions if a.option_strings]
    out += [
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBRUST_LOG\\fR",
        "Log level: error, warn, info, debug, trace (errors only when unset).",
        ".SH EXIT STATUS",
        "0 after SIGINT/SIGTERM; 1 for a bad value (one line \\fBerror: ...\\fR on stderr);",
        "2 for a usage error.",
    ]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m vhost_backends.cli._manpage MODULE", file=sys.stderr)
        return 2
    sys.stdout.write(render(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
