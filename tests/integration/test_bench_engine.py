"""`kvbridge bench engine` end to end at tiny sizes: both systems run, in their own processes,
on the same prompts, and the table, results.json and results.png come out with sane numbers.

A smoke test, not a timed one: it checks that numbers are there and positive, never how big."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbridge import cli

pytestmark = pytest.mark.slow

TINY = [
    "--num-prompts", "2", "--max-tokens", "4",
    "--min-prompt-tokens", "40", "--max-prompt-tokens", "80",
    "--chat-requests", "2", "--chat-prompt-tokens", "48", "--chat-max-tokens", "2",
    "--threads", "1", "--dtype", "float32",
]  # fmt: skip


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def kv_dtype_is_transformers_dtype(res) -> bool:
    return res["systems"]["kvbridge"]["dtype"] == res["systems"]["transformers"]["dtype"] == res["config"]["dtype"]


def test_bench_engine_tiny_run(tmp_path: Path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "engine", *TINY, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out

    # the command line first, then the table with both systems and the vLLM reference
    assert stdout.splitlines()[0] == "$ kvbridge bench engine " + " ".join([*TINY, "--out", str(out)])
    for text in ("model load (s)", "1 request", "2 concurrent", "transformers sequential",
                 "transformers padded batch", "kvbridge / best transformers", "peak RSS (MiB)",
                 "vLLM 0.32 (reported in the issue)", "35.0", "140.0"):  # fmt: skip
        assert text in stdout, text

    res = json.loads((out / "results.json").read_text())
    png = out / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["command"] == stdout.splitlines()[0].removeprefix("$ ")
    assert res["config"]["threads"] == 1 and res["config"]["dtype"] == "float32"
    assert kv_dtype_is_transformers_dtype(res)

    # same prompts for both systems, of different lengths, as asked
    w = res["workload"]
    lengths = w["prompt_tokens"]
    assert len(lengths) == 2 and lengths[0] < lengths[1] and lengths[0] >= 40
    assert len(w["chat_prompt_tokens"]) == 2 and all(n >= 48 for n in w["chat_prompt_tokens"])
    kv, tf = res["systems"]["kvbridge"], res["systems"]["transformers"]
    assert kv["prompts_sha256"] == tf["prompts_sha256"] == w["prompts_sha256"]

    # every timed run produced exactly max_tokens per request, at a positive rate
    runs = {"kvbridge": ("single", "concurrent", "chat_single", "chat"),
            "transformers": ("single", "sequential", "batched", "chat_single", "chat")}  # fmt: skip
    for name, keys in runs.items():
        system = res["systems"][name]
        assert positive(system["load_s"]) and positive(system["peak_rss_mib"]), name
        assert system["peak_rss_mib"] > 100, "peak RSS of a process that loaded torch and a model"
        for key in keys:
            run = system[key]
            assert run["all_full_length"], (name, key)
            assert run["output_tokens"] == run["requests"] * run["max_tokens"], (name, key)
            assert positive(run["seconds"]) and positive(run["tokens_per_s"]), (name, key)
    assert kv["concurrent"]["output_tokens"] == 2 * 4 and kv["chat"]["output_tokens"] == 2 * 2
    assert kv["preemptions"] == 0

    s = res["summary"]
    for key in ("single_vs_transformers", "concurrent_vs_best_transformers", "chat_vs_vllm"):
        assert positive(s[key]), key
    assert s["best_transformers_concurrent"] in ("sequential", "batched")
    # float32 greedy: kvbridge's tokens are transformers' tokens
    assert s["single_tokens_identical"] and s["concurrent_sequences_identical"] == 2
    assert res["reference"]["chat_tokens_per_s"] == 140.0 and res["reference"]["single_tokens_per_s"] == 35.0


def test_bench_engine_bad_option_is_one_line(capsys):
    assert cli.main(["bench", "engine", "--num-prompts", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--num-prompts must be positive" in err
