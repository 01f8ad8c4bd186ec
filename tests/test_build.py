"""The build: flags, the generated header, stale extensions, the unbuilt-tree guard."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import virtio_queue

ROOT = Path(virtio_queue.__file__).resolve().parent.parent


def _copy_sources(dst: Path, with_compiled: bool = False) -> None:
    """Copy what a build needs (sources only unless asked) into ``dst``."""
    shutil.copy2(ROOT / "setup.py", dst)
    shutil.copy2(ROOT / "pyproject.toml", dst)
    for pkg in ("virtio_queue", "virtio_devices", "vhost_backends", "xen"):
        ignore = shutil.ignore_patterns("*.so", "*.c", "*.html", "_build_config.h", "__pycache__")
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=None if with_compiled else ignore)


def _env(**flags: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XEN", "VHD_DEBUG", "VHD_CFLAGS")}
    env.update(flags)
    env["PYTHONPATH"] = ""
    return env


def _build(tree: Path, **flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace", "-j2"],
        cwd=tree, env=_env(**flags), capture_output=True, text=True, timeout=600, check=False,
    )


def _built_with_xen(tree: Path) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", "import virtio_queue; print(virtio_queue.BUILT_WITH_XEN)"],
        cwd=tree, env=_env(), capture_output=True, text=True, timeout=60, check=True,
    )
    return out.stdout.strip() == "True"


def test_built_with_xen_matches_generated_header() -> None:
    header = (ROOT / "virtio_queue" / "_build_config.h").read_text()
    assert f"#define VHD_XEN {int(virtio_queue.BUILT_WITH_XEN)}" in header
    assert f"#define VHD_DEBUG {int(virtio_queue.BUILT_WITH_DEBUG)}" in header


@pytest.mark.parametrize("flag", ["XEN", "VHD_DEBUG"])
@pytest.mark.parametrize("value", ["2", "yes", "on"])
def test_setup_bad_flag_value_exits_with_allowed_values(tmp_path: Path, flag: str, value: str) -> None:
    _copy_sources(tmp_path)
    res = _build(tmp_path, **{flag: value})
    assert res.returncode != 0
    assert f"{flag} must be 0 or 1" in res.stderr
    # Refused before anything was written.
    assert not (tmp_path / "virtio_queue" / "_build_config.h").exists()


def test_import_unbuilt_tree_says_how_to_build(tmp_path: Path) -> None:
    _copy_sources(tmp_path)
    # -S: no site-packages, so an editable install of the built tree (whose import
    # hook serves missing submodules from there) cannot mask the unbuilt copy.
    res = subprocess.run(
        [sys.executable, "-S", "-c", "import virtio_queue"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert res.returncode != 0
    assert "ImportError" in res.stderr
    assert "pip install -e ." in res.stderr
    # The compiled part of the daemon's event loop says the same.
    res = subprocess.run(
        [sys.executable, "-S", "-c", "import vhost_backends.event_loop"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert res.returncode != 0
    assert "pip install -e ." in res.stderr, res.stderr


@pytest.mark.slow
def test_flipping_xen_flag_rebuilds_and_same_flag_does_not(tmp_path: Path) -> None:
    _copy_sources(tmp_path)
    res = _build(tmp_path, XEN="0")
    assert res.returncode == 0, res.stderr
    assert "* build: xen=off debug=off *" in res.stderr
    assert not _built_with_xen(tmp_path)
    so = next((tmp_path / "virtio_queue").glob("memory*.so"))
    before = so.stat().st_mtime_ns

    res = _build(tmp_path, XEN="0")  # unchanged flags: nothing is rebuilt
    assert res.returncode == 0, res.stderr
    assert so.stat().st_mtime_ns == before

    res = _build(tmp_path, XEN="1")  # flipped: every extension is rebuilt, Xen ones added
    assert res.returncode == 0, res.stderr
    assert "* build: xen=on debug=off *" in res.stderr
    assert so.stat().st_mtime_ns != before
    assert _built_with_xen(tmp_path)
    assert list((tmp_path / "xen").glob("_foreign*.so"))
    assert list((tmp_path / "xen").glob("_grant*.so"))

    res = _build(tmp_path, XEN="0", VHD_DEBUG="1")  # the debug build, line tracing on
    assert res.returncode == 0, res.stderr
    assert "* build: xen=off debug=on *" in res.stderr
    out = subprocess.run(
        [sys.executable, "-c", "import virtio_queue as v; print(v.BUILT_WITH_XEN, v.BUILT_WITH_DEBUG)"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60, check=True,
    )
    assert out.stdout.split() == ["False", "True"]


def test_setup_ext_modules_lists_every_stubbed_extension() -> None:
    """run-tests' stubtest list comes from setup.py: every .pyx with a .pyi beside it
    (outside the Xen-only modules of a XEN=0 build) is listed, and nothing is built."""
    env = {k: v for k, v in os.environ.items() if k != "XEN"}
    out = subprocess.run(
        [sys.executable, "setup.py", "--ext-modules"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    listed = set(out.stdout.split())
    stubbed = {
        str(p.relative_to(ROOT).with_suffix("")).replace("/", ".")
        for p in ROOT.glob("*/**/*.pyx")
        if p.with_suffix(".pyi").exists() and p.relative_to(ROOT).parts[0] not in ("build", "xen")
    }
    assert stubbed <= listed
    assert out.stderr == ""  # no build banner: nothing was configured or built
