"""Man pages generated from the parsers, kept in docs/man (one generator for every daemon)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from vhost_backends.cli import manpage, vsock
from vhost_backends.cli import scsi as cli

DOCS = Path(__file__).resolve().parents[2] / "docs" / "man"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.1")), ids=lambda p: p.name)
def test_committed_man_page_is_generated_from_the_parser(page: Path) -> None:
    """docs/man/vhost-device-NAME.1 is what the generator makes now: regenerate it
    (python -m vhost_backends.cli.manpage vhost_backends.cli.NAME > docs/man/...) when
    a flag changes."""
    mod = importlib.import_module("vhost_backends.cli." + page.stem.removeprefix("vhost-device-"))
    assert page.read_text() == manpage.render(mod.build_parser(), mod.__doc__)


def test_vsock_man_page_has_the_vm_flags() -> None:
    page = manpage.render(vsock.build_parser(), vsock.__doc__)
    for flag in ("--guest-cid", "--uds-path", "--forward-listen", "--tx-buffer-size", "--vm", "--config"):
        assert f"\\fB{flag}\\fR" in page


def test_man_page_names_every_flag() -> None:
    page = manpage.render(cli.build_parser(), cli.__doc__)
    assert page.startswith(".TH VHOST-DEVICE-SCSI 1")
    for flag in (
        "\\fB-r\\fR, \\fB--read-only\\fR",
        "\\fB--solid-state\\fR",
        "\\fB-s\\fR, \\fB--socket-path\\fR",
    ):
        assert flag in page
    assert "\\fIIMAGES\\fR..." in page


def test_roff_escapes_leading_dots_and_backslashes() -> None:
    assert manpage._roff(".TH x\n'y\na\\b") == "\\&.TH x\n\\&'y\na\\eb"


def test_main_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert manpage.main([]) == 2
    assert manpage.main(["vhost_backends.cli.scsi"]) == 0
    assert capsys.readouterr().out.startswith(".TH")
