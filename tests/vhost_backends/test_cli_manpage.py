"""Man pages generated from the parsers (issue 17: vhost-device-scsi's, kept in docs/man)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhost_backends.cli import manpage
from vhost_backends.cli import scsi as cli

DOCS = Path(__file__).resolve().parents[2] / "docs" / "man"


def test_scsi_man_page_is_generated_from_the_parser() -> None:
    """docs/man/vhost-device-scsi.1 is what the generator makes now: regenerate it
    (python -m vhost_backends.cli.manpage vhost_backends.cli.scsi) when a flag changes."""
    page = manpage.render(cli.build_parser(), cli.__doc__)
    assert (DOCS / "vhost-device-scsi.1").read_text() == page


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
