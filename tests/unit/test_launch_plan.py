"""Which cores the local cluster gives each worker."""

from __future__ import annotations

from kvbridge.serving.launch import plan_cpus, worker_env


def test_prefill_and_decode_get_disjoint_cores():
    plan = plan_cpus(1, 1, cores=[0, 1, 2, 3], prefill_on_all_cores=False)
    assert plan == {"prefill-0": [0, 1], "decode-0": [2, 3]}
    assert not set(plan["prefill-0"]) & set(plan["decode-0"])


def test_small_machines_let_prefill_use_every_core_by_default():
    assert plan_cpus(1, 1, cores=[0, 1], prefill_on_all_cores=None) == {"prefill-0": None, "decode-0": [1]}
    assert plan_cpus(1, 1, cores=[0, 1, 2, 3], prefill_on_all_cores=None) == {"prefill-0": [0, 1], "decode-0": [2, 3]}


def test_one_core_or_no_prefill_means_no_pinning():
    assert plan_cpus(1, 1, cores=[0]) == {"prefill-0": None, "decode-0": None}
    assert plan_cpus(0, 2, cores=[0, 1]) == {"decode-0": None, "decode-1": None}


def test_workers_that_share_cores_spin_only_briefly_at_openmp_barriers():
    env = {"PATH": "/bin"}
    assert worker_env(env, shares_cores=True) == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
    assert worker_env(env, shares_cores=False) == env  # cores of its own: libgomp's default spin
    assert worker_env({"OMP_WAIT_POLICY": "ACTIVE"}, shares_cores=True) == {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's
    assert worker_env({"GOMP_SPINCOUNT": "0"}, shares_cores=True) == {"GOMP_SPINCOUNT": "0"}
