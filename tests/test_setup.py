"""The set-up a new user runs, in a clean clone, with Debian's own Python.

Debian's ``/usr/bin/python3`` is marked ``EXTERNALLY-MANAGED`` (PEP 668): ``pip
install`` refuses to touch it, so ``./run-tests`` and ``./run-demo`` make the
project's virtual environment with ``scripts/setup-venv``.  This test clones the
committed HEAD into a temporary directory, runs that set-up there with
``/usr/bin/python3`` and runs the console scripts it installed.  pip's own cache
(``~/.cache/pip``) is shared with the caller, so the packages are not downloaded
again; the extensions are built from scratch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = Path("/usr/bin/python3")

# Settings of the calling environment that would point the clone's set-up at this
# checkout's environment, build or sources.
_SCRUB = ("VENV", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "XEN", "VHD_DEBUG", "VHD_CFLAGS")


def _debian_python_unusable() -> str | None:
    """Why the set-up cannot be tried here, or None."""
    if not DEBIAN_PYTHON.exists():
        return f"{DEBIAN_PYTHON} is absent (not a Debian-like system)"
    if shutil.which("git") is None:
        return "git is not installed"
    probe = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", "import sys, ensurepip; sys.exit(sys.version_info < (3, 11))"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"{DEBIAN_PYTHON} is older than 3.11 or has no venv/ensurepip (python3-venv)"
    if not (REPO / ".git").exists():
        return "not a git checkout"
    return None


@pytest.mark.slow
def test_setup_venv_clean_clone_debian_python_installs_console_scripts(tmp_path: Path) -> None:
    reason = _debian_python_unusable()
    if reason is not None:
        pytest.skip(reason)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHON"] = str(DEBIAN_PYTHON)
    try:
        res = subprocess.run(
            [str(clone / "scripts" / "setup-venv")],
            cwd=clone,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=540,
        )
        assert res.returncode == 0, f"setup-venv failed:\n{res.stdout}\n{res.stderr}"
        venv = clone / ".venv"
        base = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sys; print(sys._base_executable)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # Made from Debian's interpreter, not from whatever ran pytest.
        assert Path(base).resolve() == DEBIAN_PYTHON.resolve()
        for script in ("vhost-device-rng", "vhost-device-template"):
            out = subprocess.run(
                [str(venv / "bin" / script), "--version"],
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith(f"{script} "), out.stdout
            assert "(xen=off debug=off)" in out.stdout
        # The installed package is the clone's, not this checkout's.
        where = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import vhost_backends; print(vhost_backends.__file__)"],
            cwd="/",
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert Path(where).resolve().is_relative_to(clone.resolve())
    finally:
        # The environment and build are large; do not leave them for pytest's
        # basetemp rotation.
        shutil.rmtree(clone, ignore_errors=True)
