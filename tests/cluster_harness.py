"""A disaggregated cluster for integration tests: ``kvbridge serve`` as a child process.

    with Cluster(tmp_path, CONFIG) as c:           # etcd + nats-server + workers + frontend
        c.url                                      # the frontend
        c.workers                                  # {"prefill-0": "http://127.0.0.1:...", ...}
        c.pids                                     # every process the cluster started, by name
        c.wait_pools_full()

Given ``services`` (a started LocalServices), the cluster uses those endpoints (the test can
stop and restart them); without, `kvbridge serve` starts its own (the `make run` path).
Everything is stopped by its own pid: SIGINT to `kvbridge serve` (which stops its children in
order), then SIGKILL for any process the log names that is still alive.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kvbridge.cluster.services import free_port

JOINED = re.compile(r"worker (\S+) \((\w+)\) at (http://\S+) joined")
STARTED = re.compile(r"(\S+) started: pid (\d+)")
READY = re.compile(r"kvbridge frontend on (http://\S+),")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(cond, timeout: float, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


class Cluster:
    def __init__(self, workdir: Path, config_yaml: str, *, prefill: int = 1, decode: int = 1, services=None) -> None:
        self.workdir = Path(workdir)
        self.config = self.workdir / "cluster.yaml"
        self.config.write_text(config_yaml)
        self.log_path = self.workdir / "serve.log"
        self.prefill, self.decode, self.services = prefill, decode, services
        self.proc: subprocess.Popen | None = None
        self.url = ""

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = 150.0) -> Cluster:
        argv = [sys.executable, "-m", "kvbridge.cli", "serve", "--config", str(self.config), "--port", str(free_port()),
                "--prefill-workers", str(self.prefill), "--decode-workers", str(self.decode)]  # fmt: skip
        if self.services is not None:
            argv += ["--etcd", self.services.etcd_endpoint, "--nats", self.services.nats_endpoint]
        env = {**os.environ, "UCX_NET_DEVICES": "lo"}
        env.pop("KVBRIDGE_ETCD", None)
        env.pop("KVBRIDGE_NATS", None)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ok = wait_until(lambda: READY.search(self.log()) or self.proc.poll() is not None, timeout, 0.25)
        m = READY.search(self.log())
        if not ok or m is None:
            self.stop()
            raise AssertionError(f"the cluster did not start:\n{self.log()[-4000:]}")
        self.url = m.group(1)
        assert wait_until(self._healthy, 30), self.log()[-4000:]
        return self

    def stop(self) -> None:
        pids = list(self.pids.values())
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in pids:  # whatever the cluster did not stop itself
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ what it says
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pids(self) -> dict[str, int]:
        return {name: int(pid) for name, pid in STARTED.findall(self.log())}

    @property
    def workers(self) -> dict[str, str]:
        return {wid: url for wid, _, url in JOINED.findall(self.log())}

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5, trust_env=False).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                got = key[len(name) :].strip("{}")
                if ",".join(sorted(got.split(","))) == want or (not want and not got):
                    return float(value)
        return 0.0

    def stats(self, worker_id: str) -> dict:
        return httpx.get(f"{self.workers[worker_id]}/internal/stats", timeout=5, trust_env=False).json()

    def pools_full(self, worker_ids=None) -> bool:
        for wid in worker_ids or self.workers:
            s = self.stats(wid)
            if s["num_free_blocks"] != s["num_blocks"] or s["transfers_busy"] or s["num_held"] or s["num_remote"]:
                return False
        return True

    def wait_pools_full(self, worker_ids=None, timeout: float = 30.0) -> None:
        ok = wait_until(lambda: self.pools_full(worker_ids), timeout, 0.2)
        assert ok, {w: self.stats(w) for w in (worker_ids or self.workers)}
