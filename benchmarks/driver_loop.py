"""The request loop of bench_generate.py's engine drivers (llamacpp_driver.py, hf_driver.py):
one JSON object per line on stdin, ``{"cmd": name, ...}`` calls ``runner.name(...)``, and its
answer goes back as one JSON line on stdout; an exception answers ``{"error": message}``.
Standard library only: it runs under llama-cpp-python's own Python too."""
from __future__ import annotations

import json
import sys


def serve(runner: object) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        try:
            ans = getattr(runner, cmd)(**msg)
        except Exception as e:   # answer instead of dying: the caller reports it
            ans = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(ans) + "\n")
        sys.stdout.flush()
