"""Processes: a worker, the frontend, and the one-command local cluster.

    run_worker(cfg, role, ...)      `kvbridge worker`: serve until SIGINT/SIGTERM
    run_frontend(cfg, sock)         `kvbridge serve --etcd URL --nats URL`: the frontend only
    run_local_cluster(cfg, sock)    `kvbridge serve`: etcd + nats-server (unless endpoints are
                                    configured), N prefill + M decode worker processes, then
                                    the frontend; every child is stopped by its own pid on exit

Children are started with PR_SET_PDEATHSIG (a parent killed with SIGKILL takes them along) and
in their own session (Ctrl-C reaches only the parent, which stops them in order: terminate,
wait, kill). Prefill and decode workers are pinned to disjoint CPU cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import uvicorn

from kvbridge.cluster.messages import WorkerRole
from kvbridge.cluster.services import stop_process
from kvbridge.config import Config

log = logging.getLogger("kvbridge.launch")

WORKER_START_TIMEOUT_S = 300.0


class LaunchError(RuntimeError):
    """A child did not come up; the message says which and where its log is."""


class _Server(uvicorn.Server):
    """uvicorn that stops on SIGINT/SIGTERM without re-raising them afterwards, so the caller
    cleans up in order once ``serve()`` returns."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        if threading_is_main():
            saved = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in saved.items():
                    signal.signal(s, h)
        else:
            yield


def threading_is_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def term_as_exit() -> None:
    """SIGTERM outside serve() (while loading, while waiting for workers) unwinds like Ctrl-C."""

    def _exit(signum, _frame):
        raise SystemExit(128 + signum)

    if threading_is_main():
        signal.signal(signal.SIGTERM, _exit)


def _serve_config(app, cfg: Config) -> uvicorn.Config:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per internal call
    return uvicorn.Config(app, log_level=cfg.server.log_level, lifespan="off", timeout_graceful_shutdown=5)


# --------------------------------------------------------------------------- worker


def run_worker(cfg: Config, role: WorkerRole, worker_id: str, sock: socket.socket, cpus: list[int] | None = None) -> int:
    term_as_exit()
    if cpus:
        os.sched_setaffinity(0, cpus)
    from kvbridge.serving.worker import Worker

    host = sock.getsockname()[0]
    worker = Worker(cfg, role, worker_id, host=host)
    return asyncio.run(_worker_main(worker, cfg, sock))


async def _worker_main(worker, cfg: Config, sock: socket.socket) -> int:
    from kvbridge.cluster.discovery import Registration
    from kvbridge.cluster.events import EventBus, KVEventPublisher, LoadPublisher
    from kvbridge.serving.worker import advertised_host

    host, port = sock.getsockname()[:2]
    endpoint = f"http://{advertised_host(host)}:{port}"
    c = cfg.cluster
    reg = Registration(c.etcd_endpoint, worker.info(endpoint), c.namespace) if c.etcd else None
    bus = EventBus(c.nats, c.namespace, name=f"kvbridge-{worker.worker_id}") if c.nats else None
    kvpub = loadpub = None
    if bus is not None:
        await bus.start()
        kvpub = KVEventPublisher(bus, worker.worker_id, snapshot=worker.engine.block_pool.cached_hashes)
        worker.engine.block_pool.on_event = kvpub.on_block_event  # runs on the engine thread: thread-safe
        loadpub = LoadPublisher(bus, worker.load_report, interval_s=0.5)
    worker.ae.start()
    server = _Server(_serve_config(worker.app, cfg))

    async def register_when_listening() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        log.info(
            "worker %s (%s) serving on %s, KV bootstrap %s, fingerprint %s",
            worker.worker_id, worker.role.value, endpoint, worker.bootstrap_address or "-", worker.fingerprint,
        )  # fmt: skip
        if reg is not None:
            await reg.start()

    registering = asyncio.ensure_future(register_when_listening())
    try:
        await server.serve(sockets=[sock])
    finally:
        registering.cancel()
        if reg is not None:
            await reg.stop()  # revoke: the frontend stops routing here at once
        for p in (loadpub, kvpub):
            if p is not None:
                await p.close()
        if bus is not None:
            await bus.close()
        await worker.close()
    return 0


# --------------------------------------------------------------------------- frontend


def load_tokenizer(cfg: Config) -> tuple[object, int]:
    """The frontend's tokenizer and the model's context length (no weights), before anything
    starts: a bad model path fails here, in one line."""
    from kvbridge.engine.tokenizer import Tokenizer
    from kvbridge.serving.frontend import model_context_length

    try:
        return Tokenizer.load(cfg.engine.model), cfg.engine.max_model_len or model_context_length(cfg.engine.model)
    except (OSError, ValueError, KeyError) as e:
        raise LaunchError(f"cannot load the model {cfg.engine.model}: {type(e).__name__}: {e}") from None


