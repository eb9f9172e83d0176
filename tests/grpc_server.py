"""Test helper: real `kv-server` processes on port 0 (or a given port, for restarts).

    with KVServerProcess("--capacity", "64MiB") as server:
        tier = GrpcTier([server.address])
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading

from kvtier.kvstore.service.server.main import LISTENING

_PORT_LINE = re.compile(re.escape(LISTENING) + r" (\S+):(\d+)")
START_TIMEOUT_S = 60.0


class KVServerProcess:
    command = [sys.executable, "-m", "kvtier.kvstore.service.server.main"]

    def __init__(self, *args: str, host: str = "127.0.0.1", port: int = 0):
        self.args = list(args)
        self.host = host
        self.port = port
        self.proc: subprocess.Popen | None = None
        self._stderr = None
        self._lines: queue.Queue = queue.Queue()
        self.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        """Start (again, on the same port once one was bound) and wait for the port line."""
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._lines = queue.Queue()
        cmd = [*self.command, "--listen", f"{self.host}:{self.port}", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._pump, args=(self.proc, self._lines), daemon=True).start()
        while True:
            try:
                line = self._lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                self.kill()
                raise RuntimeError(f"kv-server did not start within {START_TIMEOUT_S}s: {self.stderr()}")
            if line is None:
                raise RuntimeError(f"kv-server exited with {self.proc.wait()}: {self.stderr()}")
            match = _PORT_LINE.search(line)
            if match:
                self.port = int(match.group(2))
                return

    @staticmethod
    def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def output(self) -> str:
        """stdout lines printed since the port line (e.g. the shutdown message)."""
        out = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return "".join(out)
            if line is not None:
                out.append(line)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain) and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "KVServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
