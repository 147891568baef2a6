"""`kvbridge bench serve --rounds N`: every round is kept, the targets' order alternates, and
the summary is, per target and workload, the one measured round with the median req/s."""

from __future__ import annotations

import pytest

from kvbridge.bench import serve
from kvbridge.bench.serve import Result, median_rounds, print_table


def result(target: str, rps: float, rnd: int, workload: str = "chat") -> Result:
    return Result(target=target, workload=workload, num_ok=8, num_failed=0, seconds=8 / rps, req_per_s=rps,
                  out_tok_per_s=32 * rps, ttft_p50_ms=1000 / rps, ttft_p99_ms=2000 / rps, tpot_ms=20.0, round=rnd)  # fmt: skip


def test_the_summary_is_the_round_with_the_median_rate_of_each_target_and_workload():
    rs = [result("agg", 4.3, 1), result("disagg", 3.5, 1), result("disagg", 4.0, 2), result("agg", 5.0, 2),
          result("agg", 4.6, 3), result("disagg", 3.9, 3), result("agg", 9.0, 1, "2048 in")]  # fmt: skip
    summary = {(r.target, r.workload): r for r in median_rounds(rs)}
    assert summary[("agg", "chat")].round == 3 and summary[("agg", "chat")].ttft_p50_ms == 1000 / 4.6  # one round, whole
    assert summary[("disagg", "chat")].round == 3
    assert summary[("agg", "2048 in")].round == 1
    even = median_rounds([result("x", 4.0, 1), result("x", 3.0, 2)])
    assert [r.req_per_s for r in even] == [3.0]  # the lower middle: never flattering


def test_the_table_names_each_round_and_lists_the_spread(capsys):
    rs = [result("disagg", 3.5, 1), result("disagg", 4.0, 2), result("disagg", 3.9, 3)]
    print_table(rs, rounds=3)
    print_table(median_rounds(rs), spread=rs)
    out = capsys.readouterr().out
    assert "disagg #1" in out and "disagg #3" in out
    assert "req/s by round: 3.50, 4.00, 3.90 (min 3.50, max 4.00)" in out


def test_rounds_alternate_the_targets_order_on_fresh_servers(monkeypatch, tmp_path):
    calls = []

    def measure(name, how, workloads, out, rnd, rounds):
        calls.append((rnd, name))
        return [result(name, 4.0 + rnd / 10, rnd, w.name) for w in workloads]

    monkeypatch.setattr(serve, "measure", measure)
    monkeypatch.setattr(serve, "plot", lambda results, out: [])
    assert serve.main(["--rounds", "3", "--prompt-tokens", "40", "--out", str(tmp_path)]) == 0
    assert calls == [(1, "aggregated"), (1, "disaggregated"), (2, "disaggregated"), (2, "aggregated"),
                     (3, "aggregated"), (3, "disaggregated")]  # fmt: skip
    with pytest.raises(SystemExit, match="at least 1"):
        serve.main(["--rounds", "0", "--out", str(tmp_path)])
