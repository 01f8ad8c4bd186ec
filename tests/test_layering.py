"""Imports only go down the layers (DESIGN.md "Layers", STYLE.md §1).

``virtio_queue`` imports neither ``virtio_devices`` nor ``vhost_backends``, and
``virtio_devices`` does not import ``vhost_backends``.  Python sources (``.py``,
``.pyi``) are read with :mod:`ast` (every ``import``/``from ... import``, relative ones
resolved, and ``importlib.import_module("...")`` / ``__import__("...")`` with a
literal name); Cython sources (``.pyx``, ``.pxd``, ``.pxi``) with a line scanner for
``import``/``cimport`` statements.  Nothing is imported, so the check works on an
unbuilt tree.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package -> the packages it must never import.
FORBIDDEN = {
    "virtio_queue": {"virtio_devices", "vhost_backends"},
    "virtio_devices": {"vhost_backends"},
    # xen plugs into virtio_queue (STYLE.md §1): the layouts it shares with the wire
    # format live there (virtio_queue/layouts.pxd), not in vhost_backends.
    "xen": {"virtio_devices", "vhost_backends"},
}

#: Test-only modules that production code must not load (issue 12: the front-end
#: imports only the mock driver, virtio_queue.mock).
TEST_ONLY = {"virtio_queue.testing", "virtio_queue.reference"}

_CY_FROM = re.compile(r"^\s*from\s+(\.*[\w.]*)\s+c?import\b")
_CY_IMPORT = re.compile(r"^\s*c?import\s+(.+)$")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """Absolute dotted name of a (possibly relative) import made by ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of_python(source: str, importer: str, is_package: bool) -> set[str]:
    """Every module name a Python source imports (statically visible)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, importer, is_package)
            out.add(base)
            if node.module is None:  # "from . import x": x may be a module
                out.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                out.add(node.args[0].value)
    return out


def imports_of_cython(source: str, importer: str, is_package: bool) -> set[str]:
    """Every module name a Cython source imports or cimports."""
    out: set[str] = set()
    for raw in source.splitlines():
        line = raw.split("#", 1)[0]
        m = _CY_FROM.match(line)
        if m:
            spec = m.group(1)
            level = len(spec) - len(spec.lstrip("."))
            out.add(_resolve(spec.lstrip(".") or None, level, importer, is_package))
            continue
        m = _CY_IMPORT.match(line)
        if m:
            for item in m.group(1).split(","):
                name = item.strip().split(" as ")[0].strip()
                if name:
                    out.add(name)
    return out


def imports_of(path: Path) -> set[str]:
    source = path.read_text(encoding="utf-8")
    importer = _module_name(path)
    is_package = path.stem == "__init__"
    if path.suffix in (".py", ".pyi"):
        return imports_of_python(source, importer, is_package)
    return imports_of_cython(source, importer, is_package)


def sources(package: str) -> list[Path]:
    base = ROOT / package
    return sorted(
        p
        for ext in ("py", "pyi", "pyx", "pxd", "pxi")
        for p in base.rglob(f"*.{ext}")
        if "build" not in p.relative_to(ROOT).parts
    )


def violations(package: str) -> list[str]:
    bad = []
    for path in sources(package):
        for name in sorted(imports_of(path)):
            top = name.split(".", 1)[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering_package_imports_only_lower_layers(package: str) -> None:
    """DESIGN.md: imports go down only (virtio_queue <- virtio_devices <- vhost_backends)."""
    if not (ROOT / package).is_dir():
        pytest.skip(f"{package} does not exist yet")
    assert sources(package), f"no sources found under {package}"
    assert violations(package) == []


def test_layering_production_code_loads_no_test_helpers() -> None:
    """The daemons, the CLIs and the front-end load the mock driver at most, never the
    reference model or the test helpers (issue 12; checked in a fresh interpreter,
    because the front-end's MockSplitQueue reaches the model only when a test asks)."""
    code = (
        "import sys, vhost_backends.frontend, vhost_backends.daemon, vhost_backends.cli.rng, "
        "vhost_backends.cli.template, virtio_devices.rng\n"
        f"print(sorted(m for m in sys.modules if m in {sorted(TEST_ONLY)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_layering_checker_sees_python_imports() -> None:
    src = """
import os
import vhost_backends.protocol as p
from vhost_backends import handler
from ..vhost_backends.daemon import run
from . import sibling
import importlib
importlib.import_module("vhost_backends.cli")
def f():
    from virtio_devices import rng   # imports inside functions count too
"""
    found = imports_of_python(src, "virtio_queue.memory", is_package=False)
    assert {
        "os",
        "vhost_backends.protocol",
        "vhost_backends",
        "vhost_backends.daemon",
        "virtio_queue.sibling",
        "vhost_backends.cli",
        "virtio_devices",
    } <= found


def test_layering_checker_sees_cython_cimports() -> None:
    src = """
# cython: language_level=3
from libc.stdint cimport uint16_t
from vhost_backends.protocol.messages cimport VhostUserMsg
cimport virtio_devices.fast as fast, cython
from .memory cimport GuestMemory
import vhost_backends  # a comment: from virtio_devices import nothing
"""
    found = imports_of_cython(src, "virtio_queue.chain", is_package=False)
    assert {
        "libc.stdint",
        "vhost_backends.protocol.messages",
        "virtio_devices.fast",
        "cython",
        "virtio_queue.memory",
        "vhost_backends",
    } <= found
    assert "virtio_devices" not in found