async def _frontend_main(cfg: Config, sock: socket.socket, tokenizer: tuple[object, int],
                         ready: Callable[..., object] | None = None) -> int:  # fmt: skip
    from kvbridge.serving.api import build_app
    from kvbridge.serving.frontend import ClusterEngine

    engine = ClusterEngine(cfg, tokenizer=tokenizer[0], max_model_len=tokenizer[1])
    await engine.astart()
    try:
        if ready is not None:
            await ready(engine)  # type: ignore[misc]
        elif not await engine.watcher.wait_synced(10.0):
            log.warning("etcd at %s not reachable yet; serving, workers appear once it is", cfg.cluster.etcd)
        app = build_app(engine, cfg)  # type: ignore[arg-type]
        engine.attach_metrics(app.state.metrics.registry)
        host, port = sock.getsockname()[:2]
        workers = ", ".join(f"{w.worker_id} ({w.role.value})" for w in engine.watcher.workers.values()) or "none yet"
        log.info("kvbridge frontend on http://%s:%d, policy %s, workers: %s", host, port, cfg.cluster.policy, workers)
        await _Server(_serve_config(app, cfg)).serve(sockets=[sock])
    finally:
        await engine.aclose()
    return 0


def run_frontend(cfg: Config, sock: socket.socket) -> int:
    term_as_exit()
    tokenizer = load_tokenizer(cfg)
    return asyncio.run(_frontend_main(cfg, sock, tokenizer))


# --------------------------------------------------------------------------- local cluster


def _pdeathsig() -> None:  # in the child, between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WorkerProcess:
    """One ``kvbridge worker`` child; its output goes to ``log_path``."""

    def __init__(self, worker_id: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.worker_id, self.argv, self.env, self.log_path = worker_id, argv, env, log_path
        self.proc: subprocess.Popen | None = None
        self._terminated = False  # SIGTERM sent: the worker is shutting down

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=_pdeathsig, start_new_session=True,
            )  # fmt: skip
        log.info("%s started: pid %d, log %s", self.worker_id, self.proc.pid, self.log_path)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def terminate(self) -> None:
        """Ask the worker to shut down (SIGTERM, once), without waiting for it."""
        if self.proc is not None and not self._terminated and self.proc.poll() is None:
            self.proc.terminate()
            self._terminated = True

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the worker unless that was done already, wait, kill it after ``timeout``.
        One SIGTERM only: a second one that lands while the worker exits (Python has given
        its signals back to the default action by then) ended it with -15 instead of 0."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process(proc, self.worker_id, timeout, terminate=not self._terminated)
        log.info("%s stopped (pid %d, exit code %s)", self.worker_id, proc.pid, proc.returncode)


def stop_workers(procs: list[WorkerProcess], timeout: float = 10.0) -> None:
    """Terminate every worker first, then wait for each: they shut down in parallel."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.stop(timeout)


def plan_cpus(
    num_prefill: int, num_decode: int, cores: list[int] | None = None, prefill_on_all_cores: bool | None = False
) -> dict[str, list[int] | None]:
    """Worker id → the cores it may use (None: any). Prefill and decode workers never share a
    core (with one core there is nothing to split: no pinning), unless ``prefill_on_all_cores``
    (None: when there are fewer than 4 cores): then prefill workers may use any core and the
    decode workers keep the last ones."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    ids = [f"prefill-{i}" for i in range(num_prefill)] + [f"decode-{i}" for i in range(num_decode)]
    if len(cores) < 2 or not num_prefill:
        return dict.fromkeys(ids, None)
    if prefill_on_all_cores is None:
        prefill_on_all_cores = len(cores) < 4
    k = min(len(cores) - 1, max(1, round(len(cores) * num_prefill / (num_prefill + num_decode))))
    groups = {"prefill": cores[:k], "decode": cores[k:]}
    plan: dict[str, list[int] | None] = {}
    for role, n in (("prefill", num_prefill), ("decode", num_decode)):
        group = groups[role]
        for i in range(n):
            share = group[i::n] if n <= len(group) else [group[i % len(group)]]
            plan[f"{role}-{i}"] = None if role == "prefill" and prefill_on_all_cores else share
    return plan


# libgomp's spin after a parallel region, for a worker that shares its cores: ~1000 pause loops,
# tens of µs, enough to catch the next region of a prompt without a futex wake-up, too short to
# take much of a busy neighbour's CPU (docs/tuning.md has the measurements)
SHARED_CORE_SPINCOUNT = "1000"


