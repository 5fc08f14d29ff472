"""A Python process with TRITON_INTERPRET=1 that runs interpreted kernel checks, one script at a time,
kept for the life of the test process that started it.

triton.jit decides at import time whether a kernel is compiled or interpreted, so the checks cannot
run in the test process itself. A fresh process per check would import torch, Triton and the case
modules each time (about 3 s of CPU), more than most checks take. Each script here runs in its own
namespace holding the case modules' names, with torch's global generator reset to the seed a fresh
process starts with, so a script sees what it would see alone; a failure comes back as the
script's traceback and its output.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]

SERVER = r"""
import contextlib, io, json, sys, traceback
replies = sys.stdout
import torch
import tests.engine.kernels.interpreter_compat
names = {}
exec("from tests.engine.kernels.fused_cases import *\nfrom tests.engine.kernels.attention_cases import *", names)
seed = torch.initial_seed()
for line in sys.stdin:
    output = io.StringIO()
    torch.manual_seed(seed)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            exec(json.loads(line), dict(names))
        reply = {"ok": True}
    except BaseException:
        reply = {"ok": False, "error": traceback.format_exc(), "output": output.getvalue()[-6000:]}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()
"""

_process: subprocess.Popen | None = None
_stderr = None


def run_interpreted(cases: str, timeout_s: float = 300.0) -> None:
    """Runs `cases` (Python, indented or not) under the interpreter; fails the test if it raises."""
    process = _interpreter()
    process.stdin.write(json.dumps(textwrap.dedent(cases)) + "\n")
    process.stdin.flush()
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    line = process.stdout.readline() if ready else ""
    if not line:
        why = "did not answer in time" if not ready else "exited"
        _stop()
        raise AssertionError(f"the interpreter process {why}:\n{_stderr_tail()}")
    reply = json.loads(line)
    assert reply["ok"], f"interpreted kernel check failed:\n{reply['output']}\n{reply['error']}"


def _interpreter() -> subprocess.Popen:
    global _process, _stderr
    if _process is not None and _process.poll() is None:
        return _process
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("PORTER_FORCE_REFERENCE", None)
    _stderr = tempfile.TemporaryFile()  # what the process writes outside a script: why it died
    _process = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=_stderr,
        text=True,
    )
    return _process


def _stderr_tail() -> str:
    if _stderr is None:
        return ""
    _stderr.seek(0)
    return _stderr.read().decode(errors="replace")[-6000:]


@atexit.register
def _stop() -> None:
    global _process
    if _process is None:
        return
    try:
        _process.stdin.close()
        _process.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        _process.kill()
        _process.wait()
    _process = None
