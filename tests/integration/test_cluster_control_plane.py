"""The control plane against real etcd and nats-server (started from the installed packages on
127.0.0.1, stopped by pid in finalizers, even when a test fails)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kvbridge.cluster.discovery import Registration, WorkerWatcher
from kvbridge.cluster.events import EventBus, KVEventPublisher, KVIndex, LoadView
from kvbridge.cluster.messages import LoadReport, WorkerInfo, WorkerRole
from kvbridge.cluster.services import EtcdServer, LocalServices, NatsServer, free_port
from kvbridge.engine.block_pool import prefix_hashes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

TTL = 2  # short leases for tests
REPO = Path(__file__).resolve().parents[2]


def _info(worker_id: str, role: WorkerRole = WorkerRole.PREFILL, port: int = 8101) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        role=role,
        endpoint=f"http://127.0.0.1:{port}",
        model="SmolLM2-135M-Instruct",
        kv_fingerprint="fp",
        transfer_address="127.0.0.1:5600",
    )


def _alive(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.fixture
def etcd():
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()  # stops by pid


@pytest.fixture
def nats_server():
    server = NatsServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


# ---------------------------------------------------------------------------- services


def test_services_start_stop_restart_leave_no_child(tmp_path):
    svc = LocalServices(tmp_path / "svc")
    pids: list[int] = []
    try:
        svc.start()
        pids += svc.pids
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        assert svc.etcd_endpoint.startswith("http://127.0.0.1:") and svc.nats_endpoint.startswith("nats://127.0.0.1:")
        old = svc.etcd.pid
        svc.etcd.restart()
        svc.nats.restart()
        pids += svc.pids
        assert svc.etcd.pid != old and not _alive(old)
        assert (tmp_path / "svc" / "etcd" / "etcd.log").stat().st_size > 0  # children log to files
    finally:
        svc.cleanup()
    assert _wait_dead(pids) == []
    assert svc.pids == []


@pytest.mark.parametrize("how", ["exit", "sigterm", "sigkill"])
def test_children_are_stopped_when_the_parent_exits(how):
    """Normal exit and SIGTERM: atexit stops them (and removes the temporary folder); SIGKILL:
    PR_SET_PDEATHSIG does (here with the services started from a worker thread)."""
    script = textwrap.dedent(
        """
        import sys, threading, time
        from kvbridge.cluster.services import LocalServices
        svc = LocalServices()
        if sys.argv[1] == "sigkill":
            t = threading.Thread(target=svc.start)
            t.start()
            t.join()
        else:
            svc.start()
        print(svc.workdir, *svc.pids, flush=True)
        if sys.argv[1] != "exit":
            time.sleep(30)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, how], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pids: list[int] = []
    workdir = ""
    try:
        workdir, *rest = proc.stdout.readline().split()
        pids = [int(p) for p in rest]
        assert len(pids) == 2, proc.stderr.read()
        if how != "exit":
            assert all(_alive(p) for p in pids)
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        proc.wait(15)
        assert _wait_dead(pids) == []
        if how != "sigkill":
            assert not Path(workdir).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:  # never leave them behind, even when the test fails (by pid, ours)
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if workdir.startswith(tempfile.gettempdir()):
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------- discovery


def test_registration_is_seen_by_a_watcher_and_leaves_on_revoke(etcd):
    async def main():
        added, removed = [], []
        watcher = WorkerWatcher(etcd.endpoint, "t1", on_add=added.append, on_remove=removed.append)
        await watcher.start()
        assert await watcher.wait_synced(5)
        reg = Registration(etcd.endpoint, _info("p0"), "t1", ttl=TTL)
        dec = Registration(etcd.endpoint, _info("d0", WorkerRole.DECODE, 8102), "t1", ttl=TTL)
        await reg.start()
        await dec.start()
        assert await reg.wait_registered(5) and await dec.wait_registered(5)
        t0 = time.monotonic()
        assert await watcher.wait_for(lambda v: {"p0", "d0"} <= set(v), 2)
        assert time.monotonic() - t0 < 1.0
        assert watcher.get("p0") == reg.info
        assert [w.worker_id for w in watcher.by_role(WorkerRole.PREFILL)] == ["p0"]
        assert [w.worker_id for w in watcher.by_role(WorkerRole.DECODE)] == ["d0"]
        assert {i.worker_id for i in added} == {"p0", "d0"}

        # an updated value reaches the watcher
        await reg.update(_info("p0", port=9999))
        assert await watcher.wait_for(lambda v: v.get("p0") and v["p0"].endpoint.endswith(":9999"), 3)

        # a clean stop revokes the lease: gone at once
        await dec.stop()
        t0 = time.monotonic()
        assert await watcher.wait_for(lambda v: "d0" not in v, 2)
        assert time.monotonic() - t0 < 1.0 and removed == ["d0"]
        await reg.stop()
        await watcher.stop()

    asyncio.run(main())


