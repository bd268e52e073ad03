"""A `lorafleet serve` subprocess, and waiting for it: its start-up log names the URL just before
uvicorn accepts, then /health answers 200."""
import contextlib
import os
import re
import subprocess
import sys
import time

import httpx

LISTENING = re.compile(r"listening (http://127\.0\.0\.1:\d+)/v1")


def wait_until_serving(proc, log_path, timeout_s: float, poll_s: float = 0.1) -> str:
    """The server's base URL once /health is 200; fails (with the log) if the process exits or
    `timeout_s` passes first."""
    deadline, url = time.monotonic() + timeout_s, None
    while url is None:
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        found = LISTENING.search(log_path.read_text())
        url = found and found.group(1)
        time.sleep(poll_s)
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return url
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(poll_s)


@contextlib.contextmanager
def serve_subprocess(flags: list[str], log_path, timeout_s: float, env: dict | None = None,
                     poll_s: float = 0.1):
    """`python -m lorafleet.cli serve FLAGS` (OMP_NUM_THREADS=1, plus `env`) with its output in
    log_path; yields the process, carrying .url and .log_path, once it serves; killed on exit
    when still running."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "serve", *flags],
                                stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        try:
            proc.url = wait_until_serving(proc, log_path, timeout_s, poll_s)
            proc.log_path = log_path
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
