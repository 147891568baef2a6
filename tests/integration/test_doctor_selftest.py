"""`kvbridge doctor --self-test --json` on this machine: the real report.

Runs the command as a user would (a subprocess, UCX on loopback) and checks what it says:
NIXL found, a real transfer over cma/memory or tcp/lo, the LIBFABRIC plugin present but not
loadable naming libfabric.so.1, no EFA, no GPU (where there are none), exit status 0.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(importlib.util.find_spec("nixl_cu12") is None, reason="nixl-cu12 is not installed"),
]


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "UCX_NET_DEVICES": "lo"}
    for k in (
        "NIXL_PLUGIN_DIR",
        "UCX_TLS",
        "KVBRIDGE_ROLE",
        "TRTLLM_USE_UCX_KVCACHE",
        "TRTLLM_USE_NIXL_KVCACHE",
        "UCX_LOG_FILE",
    ):
        env.pop(k, None)
    res = subprocess.run(
        [sys.executable, "-m", "kvbridge.cli", "doctor", "--self-test", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert res.stdout.strip(), res.stderr[-3000:]
    return res.returncode, json.loads(res.stdout), res.stderr


def finding(doc: dict, check: str) -> dict:
    hits = [f for f in doc["findings"] if f["check"] == check]
    assert len(hits) == 1, (check, doc["findings"])
    return hits[0]


def test_exit_status_zero_and_no_failure(report):
    code, doc, stderr = report
    fails = [f for f in doc["findings"] if f["status"] == "fail"]
    assert code == 0 and doc["exit_status"] == 0, (fails, stderr[-2000:])


def test_nixl_found_with_its_ucx_plugin(report):
    _, doc, _ = report
    assert finding(doc, "nixl")["status"] == "ok"
    assert finding(doc, "nixl plugin UCX")["status"] == "ok"
    assert finding(doc, "nixl copies")["status"] in ("ok", "warn")


@pytest.mark.skipif(ctypes.util.find_library("fabric") is not None, reason="libfabric is installed here")
def test_libfabric_present_but_not_loadable_names_libfabric(report):
    _, doc, _ = report
    f = finding(doc, "nixl plugin LIBFABRIC")
    assert f["status"] == "info"  # not the configured backend: it does not block serving
    assert "cannot load" in f["summary"] and "libfabric.so.1" in f["summary"]


def test_self_test_moved_real_bytes_over_local_transports(report):
    _, doc, _ = report
    st = doc["self_test"]
    assert st["ok"] and st["intact"], st
    assert st["backend"] == "NIXL/UCX"
    assert "cma/memory" in st["transports"] or "tcp/lo" in st["transports"], st
    assert st["num_bytes"] > 0 and st["gbps"] > 0 and st["memcpy_gbps"] > 0
    assert finding(doc, "self-test")["status"] == "ok"
    bw = finding(doc, "self-test bandwidth")["summary"]
    assert "GB/s" in bw and "memcpy" in bw


@pytest.mark.skipif(bool(glob.glob("/sys/class/infiniband/rdmap*")), reason="this node has EFA")
def test_no_efa(report):
    _, doc, _ = report
    f = finding(doc, "efa")
    assert f["status"] == "info" and "no EFA" in f["summary"]


@pytest.mark.skipif(os.path.isdir("/proc/driver/nvidia/gpus"), reason="this node has a GPU")
def test_no_gpu(report):
    _, doc, _ = report
    f = finding(doc, "gpu")
    assert f["status"] == "info" and "no GPU" in f["summary"]


def test_etcd_and_nats_reachable_with_real_servers():
    """`--etcd` / `--nats` against a real etcd and nats-server on 127.0.0.1, then stopped."""
    from kvbridge.cluster import services
    from kvbridge.doctor_net import check_etcd, check_nats

    with services.LocalServices() as svc:  # stops both by pid and removes its folder
        (etcd,) = check_etcd(svc.etcd_endpoint, timeout=3)
        (nats,) = check_nats(svc.nats_endpoint, timeout=3)
    assert etcd.status.value == "ok" and "etcd 3." in etcd.summary, etcd
    assert nats.status.value == "ok" and "nats-server 2." in nats.summary, nats
