"""Build and import ``_bench``, the benchmarks' Cython loops (benches/_bench.pyx).

``_bench`` is benchmark-only code, so it is not one of the package's extensions
(setup.py never builds or installs it).  :func:`load` compiles it in place, beside
this file, the first time and whenever ``_bench.pyx`` or a ``.pxd``/header it uses is
newer than the built module, with the same optimised directives and flags as the
hot modules of setup.py, against the in-place build of ``virtio_queue``.  The build
runs in a child process (setuptools' ``build_ext --inplace``), so a failure shows
the compiler's output and stops the benchmarks.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# setup.py's DIRECTIVES for a non-debug build: the loops are measured as the package's
# hot modules run.
DIRECTIVES = {
    "language_level": 3,
    "embedsignature": True,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
}

_BUILD = """
import sys
from Cython.Build import cythonize
from setuptools import Extension, setup
root, here, directives, depends = sys.argv[1], sys.argv[2], eval(sys.argv[3]), sys.argv[4:]
ext = Extension("_bench", [here + "/_bench.pyx"], include_dirs=[root], depends=depends,
                extra_compile_args=["-O2", "-Wno-unused-function", "-Wno-unreachable-code"])
setup(script_args=["-q", "build_ext", "--inplace", "--build-temp", root + "/build/bench-temp"],
      ext_modules=cythonize([ext], compiler_directives=directives, include_path=[root], quiet=True))
"""


def _sources() -> list[Path]:
    vq = ROOT / "virtio_queue"
    return [HERE / "_bench.pyx", *vq.glob("*.pxd"), *vq.glob("includes/*"), vq / "_build_config.h"]


def _stale() -> bool:
    built = list(HERE.glob("_bench.*.so"))
    if not built:
        return True
    newest = max(p.stat().st_mtime for p in _sources() if p.exists())
    return built[0].stat().st_mtime < newest


def load() -> ModuleType:
    """The ``_bench`` module, built first if missing or stale.

    Raises:
        subprocess.CalledProcessError: the build failed (its output is on stderr).
    """
    if _stale():
        deps = [str(p) for p in _sources() if p.exists()]
        subprocess.run(
            [sys.executable, "-c", _BUILD, str(ROOT), str(HERE), repr(DIRECTIVES), *deps],
            cwd=HERE,
            check=True,
        )
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module("_bench")
