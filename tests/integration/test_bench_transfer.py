"""`kvbridge bench transfer` end to end on small sizes: two real processes, every backend,
push and pull, the bare NIXL baseline and memcpy, the JSON and the plot it reports."""

from __future__ import annotations

import json
import os

import pytest

from kvbridge.bench import transfer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

os.environ.setdefault("UCX_NET_DEVICES", "lo")


def test_bench_transfer_measures_and_reports(tmp_path, capsys):
    backends = ["ucx", "nixl"] if "ucx" in transfer._available_backends() else ["nixl"]  # ucx first on purpose
    rc = transfer.main(["--sizes", "64K,256K", "--budget", "2M", "--rounds", "1",
                        "--backends", ",".join(backends), "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "added at 64 KiB" in out
    rows = json.loads((tmp_path / "transfer.json").read_text())
    assert {(r["backend"], r["mode"], r["size"]) for r in rows} == {
        (b, m, s) for b in backends for m in ("push", "pull") for s in (64 * 1024, 256 * 1024)
    }
    for r in rows:  # every cell has the transceiver, the bare NIXL baseline and memcpy
        assert r["trx_gbs"] > 0 and r["bare_gbs"] > 0 and r["memcpy_gbs"] > 0, r
        assert r["ratio"] == pytest.approx(r["bare_s"] / r["trx_s"])
        assert r["paired_ratio"] == pytest.approx(r["ratio"])  # one round: its own ratio is the best against best
        assert r["source_s"] > 0, r  # the source's DONE, measured in both modes
        if r["mode"] == "push":  # the initiator is the source: one time
            assert r["source_s"] == r["trx_s"], r
    assert (tmp_path / "transfer.png").stat().st_size > 1000
