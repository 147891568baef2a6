"""The report of ``kvbridge bench engine``: the summary ratios, the table and the plot.

Pure functions of the results that :mod:`kvbridge.bench.engine` measures; the vLLM reference
numbers and the targets live here, and :mod:`kvbridge.bench.engine` re-exports everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VLLM_LABEL = "vLLM 0.32 (reported in the issue)"
VLLM_REFERENCE = {  # issue 3: CPU build, bfloat16, this machine, SmolLM2-135M-Instruct
    "label": VLLM_LABEL,
    "single_tokens_per_s": 35.0,  # one request, 26 ms per output token
    "chat_tokens_per_s": 140.0,  # 8 concurrent chats of ~200 prompt tokens, 32 output tokens
}
TARGETS = {"single_vs_transformers": 1.0, "concurrent_vs_best_transformers": 4.0, "chat_vs_vllm": 1.0}


def summarize(kv: dict[str, Any], tf: dict[str, Any] | None) -> dict[str, Any]:
    s: dict[str, Any] = {
        "chat_vs_vllm": kv["chat"]["tokens_per_s"] / VLLM_REFERENCE["chat_tokens_per_s"],
        "chat_single_vs_vllm": kv["chat_single"]["tokens_per_s"] / VLLM_REFERENCE["single_tokens_per_s"],
    }
    if tf:
        best = max(tf["sequential"]["tokens_per_s"], tf["batched"]["tokens_per_s"])
        s["single_vs_transformers"] = kv["single"]["tokens_per_s"] / tf["single"]["tokens_per_s"]
        s["concurrent_vs_best_transformers"] = kv["concurrent"]["tokens_per_s"] / best
        s["best_transformers_concurrent"] = (
            "sequential" if tf["sequential"]["tokens_per_s"] >= tf["batched"]["tokens_per_s"] else "batched"
        )
        s["chat_vs_transformers_batched"] = kv["chat"]["tokens_per_s"] / tf["chat"]["tokens_per_s"]
        s["load_vs_transformers"] = kv["load_s"] / tf["load_s"]
        s["single_tokens_identical"] = kv["single_output_ids"] == tf["single_output_ids"]
        s["concurrent_sequences_identical"] = sum(
            a == b for a, b in zip(kv["concurrent_output_ids"], tf["sequential_output_ids"])
        )
    s["targets"] = {k: {"target": v, "met": s[k] >= v} for k, v in TARGETS.items() if k in s}
    return s


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def render_table(res: dict[str, Any]) -> str:
    kv, tf, s, w = res["systems"]["kvbridge"], res["systems"].get("transformers"), res["summary"], res["workload"]
    n, c = w["num_prompts"], w["chat_requests"]
    lens, chat_lens = w["prompt_tokens"], w["chat_prompt_tokens"]
    g = (lambda k: tf[k]["tokens_per_s"]) if tf else (lambda k: None)
    rows: list[tuple[str, str, str, str, str]] = [
        ("model load (s)", _f(kv["load_s"], "{:.2f}"), _f(tf and tf["load_s"], "{:.2f}"), "-",
         _f(s.get("load_vs_transformers"), "{:.2f}x")),
        (f"1 request, {w['single_prompt_tokens']} prompt + {w['max_tokens']} out (tok/s)",
         _f(kv["single"]["tokens_per_s"]), _f(g("single")), "-", _f(s.get("single_vs_transformers"), "{:.2f}x")),
        ("   ms per output token", _f(kv["single"]["ms_per_output_token_per_request"]),
         _f(tf and tf["single"]["ms_per_output_token_per_request"]), "-", ""),
        (f"{n} concurrent, {min(lens)}-{max(lens)} prompt + {w['max_tokens']} out (total tok/s)",
         _f(kv["concurrent"]["tokens_per_s"]), "", "", ""),
        ("   transformers sequential", "", _f(g("sequential")), "-",
         _f(tf and kv["concurrent"]["tokens_per_s"] / tf["sequential"]["tokens_per_s"], "{:.2f}x")),
        ("   transformers padded batch", "", _f(g("batched")), "-",
         _f(tf and kv["concurrent"]["tokens_per_s"] / tf["batched"]["tokens_per_s"], "{:.2f}x")),
        ("   kvbridge / best transformers", "", "", "", _f(s.get("concurrent_vs_best_transformers"), "{:.2f}x")),
        (f"chat, 1 request, {chat_lens[0]} prompt + {w['chat_max_tokens']} out (tok/s)",
         _f(kv["chat_single"]["tokens_per_s"]), _f(g("chat_single")), _f(VLLM_REFERENCE["single_tokens_per_s"]),
         _f(s["chat_single_vs_vllm"], "{:.2f}x vLLM")),
        (f"chat, {c} concurrent, ~{w['chat_target_tokens']} prompt + {w['chat_max_tokens']} out (total tok/s)",
         _f(kv["chat"]["tokens_per_s"]), _f(g("chat")), _f(VLLM_REFERENCE["chat_tokens_per_s"]),
         _f(s["chat_vs_vllm"], "{:.2f}x vLLM")),
        ("peak RSS (MiB)", _f(kv["peak_rss_mib"], "{:.0f}"), _f(tf and tf["peak_rss_mib"], "{:.0f}"), "-", ""),
        ("   peak RSS by the end of model load (MiB)", _f(kv["load_peak_rss_mib"], "{:.0f}"),
         _f(tf and tf["load_peak_rss_mib"], "{:.0f}"), "-", ""),
    ]  # fmt: skip
    head = ("", "kvbridge", "transformers", VLLM_LABEL, "ratio")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    line = "  ".join("-" * wd for wd in widths)
    fmt = lambda r: "  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(5)).rstrip()  # noqa: E731
    out = [fmt(head), line, *map(fmt, rows), line]
    notes = [f"dtype {res['config']['dtype']} for both systems (asked: {res['config']['dtype_requested']})",
             f"kvbridge KV pool: {kv['kv_blocks']} blocks ({kv['kv_pool_mib']:.0f} MiB, in its peak RSS), "
             f"prefix caching {'on' if w['prefix_caching'] else 'off'}, preemptions: {kv['preemptions']}"]  # fmt: skip
    la, lz = res["config"]["loadavg_at_start"][0], res["config"]["loadavg_at_end"][0]
    notes.append(f"load average {la:.2f} at the start, {lz:.2f} at the end, on {res['config']['cpu_count']} CPUs "
                 f"(above the CPU count, other processes shared the cores and the numbers are noisy)")  # fmt: skip
    if tf:
        same = "yes" if s["single_tokens_identical"] else "no"
        notes.append(f"greedy tokens identical to transformers: 1 request {same}; "
                     f"{s['concurrent_sequences_identical']}/{n} concurrent sequences vs transformers sequential")  # fmt: skip
        for k, t in s["targets"].items():
            notes.append(f"target {k} >= {t['target']:g}: {'met' if t['met'] else 'NOT met'}")
    else:
        notes.append("transformers skipped (--skip-transformers)")
    return "\n".join(out + notes)


def plot(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kv, tf, w = res["systems"]["kvbridge"], res["systems"].get("transformers"), res["workload"]
    cats = ["1 request", f"{w['num_prompts']} concurrent", "chat 1 request", f"chat {w['chat_requests']} concurrent"]
    keys = ["single", "concurrent", "chat_single", "chat"]
    series: dict[str, list[float | None]] = {"kvbridge": [kv[k]["tokens_per_s"] for k in keys]}
    if tf:
        series["transformers generate (padded batch)"] = [tf[k]["tokens_per_s"] for k in ("single", "batched", "chat_single", "chat")]
        series["transformers sequential"] = [None, tf["sequential"]["tokens_per_s"], None, None]
    series[VLLM_LABEL] = [None, None, VLLM_REFERENCE["single_tokens_per_s"], VLLM_REFERENCE["chat_tokens_per_s"]]

    fig, (ax, ax_load, ax_mem) = plt.subplots(1, 3, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 1, 1]})
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        vs = [v for v in values if v is not None]
        bars = ax.bar(xs, vs, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(cats)), cats)
    ax.set_ylabel("output tokens/s (total)")
    ax.set_title(f"throughput ({res['config']['dtype']}, {res['config']['threads']} threads)")
    ax.legend(fontsize=8)
    names = ["kvbridge"] + (["transformers"] if tf else [])
    systems = [kv] + ([tf] if tf else [])
    for a, key, title in ((ax_load, "load_s", "model load (s)"), (ax_mem, "peak_rss_mib", "peak RSS (MiB)")):
        bars = a.bar(names, [sy[key] for sy in systems], color=["C0", "C1"][: len(names)])
        a.bar_label(bars, fmt="%.1f" if key == "load_s" else "%.0f", fontsize=8)
        a.set_title(title)
    fig.suptitle(Path(res["config"]["model"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
