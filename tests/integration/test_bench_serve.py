"""`kvbridge bench serve` end to end on a tiny workload: it starts its own server, measures,
stops it by pid, and writes the JSON and plots it reports."""

from __future__ import annotations

import json

import pytest

from kvbridge.bench import serve

pytestmark = pytest.mark.slow


def test_bench_serve_measures_and_reports(tmp_path, capsys):
    rc = serve.main(["--targets", "aggregated", "--prompt-tokens", "40", "--output-tokens", "4",
                     "--num-requests", "3", "--concurrency", "2", "--serve-args", "--kv-cache-memory-mb 32",
                     "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "TTFT p50" in out and "aggregated" in out
    (result,) = json.loads((tmp_path / "serve.json").read_text())
    assert result["num_ok"] == 3 and result["num_failed"] == 0
    assert 0 < result["ttft_p50_ms"] <= result["ttft_p99_ms"]
    assert result["out_tok_per_s"] > 0 and result["tpot_ms"] > 0
    assert result["ttft_p50_ms"] < result["e2e_p50_ms"]  # a request ends after its first token
    assert result["prompt_tokens_mean"] == 40  # as the server counted them
    assert (tmp_path / "serve_ttft_p50_ms.png").stat().st_size > 1000
