"""A daemon under test in a subprocess, its stderr watched for log lines.

A module of its own (not conftest.py) so that test modules import it by a unique
name: several test directories have a conftest.py.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


class DaemonProcess:
    """``python echo_device.py SOCKET`` (or ``command``, whose socket is
    ``socket_path``) with its stderr watched for log lines."""

    def __init__(
        self, socket_path: str, command: list[str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        """``env``: variables set for the daemon (over RUST_LOG=info and the path)."""
        self.socket_path = socket_path
        path = os.pathsep.join([str(ROOT), str(HERE)])
        env = {**os.environ, "RUST_LOG": "info", "PYTHONPATH": path, **(env or {})}
        self.proc = subprocess.Popen(
            command or [sys.executable, str(HERE / "echo_device.py"), socket_path],
            stderr=subprocess.PIPE,
            env=env,
        )
        self.log: list[str] = []
        self.pos = 0  # lines before this one were matched by an earlier wait_for
        self._buf = b""

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        """Read stderr until a line containing ``text`` (poll with a timeout, no sleep)."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        p = select.poll()
        p.register(fd, select.POLLIN)
        while True:
            for i in range(self.pos, len(self.log)):
                if text in self.log[i]:
                    self.pos = i + 1
                    return self.log[i]
            if not p.poll(int(timeout * 1000)):
                raise TimeoutError(f"daemon did not log {text!r}; log so far: {self.log[-5:]}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(
                    f"daemon exited (rc {self.proc.wait()}) before logging {text!r}: {self.log[-5:]}"
                )
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            self.log.extend(line.decode(errors="replace") for line in lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return rc