def test_killed_worker_process_leaves_after_its_lease_ttl(etcd):
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from kvbridge.cluster.discovery import Registration
        from kvbridge.cluster.messages import WorkerInfo, WorkerRole
        async def main():
            info = WorkerInfo(worker_id="crash", role=WorkerRole.DECODE, endpoint="http://127.0.0.1:1",
                              model="m", kv_fingerprint="fp", transfer_address="127.0.0.1:2")
            reg = Registration({etcd.endpoint!r}, info, "t2", ttl={TTL})
            await reg.start()
            assert await reg.wait_registered(10)
            print("registered", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:

        async def main():
            watcher = WorkerWatcher(etcd.endpoint, "t2")
            await watcher.start()
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line.strip() == "registered"
            assert await watcher.wait_for(lambda v: "crash" in v, 3)
            await asyncio.sleep(TTL)  # it keeps itself alive past one TTL
            assert "crash" in watcher.workers
            os.kill(proc.pid, signal.SIGKILL)  # by its pid: no revoke, the keepalive just stops
            t0 = time.monotonic()
            assert await watcher.wait_for(lambda v: "crash" not in v, TTL + 3)
            gone_after = time.monotonic() - t0
            assert gone_after <= TTL + 1.5, gone_after
            await watcher.stop()

        asyncio.run(main())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("clear_data", [False, True], ids=["same-data", "data-lost"])
def test_etcd_outage_longer_than_the_lease(etcd, clear_data, caplog):
    """etcd stops for longer than the lease: the watcher keeps its view meanwhile; after the
    restart the registration is back by itself (a new lease if etcd lost its data)."""
    caplog.set_level(logging.INFO, logger="kvbridge.cluster")

    async def main():
        removed = []
        watcher = WorkerWatcher(etcd.endpoint, "t3", on_remove=removed.append)
        reg = Registration(etcd.endpoint, _info("p0"), "t3", ttl=TTL)
        await watcher.start()
        await reg.start()
        assert await reg.wait_registered(5)
        assert await watcher.wait_for(lambda v: "p0" in v, 2)
        lease_before = reg.lease_id

        await asyncio.to_thread(etcd.stop)
        await asyncio.sleep(TTL + 1.5)
        assert not watcher.connected
        assert "p0" in watcher.workers and removed == []  # last known view kept while down

        await asyncio.to_thread(etcd.restart, 20.0, clear_data)
        assert await watcher.wait_for(lambda v: "p0" in v and watcher.connected, 10)
        # and it stays: the registration is alive (not a leftover of the old lease)
        await asyncio.sleep(TTL + 1)
        assert "p0" in watcher.workers
        if clear_data:
            assert reg.lease_id != lease_before
        await reg.stop()
        await watcher.stop()

    asyncio.run(main())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings, "the outage was not reported"
    for r in warnings:
        assert r.exc_info is None and "\n" not in r.getMessage()
    assert any(f"127.0.0.1:{etcd.port}" in r.getMessage() for r in warnings)
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_unreachable_etcd_one_line_error_then_retries_until_it_appears(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="kvbridge.cluster")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    late = EtcdServer(tmp_path / "late", port=port)

    async def main():
        reg = Registration(endpoint, _info("p0"), "t4", ttl=TTL)
        watcher = WorkerWatcher(endpoint, "t4")
        await reg.start()
        await watcher.start()
        assert not await reg.wait_registered(1.5)  # nobody there: retries, never raises
        assert reg._task is not None and not reg._task.done()
        await asyncio.to_thread(late.start)  # etcd appears later: both find it by themselves
        assert await reg.wait_registered(10)
        assert await watcher.wait_for(lambda v: "p0" in v, 10)
        await reg.stop()
        await watcher.stop()

    try:
        asyncio.run(main())
    finally:
        late.cleanup()
    failures = [r for r in caplog.records if r.getMessage().startswith("etcd at ") and "unreachable" in r.getMessage()]
    warnings = [r for r in failures if r.levelno == logging.WARNING]
    assert len(failures) >= 3  # retried
    assert 1 <= len(warnings) <= 2  # one line per component, not one per attempt
    for r in failures:
        msg = r.getMessage()
        assert f"etcd at 127.0.0.1:{port} unreachable" in msg and "retrying in" in msg
        assert "\n" not in msg and r.exc_info is None
    assert "Traceback" not in caplog.text


def test_watcher_remove_drops_at_once_until_the_worker_registers_again(etcd):
    async def main():
        removed = []
        watcher = WorkerWatcher(etcd.endpoint, "t5", on_remove=removed.append, resync_s=0.5)
        reg = Registration(etcd.endpoint, _info("p0"), "t5", ttl=TTL)
        await watcher.start()
        await reg.start()
        assert await watcher.wait_for(lambda v: "p0" in v, 5)
        watcher.remove("p0")  # a call to it failed
        assert "p0" not in watcher.workers and removed == ["p0"]
        await asyncio.sleep(1.5)  # resyncs and keepalives do not bring it back
        assert "p0" not in watcher.workers
        await reg.stop(revoke=False)
        again = Registration(etcd.endpoint, _info("p0"), "t5", ttl=TTL)  # it restarted
        await again.start()
        assert await watcher.wait_for(lambda v: "p0" in v, 3)
        await again.stop()
        await watcher.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------------- events


def test_kv_and_load_events_flow_again_after_a_nats_restart(nats_server):
    block = 4
    prompt = list(range(40))
    hashes = prefix_hashes(prompt, block)  # 10 blocks

    async def main():
        pub_bus = EventBus(nats_server.endpoint, "t6", name="prefill-0")
        sub_bus = EventBus(nats_server.endpoint, "t6", name="frontend")
        index, loads = KVIndex(), LoadView()
        await sub_bus.subscribe_kv(index.apply)
        await sub_bus.subscribe_load(loads.apply)
        await pub_bus.start()
        await sub_bus.start()
        assert await pub_bus.wait_connected(5) and await sub_bus.wait_connected(5)
        kv = KVEventPublisher(pub_bus, "prefill-0")

        def report(n: int) -> LoadReport:
            return LoadReport(worker_id="prefill-0", num_waiting=n, num_running=1, num_free_blocks=10, num_blocks=16)

        # the engine thread calls the BlockPool hook
        t = threading.Thread(target=kv.on_block_event, args=(hashes[:4], []))
        t.start()
        t.join()
        await pub_bus.publish_load(report(1))
        await kv.flush()
        await pub_bus.flush()
        assert await _eventually(lambda: index.longest_prefix("prefill-0", hashes) == 4)
        assert await _eventually(lambda: loads.get("prefill-0") is not None)

        await asyncio.to_thread(nats_server.stop)
        kv.on_block_event(hashes[4:6], [])  # while down: must not raise
        assert await pub_bus.publish_load(report(2)) in (True, False)
        await asyncio.sleep(0.5)
        assert not sub_bus.connected

        await asyncio.to_thread(nats_server.start)
        assert await pub_bus.wait_connected(10) and await sub_bus.wait_connected(10)
        await _eventually(lambda: pub_bus.connected and sub_bus.connected, 10)
        kv.on_block_event(hashes[6:8], [hashes[0]])
        await pub_bus.publish_load(report(3))
        await kv.flush()
        await pub_bus.flush()
        assert await _eventually(lambda: loads.get("prefill-0") is not None and loads.get("prefill-0").num_waiting == 3)
        assert await _eventually(lambda: index.prefix_lengths(hashes[1:]).get("prefill-0", 0) >= 3)
        assert await _eventually(lambda: index.longest_prefix("prefill-0", hashes) == 0)  # block 0 removed
        await kv.close()
        await pub_bus.close()
        await sub_bus.close()

    asyncio.run(main())


def test_unreachable_nats_never_raises_into_the_caller(caplog):
    caplog.set_level(logging.INFO, logger="kvbridge.cluster")
    endpoint = f"nats://127.0.0.1:{free_port()}"

    async def main():
        bus = EventBus(endpoint, "t7")
        await bus.start()
        await bus.subscribe_kv(lambda ev: None)
        kv = KVEventPublisher(bus, "w")
        kv.on_block_event([1, 2], [])
        await kv.flush()
        assert not await bus.wait_connected(1.0)
        assert bus.dropped >= 1
        await kv.close()
        await bus.close()

    asyncio.run(main())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings and all("\n" not in r.getMessage() and r.exc_info is None for r in warnings)
    assert f"NATS at {endpoint.split('://')[1]} unreachable" in warnings[0].getMessage()


async def _eventually(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()
