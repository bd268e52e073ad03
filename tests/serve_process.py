"""Waiting for a `lorafleet serve` subprocess: its start-up log names the URL just before uvicorn
accepts, then /health answers 200."""
import re
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