def worker_env(env: dict[str, str], shares_cores: bool) -> dict[str, str]:
    """A worker that shares its cores with other workers spins only briefly at OpenMP barriers:
    libgomp's default spins up to a few ms after each parallel region, and on cores shared
    with the decode worker that spinning took the decode worker's CPU (2 cores: chat
    requests/s 1.3-1.5 passive, 0.9 spinning); not spinning at all costs a wake-up per region
    (2048-token TTFT 2.8-3.1 s, against 2.6-2.7 s with the short spin). OMP_WAIT_POLICY=PASSIVE
    covers OpenMP runtimes other than libgomp. A worker with cores of its own keeps the
    default. OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user wins."""
    if not shares_cores or "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return env
    return {**env, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": SHARED_CORE_SPINCOUNT}


def worker_argv(cfg_path: str, role: str, worker_id: str, etcd: str, nats: str, cfg: Config,
                cpus: list[int] | None, extra: list[str]) -> list[str]:  # fmt: skip
    argv = [sys.executable, "-m", "kvbridge.cli", "worker", "--role", role, "--worker-id", worker_id,
            "--etcd", etcd, "--nats", nats, "--namespace", cfg.cluster.namespace, "--host", "127.0.0.1", "--port", "0",
            "--log-level", cfg.server.log_level]  # fmt: skip
    if cfg_path:
        argv += ["--config", cfg_path]
    if cpus:
        argv += ["--cpus", ",".join(map(str, cpus))]
    if not cfg.cache_transceiver_config.enabled:
        argv += ["--kv-backend", "DEFAULT"]
    return argv + extra


def run_local_cluster(cfg: Config, sock: socket.socket, cfg_path: str, extra: list[str]) -> int:
    """``extra``: engine flags for the workers, as given to ``kvbridge serve``."""
    from kvbridge.cluster.services import LocalServices

    term_as_exit()
    tokenizer = load_tokenizer(cfg)
    c = cfg.cluster
    services: LocalServices | None = None
    procs: list[WorkerProcess] = []
    logs = Path(tempfile.mkdtemp(prefix="kvbridge-workers-"))
    keep_logs = False
    try:
        if c.local:
            services = LocalServices()
            services.start()
            etcd, nats = services.etcd_endpoint, services.nats_endpoint
            log.info("local control plane: etcd %s, NATS %s", etcd, nats)
        else:
            etcd, nats = c.etcd, c.nats
        cfg = replace(cfg, cluster=replace(c, etcd=etcd, nats=nats))
        env = dict(os.environ)
        env.setdefault("UCX_NET_DEVICES", "lo")
        plan = plan_cpus(c.num_prefill_workers, c.num_decode_workers, prefill_on_all_cores=c.prefill_on_all_cores)
        for wid, cpus in plan.items():
            role = wid.split("-")[0]
            w_extra = list(extra)
            w_env = worker_env(env, shares_cores=cpus is None and len(plan) > 1)
            threads = c.worker_threads or len(cpus or os.sched_getaffinity(0))
            if role == "prefill" and cpus is None:  # prefill on every core
                threads = len(os.sched_getaffinity(0))
            if not cfg.engine.num_threads and "--num-threads" not in extra:  # not set by the user: per worker
                w_extra += ["--num-threads", str(threads)]
            p = WorkerProcess(wid, worker_argv(cfg_path, role, wid, etcd, nats, cfg, cpus, w_extra), w_env, logs / f"{wid}.log")
            procs.append(p)
            p.start()
        log.info("worker logs in %s; cores: %s", logs, ", ".join(f"{w}={v or 'any'}" for w, v in plan.items()))

        async def ready(engine) -> None:
            await _wait_workers(engine, procs)

        return asyncio.run(_frontend_main(cfg, sock, tokenizer, ready))
    except LaunchError:
        keep_logs = True  # the message points at them
        raise
    finally:
        stop_workers(procs)
        if services is not None:
            services.cleanup()
        if not keep_logs:
            shutil.rmtree(logs, ignore_errors=True)


async def _wait_workers(engine, procs: list[WorkerProcess]) -> None:
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    want = {p.worker_id for p in procs}
    while True:
        for p in procs:
            code = p.exited()
            if code is not None:
                raise LaunchError(f"{p.worker_id} exited with code {code} while starting; its log {p.log_path} ends:\n{p.tail()}")
        if want <= set(engine.watcher.workers):
            return
        if time.monotonic() > deadline:
            missing = ", ".join(sorted(want - set(engine.watcher.workers)))
            raise LaunchError(f"{missing} not registered after {WORKER_START_TIMEOUT_S:.0f} s; see the logs in {procs[0].log_path.parent}")
        await asyncio.sleep(0.2)
