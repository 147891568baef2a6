"""How the local cluster stops its workers: one SIGTERM each, in parallel; a kill after the timeout."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from kvbridge.serving.launch import WorkerProcess, stop_workers

# A stand-in worker: notes every SIGTERM, takes ``shutdown_s`` to shut down after the first
# (a real worker closes its server, transceiver and registrations), then exits 0; with
# ``ignore`` it notes SIGTERM and carries on.
CHILD = """
import signal, sys, time
notes, shutdown_s, ignore = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
terms = []
def note(what):
    with open(notes, "a") as f:
        f.write(f"{what} {time.monotonic()}\\n")  # CLOCK_MONOTONIC: one clock for every process
def on_term(signum, frame):
    terms.append(time.monotonic())
    note("TERM")
signal.signal(signal.SIGTERM, on_term)
note("READY")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if terms and not ignore and time.monotonic() - terms[0] > shutdown_s:
        note("EXIT")
        sys.exit(0)
    time.sleep(0.01)
sys.exit(3)
"""


def start(tmp_path: Path, name: str, shutdown_s: float, ignore: bool = False) -> tuple[WorkerProcess, Path]:
    notes = tmp_path / f"{name}.notes"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    w = WorkerProcess(name, [sys.executable, str(script), str(notes), str(shutdown_s), "1" if ignore else "0"], {}, tmp_path / f"{name}.log")
    w.start()
    deadline = time.monotonic() + 20
    while "READY" not in (notes.read_text() if notes.exists() else ""):
        assert time.monotonic() < deadline, "child did not start"
        assert w.exited() is None, w.tail()
        time.sleep(0.01)
    return w, notes


@pytest.fixture
def workers():
    started: list[WorkerProcess] = []
    yield started
    for w in started:  # a failed test still leaves nothing running
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)


def test_each_worker_gets_one_sigterm_and_exits_cleanly(tmp_path, workers):
    """Two workers that take 0.3 and 0.8 s to shut down: both are asked at once, each exactly
    once, and both exit 0. (The second used to get another SIGTERM once the first had
    stopped; landing while a worker's Python exited, it ended the worker with -15.)"""
    pairs = [start(tmp_path, f"w{i}", shutdown_s=s) for i, s in enumerate((0.3, 0.8))]
    workers.extend(w for w, _ in pairs)
    procs = [w.proc for w, _ in pairs]
    stop_workers([w for w, _ in pairs], timeout=20)
    assert [p.returncode for p in procs] == [0, 0]
    notes = [dict(line.split() for line in n.read_text().splitlines()) for _, n in pairs]
    for _, n in pairs:
        assert n.read_text().count("TERM") == 1
    # in parallel: the second was asked before the first had finished, not after
    assert float(notes[1]["TERM"]) < float(notes[0]["EXIT"])


def test_a_worker_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path, workers):
    w, notes = start(tmp_path, "stuck", shutdown_s=0, ignore=True)
    workers.append(w)
    proc = w.proc
    stop_workers([w], timeout=0.5)
    assert proc.returncode == -9
    assert notes.read_text().count("TERM") == 1
