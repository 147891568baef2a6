"""The router with fake views: policies, conditional disaggregation, exclusions."""

from __future__ import annotations

import pytest

from kvbridge.cluster.events import KVIndex, LoadView
from kvbridge.cluster.messages import KVEvent, LoadReport, WorkerInfo, WorkerRole
from kvbridge.config import ClusterConfig, ConfigError
from kvbridge.engine.block_pool import prefix_hashes
from kvbridge.serving.router import LocalReason, NoWorkers, Router

BS = 4
PROMPT = list(range(100, 132))  # 8 full blocks


def info(wid: str, role: WorkerRole, fp: str = "fp") -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, endpoint=f"http://{wid}", model="m", kv_fingerprint=fp, transfer_address=f"{wid}:1")


class Fake:
    def __init__(self, *workers: WorkerInfo, **cfg) -> None:
        self.view = {w.worker_id: w for w in workers}
        self.now = 0.0
        self.loads = LoadView(clock=lambda: self.now)
        self.kv = KVIndex()
        self.router = Router(ClusterConfig(etcd="http://e:1", nats="nats://n:1", **cfg), lambda: self.view, self.loads, self.kv, BS)

    def load(self, wid: str, waiting: int = 0, running: int = 0, free: int = 100) -> None:
        self.loads.apply(LoadReport(worker_id=wid, num_waiting=waiting, num_running=running, num_free_blocks=free, num_blocks=100))

    def cache(self, wid: str, tokens: list[int]) -> None:
        self.kv.apply(KVEvent(worker_id=wid, seq=1, stored=prefix_hashes(tokens, BS), reset=True))


P0, P1 = info("prefill-0", WorkerRole.PREFILL), info("prefill-1", WorkerRole.PREFILL)
D0, D1 = info("decode-0", WorkerRole.DECODE), info("decode-1", WorkerRole.DECODE)


def test_round_robin_takes_turns():
    f = Fake(P0, P1, D0, D1, policy="round_robin")
    routes = [f.router.route(PROMPT) for _ in range(4)]
    assert [r.prefill.worker_id for r in routes] == ["prefill-0", "prefill-1"] * 2
    assert [r.decode.worker_id for r in routes] == ["decode-0", "decode-1"] * 2


def test_least_loaded_picks_the_emptiest_queue_then_most_free_blocks():
    f = Fake(P0, P1, D0, D1, policy="least_loaded")
    f.load("prefill-0", waiting=3)
    f.load("prefill-1", waiting=1)
    f.load("decode-0", running=2, free=50)
    f.load("decode-1", running=2, free=80)
    r = f.router.route(PROMPT)
    assert (r.prefill.worker_id, r.decode.worker_id) == ("prefill-1", "decode-1")


def test_kv_aware_prefers_the_cached_prefix_until_the_queue_outweighs_it():
    f = Fake(P0, P1, D0, policy="kv_aware")
    f.cache("prefill-1", PROMPT[:24])  # 6 of 8 blocks
    r = f.router.route(PROMPT)
    assert r.prefill.worker_id == "prefill-1" and r.cached_blocks == 6
    f.load("prefill-1", waiting=2)  # 0.25 uncached + 1.0 queue > 1.0 uncached on the idle one
    assert f.router.route(PROMPT).prefill.worker_id == "prefill-0"
    assert f.router.route([7] * 32).cached_blocks == 0  # another prompt: no hit anywhere


def test_short_prompts_and_busy_prefill_pools_prefill_on_the_decode_worker():
    f = Fake(P0, D0, min_prefill_tokens=16, max_prefill_queue=2)
    r = f.router.route(PROMPT[:8])
    assert r.prefill is None and r.local_reason is LocalReason.SHORT_PROMPT and r.decode is D0
    assert f.router.route(PROMPT).prefill is P0
    f.load("prefill-0", waiting=3)
    assert f.router.route(PROMPT).local_reason is LocalReason.PREFILL_BUSY
    f.now += 10  # the report went stale: unknown load counts as idle
    assert f.router.route(PROMPT).prefill is P0


def test_prefills_in_flight_count_in_the_queue_before_any_load_report():
    """A prefill worker admits prompts as running, so its reported ``num_waiting`` stays 0 while
    its queue grows: the prefills this router sent and that have not ended count instead."""
    f = Fake(P0, D0, max_prefill_queue=1)
    f.router.prefill_started("prefill-0")
    assert f.router.route(PROMPT).prefill is P0  # depth 1: not over 1
    f.router.prefill_started("prefill-0")
    f.load("prefill-0", waiting=0, running=2)
    assert f.router.queue_depth("prefill-0") == 2
    assert f.router.route(PROMPT).local_reason is LocalReason.PREFILL_BUSY
    f.router.prefill_ended("prefill-0")
    assert f.router.route(PROMPT).prefill is P0
    f.router.prefill_ended("prefill-0")
    f.load("prefill-0", waiting=3)  # another frontend's requests wait there
    assert f.router.route(PROMPT).local_reason is LocalReason.PREFILL_BUSY


def test_no_prefill_worker_or_another_fingerprint_means_local():
    assert Fake(D0).router.route(PROMPT).local_reason is LocalReason.NO_PREFILL_WORKER
    other = info("prefill-x", WorkerRole.PREFILL, fp="other-model")
    r = Fake(other, D0).router.route(PROMPT)
    assert r.prefill is None and r.local_reason is LocalReason.NO_PREFILL_WORKER


def test_both_workers_prefill_their_own_requests():
    b = info("both-0", WorkerRole.BOTH)
    r = Fake(P0, b).router.route(PROMPT)
    assert r.decode is b and r.prefill is None and r.local_reason is LocalReason.AGGREGATED


def test_exclusions_and_no_workers():
    f = Fake(P0, D0, D1, policy="round_robin")
    for _ in range(3):
        assert f.router.route(PROMPT, exclude={"decode-0"}).decode is D1
    with pytest.raises(NoWorkers, match="no decode worker"):
        f.router.route(PROMPT, exclude={"decode-0", "decode-1"})
    with pytest.raises(NoWorkers):
        Fake(P0).router.route(PROMPT)


def test_cluster_config_is_validated():
    with pytest.raises(ConfigError, match="cluster.policy"):
        ClusterConfig(policy="random")
    with pytest.raises(ConfigError, match="both etcd and NATS"):
        ClusterConfig(etcd="http://127.0.0.1:2379")
    assert ClusterConfig().local or ClusterConfig().etcd  # local unless KVBRIDGE_ETCD/NATS are set
