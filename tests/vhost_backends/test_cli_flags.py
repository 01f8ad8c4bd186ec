"""Each ``vhost-device-<name>`` parser has exactly upstream's flags (STYLE.md §6).

The reference is ``tests/vectors/upstream_flags.json``, read from the clap structs of
rust-vmm/vhost-device.  For every daemon listed there whose CLI module exists, the
argparse parser must offer the same flags: same short and long spelling, whether
it takes a value, its default, whether it is required, whether it repeats, and the
same value choices.  ``-h/--help`` and ``-V/--version`` are ours on every daemon.
Daemons not written yet are skipped, naming the module that is missing.  A CLI
module may add flags of its own that upstream lacks (gpio's ``--sim-control``) by
naming them in its ``OUR_FLAGS``; they are left out of the comparison.

A value that upstream splits on a delimiter (``-e a,b``) is one argparse argument
whose ``type`` callable carries a ``delimiter`` attribute; that counts as "multiple".
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).parent.parent / "vectors" / "upstream_flags.json"
UPSTREAM: dict[str, Any] = json.loads(VECTORS.read_text())["daemons"]
OURS_ONLY = {"-h", "--help", "-V", "--version"}
#: Value choices that differ from upstream on purpose, each listed in README's
#: "Differences from the Rust daemons": (daemon, flag) -> (added, left out).
CHOICE_DIFFERENCES: dict[tuple[str, str], tuple[set[str], set[str]]] = {
    # sound: PulseAudio as a backend of its own; no GStreamer backend.
    ("sound", "backend"): ({"pulseaudio"}, {"gstreamer"}),
}


def _parser(name: str) -> argparse.ArgumentParser:
    module = UPSTREAM[name]["module"]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            pytest.skip(f"{UPSTREAM[name]['binary']} not written yet ({module} missing)")
        raise
    parser = mod.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def _describe(action: argparse.Action) -> dict[str, Any]:
    longs = [o[2:] for o in action.option_strings if o.startswith("--")]
    shorts = [o[1:] for o in action.option_strings if len(o) == 2 and o[0] == "-" and o[1] != "-"]
    multiple = (
        action.nargs in ("*", "+")
        or isinstance(action, argparse._AppendAction | argparse._ExtendAction)
        or getattr(action.type, "delimiter", None) is not None
    )
    default = action.default
    if isinstance(default, bool):
        default = str(default).lower()
    elif default is not None and not multiple:
        default = str(default)
    elif multiple and not default:
        default = None
    out = {
        "dest": action.dest,
        "short": shorts[0] if shorts else None,
        "long": longs[0] if longs else None,
        "takes_value": action.nargs != 0,
        "default": default,
        "required": bool(action.required) if action.option_strings else action.nargs not in ("*", "?"),
        "multiple": multiple,
    }
    if action.choices is not None:
        out["choices"] = sorted(str(c) for c in action.choices)
    return out


def _ours(parser: argparse.ArgumentParser, extra: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    flags = {}
    for action in parser._actions:
        if set(action.option_strings) & (OURS_ONLY | extra):
            continue
        d = _describe(action)
        flags[d["long"] or d["dest"]] = d
    return flags


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_cli_flags_match_upstream(name: str) -> None:
    parser = _parser(name)
    extra = frozenset(getattr(importlib.import_module(UPSTREAM[name]["module"]), "OUR_FLAGS", ()))
    ours = _ours(parser, extra)
    theirs = {f["long"] or f["dest"]: f for f in UPSTREAM[name]["flags"]}
    assert sorted(ours) == sorted(theirs), f"{name}: flag set differs from upstream"
    for key, want in theirs.items():
        got = ours[key]
        for field in ("short", "takes_value", "default", "required", "multiple"):
            assert got[field] == want[field], (
                f"{name} {key}: {field} is {got[field]!r}, upstream {want[field]!r}"
            )
        if "choices" in want:
            added, left_out = CHOICE_DIFFERENCES.get((name, key), (set(), set()))
            expected = sorted((set(want["choices"]) - left_out) | added)
            assert got.get("choices") == expected, f"{name} {key}: choices differ"


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_cli_has_help_and_version(name: str) -> None:
    parser = _parser(name)
    options = {o for a in parser._actions for o in a.option_strings}
    assert {"-h", "--help", "-V", "--version"} <= options


def test_upstream_flags_vector_is_well_formed() -> None:
    keys = {"dest", "short", "long", "takes_value", "default", "required", "multiple"}
    for name, daemon in UPSTREAM.items():
        assert daemon["binary"] == f"vhost-device-{name}"
        assert daemon["socket_suffix"] in {"always", "verbatim", "per-event-device"}
        for flag in daemon["flags"]:
            assert keys <= set(flag), (name, flag)
            assert flag["short"] is None or len(flag["short"]) == 1
        # Short flags are unique within a daemon.
        shorts = [f["short"] for f in daemon["flags"] if f["short"]]
        assert len(shorts) == len(set(shorts)), name
