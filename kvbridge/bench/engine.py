"""``kvbridge bench engine``: kvbridge's engine against transformers' ``generate``, one run, same prompts.

What it measures (greedy, EOS ignored, so every request yields exactly its max_tokens):

    load          kvbridge ``LLMEngine(...)``; transformers ``from_pretrained`` (same file, same dtype)
    1 request     one prompt (the median-length one), ``--max-tokens`` output tokens
    N concurrent  ``--num-prompts`` chat prompts of different lengths (~60..400 tokens):
                  kvbridge all submitted at once (continuous batching); transformers one after
                  another (sequential) and as one left-padded ``generate`` call (batched)
    chat          the workload vLLM 0.32 was measured on in the issue: ``--chat-requests`` chats
                  of ~200 prompt tokens and ``--chat-max-tokens`` output tokens, all at once,
                  and the first of them alone
    peak RSS      each system runs in its own process (this module with ``--phase``); the peak
                  is that process's VmHWM, so one system's memory never counts for the other

Both systems run in the same dtype: ``--dtype auto`` (the engine's default) is resolved by
kvbridge's engine, and the transformers phase gets the dtype the engine really used.

The parent process builds and tokenizes the prompts once (kvbridge's tokenizer and the model's
chat template) and hands the same token ids to both phases; each phase reports a hash of what
it ran. Prefix caching is off unless ``--prefix-caching``: transformers has none, and the
warm-up and 1-request runs reuse prompts of the timed runs. The KV pool is sized for the
workload unless ``--kv-cache-mb`` is given.

Output: a table on stdout (the command line first), ``results.json`` and ``results.png`` under
``--out``; the summary, table and plot are made in :mod:`kvbridge.bench.engine_report`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvbridge.bench import out_folder

# the report (summary, table, plot) and its reference numbers; re-exported: TARGETS, VLLM_LABEL, _f
from kvbridge.bench.engine_report import (  # noqa: F401
    TARGETS,
    VLLM_LABEL,
    VLLM_REFERENCE,
    _f,
    plot,
    render_table,
    summarize,
)

PROG = "kvbridge bench engine"
PHASES = ("kvbridge", "transformers")
WARMUP_TOKENS = 4

QUESTIONS = [
    "What is the capital of France, and why did it become the capital?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers and say why they are prime.",
    "Translate 'good morning' into Spanish, German and Italian.",
    "How does a bicycle stay upright while moving?",
    "Give me a recipe for a simple tomato soup.",
    "What are the main differences between Python lists and tuples?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Why is the sky blue?",
    "Suggest five names for a bakery that sells only bread.",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Explain recursion to a ten-year-old.",
    "What is the difference between weather and climate?",
    "Write a short polite email declining a meeting invitation.",
    "How do vaccines train the immune system?",
]
# Context that pads prompts to their target lengths; each prompt starts at a different
# sentence so that prompts share no prefix beyond the chat template's system turn.
CONTEXT = [
    "The town of Brackenford lies in a river valley surrounded by low hills covered in oak forest.",
    "Its market has been held every Thursday since the fourteenth century, selling cheese, wool and apples.",
    "A stone bridge with seven arches crosses the river near the old mill, which now houses a museum.",
    "In winter the river often floods the meadows to the south, attracting thousands of migrating geese.",
    "The local school was founded in 1862 by a cloth merchant who wanted every child to learn to read.",
    "Most residents work in farming, in the small furniture workshops, or in the hospital in the next town.",
    "A railway line opened in 1871 and closed in 1964, and its embankment is now a popular cycling path.",
    "The parish church has a square tower, a clock that runs five minutes slow, and a famous carved door.",
    "Every September the town holds a harvest festival with a parade, a brass band and a pie contest.",
    "The library keeps a collection of old maps showing how the river changed its course over the centuries.",
    "Two bakeries compete for customers on the high street, and each claims to have the oldest recipe.",
    "A team of volunteers restores the footpaths across the hills and counts the birds each spring.",
    "The climate is mild and wet, with most rain falling in autumn and the warmest days in late July.",
    "Tourists come for the walking trails, the museum and the view from the hill fort above the valley.",
    "The town council meets once a month in the old guildhall, and its meetings are open to everyone.",
    "In the last census the population was a little over four thousand people, slowly growing each year.",
]


# --------------------------------------------------------------------------- prompts


def build_prompts(tokenizer: Any, targets: list[int], first_question: int = 0) -> list[list[int]]:
    """One chat prompt per target length: a question padded with context sentences until its
    templated, tokenized length reaches the target (or exceeds it by one sentence at most)."""
    prompts = []
    for i, target in enumerate(targets):
        k = first_question + i
        question = QUESTIONS[k % len(QUESTIONS)]
        if k >= len(QUESTIONS):
            question += f" (variant {k // len(QUESTIONS)})"
        context: list[str] = []
        while True:
            content = (("Context: " + " ".join(context) + "\n\n") if context else "") + question
            ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": content}]))
            if len(ids) >= target or len(context) > 200:
                break
            context.append(CONTEXT[(k * 5 + len(context)) % len(CONTEXT)])
        prompts.append(ids)
    return prompts


def spread(n: int, lo: int, hi: int) -> list[int]:
    """``n`` target lengths evenly from ``lo`` to ``hi``."""
    if n == 1:
        return [lo]
    return [round(lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def prompts_hash(*groups: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(groups, separators=(",", ":")).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- phases (children)


def peak_rss_mib() -> float:
    """Peak resident memory of this process image (VmHWM: reset by exec, unlike ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Any, prompts: list[list[int]], max_tokens: int) -> tuple[dict[str, Any], list[list[int]]]:
    t0 = time.perf_counter()
    outs = fn(prompts, max_tokens)
    seconds = time.perf_counter() - t0
    total = sum(len(o) for o in outs)
    result = {
        "requests": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "max_tokens": max_tokens,
        "output_tokens": total,
        "all_full_length": all(len(o) == max_tokens for o in outs),
        "seconds": seconds,
        "tokens_per_s": total / seconds if seconds > 0 else 0.0,
        "ms_per_output_token_per_request": 1000 * seconds / max_tokens,
    }
    return result, outs


def phase_kvbridge(work: dict[str, Any]) -> dict[str, Any]:
    import torch

    from kvbridge.config import EngineConfig
    from kvbridge.engine.engine import LLMEngine
    from kvbridge.engine.request import SamplingParams

    threads = work["threads"]
    torch.set_num_threads(threads)
    pool: dict[str, int] = {"kv_cache_memory_mb": work["kv_cache_mb"]} if work["kv_cache_mb"] else {}
    if not pool:  # sized for the largest phase, +10 % and one block per request
        block_size = EngineConfig.block_size
        need = max(
            sum(math.ceil((len(p) + work["max_tokens"]) / block_size) + 1 for p in work["prompts"]),
            sum(math.ceil((len(p) + work["chat_max_tokens"]) / block_size) + 1 for p in work["chat_prompts"]),
        )
        pool = {"num_kv_blocks": math.ceil(need * 1.1)}
    t0 = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(
            model=work["model"],
            dtype=work["dtype"],
            num_threads=threads,
            enable_prefix_caching=work["prefix_caching"],
            max_num_seqs=max(32, len(work["prompts"]), len(work["chat_prompts"])),
            **pool,
        )
    )
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_mib()

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        outs = engine.generate(prompts, params)
        assert engine.block_pool.num_free == engine.block_pool.num_blocks, "KV blocks leaked"
        return outs

    generate([work["warmup_prompt"]], WARMUP_TOKENS)
    single, single_out = timed(generate, [work["single_prompt"]], work["max_tokens"])
    concurrent, concurrent_out = timed(generate, work["prompts"], work["max_tokens"])
    chat_single, _ = timed(generate, work["chat_prompts"][:1], work["chat_max_tokens"])
    chat, _ = timed(generate, work["chat_prompts"], work["chat_max_tokens"])
    stats = engine.stats()
    return {
        "load_s": load_s,
        "load_peak_rss_mib": load_peak,
        "single": single,
        "concurrent": concurrent,
        "chat_single": chat_single,
        "chat": chat,
        "dtype": getattr(engine, "dtype_name", work["dtype"]),  # "auto" resolved
        "kv_pool_mib": engine.layout.total_bytes / 2**20,
        "kv_blocks": stats.num_blocks,
        "preemptions": stats.num_preemptions,
        "single_output_ids": single_out[0],
        "concurrent_output_ids": concurrent_out,
        "versions": {"torch": torch.__version__},
    }


def phase_transformers(work: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    threads = work["threads"]
    torch.set_num_threads(threads)
    # the dtype kvbridge resolved ("auto" never reaches this phase)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[work["dtype"]]
    model_path = Path(work["model"])
    t0 = time.perf_counter()
    if model_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_mib()
    model.eval()
    pad = work["pad_token_id"]
    # no EOS: always max_new_tokens, like ignore_eos (generate's None falls back to these)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)  # left padding: every row ends at the same column
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False)
        return [row[width:].tolist() for row in out]

    def sequential(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        return [generate([p], max_tokens)[0] for p in prompts]

    generate([work["warmup_prompt"]], WARMUP_TOKENS)
    single, single_out = timed(generate, [work["single_prompt"]], work["max_tokens"])
    seq, seq_out = timed(sequential, work["prompts"], work["max_tokens"])
    batched, _ = timed(generate, work["prompts"], work["max_tokens"])
    chat_single, _ = timed(generate, work["chat_prompts"][:1], work["chat_max_tokens"])
    chat, _ = timed(generate, work["chat_prompts"], work["chat_max_tokens"])
    return {
        "load_s": load_s,
        "load_peak_rss_mib": load_peak,
        "dtype": work["dtype"],
        "single": single,
        "sequential": seq,
        "batched": batched,
        "chat_single": chat_single,
        "chat": chat,
        "single_output_ids": single_out[0],
        "sequential_output_ids": seq_out,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def run_phase(phase: str, work_path: str, result_path: str) -> int:
    work = json.loads(Path(work_path).read_text())
    result = {"kvbridge": phase_kvbridge, "transformers": phase_transformers}[phase](work)
    result["prompts_sha256"] = prompts_hash(work["prompts"], work["chat_prompts"])
    result["threads"] = work["threads"]
    result["peak_rss_mib"] = peak_rss_mib()
    Path(result_path).write_text(json.dumps(result))
    return 0


def spawn_phase(phase: str, work_path: Path, tmp: Path) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its result, or a CLI error."""
    result_path = tmp / f"{phase}.json"
    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cmd = [sys.executable, "-m", "kvbridge.bench.engine", "--phase", phase, "--work", str(work_path),
           "--result", str(result_path)]  # fmt: skip
    print(f"# running {phase} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=2)  # the phases' chatter goes to stderr
    if proc.returncode != 0 or not result_path.exists():
        raise BenchError(f"the {phase} phase failed (exit status {proc.returncode}); its output is above")
    result = json.loads(result_path.read_text())
    result["phase_wall_s"] = time.perf_counter() - t0
    return result


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from kvbridge.config import DTYPES, EngineConfig

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Engine throughput, latency, load time and peak memory: kvbridge against transformers' "
        "generate on the same prompts, each system in its own process.",
    )
    p.add_argument("--model", default="", help="GGUF file or HF folder (default: the default model)")
    p.add_argument("--num-prompts", type=int, default=16, help="concurrent requests of different lengths (16)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request, 1-request and concurrent runs (64)")
    p.add_argument("--min-prompt-tokens", type=int, default=60, help="shortest concurrent prompt (60)")
    p.add_argument("--max-prompt-tokens", type=int, default=400, help="longest concurrent prompt (400)")
    p.add_argument("--chat-requests", type=int, default=8, help="concurrent chats of the vLLM-comparable workload (8)")
    p.add_argument("--chat-prompt-tokens", type=int, default=200, help="prompt tokens of each chat (~200)")
    p.add_argument("--chat-max-tokens", type=int, default=32, help="output tokens of each chat (32)")
    p.add_argument("--dtype", default=EngineConfig.dtype, choices=DTYPES,
                   help=f"both systems; auto is resolved by kvbridge's engine and transformers gets the result "
                        f"(default: the engine's default, {EngineConfig.dtype})")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads for both systems (default: all cores)")
    p.add_argument("--kv-cache-mb", type=int, default=0, help="kvbridge KV pool size (default: sized for the workload)")
    p.add_argument("--prefix-caching", action="store_true", help="turn kvbridge's prefix cache on (off by default)")
    p.add_argument("--skip-transformers", action="store_true", help="run kvbridge only (quick runs)")
    p.add_argument("--out", type=out_folder, default="bench_out/engine", help="folder for results.json and results.png (bench_out/engine)")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def command_line(argv: list[str]) -> str:
    """The command as typed when this is the running program, else as ``kvbridge bench engine ...``."""
    if sys.argv[1:] and sys.argv[len(sys.argv) - len(argv) :] == argv:
        if sys.argv[0].endswith(os.path.join("bench", "engine.py")):  # python -m kvbridge.bench.engine
            return shlex.join(["python", "-m", "kvbridge.bench.engine", *sys.argv[1:]])
        return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return shlex.join([*PROG.split(), *argv])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.phase:
        return run_phase(args.phase, args.work, args.result)
    for name in ("num_prompts", "max_tokens", "chat_requests", "chat_max_tokens", "chat_prompt_tokens",
                 "min_prompt_tokens", "max_prompt_tokens"):  # fmt: skip
        if getattr(args, name) <= 0:
            print(f"{PROG}: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if args.threads < 0 or args.kv_cache_mb < 0 or args.min_prompt_tokens > args.max_prompt_tokens:
        print(f"{PROG}: --threads and --kv-cache-mb must be >= 0, --min-prompt-tokens <= --max-prompt-tokens",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        return _bench(args, argv)
    except BenchError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    from kvbridge.config import ConfigError, default_model_path
    from kvbridge.engine.tokenizer import Tokenizer, TokenizerError

    print(f"$ {command_line(argv)}", flush=True)
    try:
        model = str(Path(args.model or default_model_path()).resolve())
        tokenizer = Tokenizer.load(model)
    except (ConfigError, TokenizerError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    threads = args.threads or len(os.sched_getaffinity(0)) or os.cpu_count() or 1
    prompts = build_prompts(tokenizer, spread(args.num_prompts, args.min_prompt_tokens, args.max_prompt_tokens))
    chat_prompts = build_prompts(tokenizer, [args.chat_prompt_tokens] * args.chat_requests, first_question=5)
    single = sorted(prompts, key=len)[len(prompts) // 2]  # the median-length prompt
    pad = tokenizer.eos_token_id
    work = {
        "model": model, "dtype": args.dtype, "threads": threads, "prefix_caching": args.prefix_caching,
        "kv_cache_mb": args.kv_cache_mb, "max_tokens": args.max_tokens, "chat_max_tokens": args.chat_max_tokens,
        "prompts": prompts, "chat_prompts": chat_prompts, "single_prompt": single, "pad_token_id": pad,
        "warmup_prompt": tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}])),
    }  # fmt: skip
    config = {
        "model": model, "dtype": args.dtype, "threads": threads, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_at_start": list(os.getloadavg()),
    }  # fmt: skip
    print(f"# model {Path(model).name}, dtype {args.dtype} (both systems), {threads} torch threads, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    systems: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kvbridge-bench-") as tmp:
        work_path = Path(tmp) / "work.json"
        work_path.write_text(json.dumps(work))
        for phase in PHASES:
            if phase == "transformers" and args.skip_transformers:
                continue
            systems[phase] = spawn_phase(phase, work_path, Path(tmp))
            if phase == "kvbridge":  # transformers runs in the dtype the engine really used
                work["dtype"] = systems[phase]["dtype"]
                work_path.write_text(json.dumps(work))
    config["dtype_requested"], config["dtype"] = args.dtype, work["dtype"]
    config["loadavg_at_end"] = list(os.getloadavg())
    config["versions"] = {k: v for sy in systems.values() for k, v in sy.get("versions", {}).items()}

    workload = {
        "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "prompt_tokens": [len(p) for p in prompts],
        "single_prompt_tokens": len(single), "chat_requests": args.chat_requests,
        "chat_target_tokens": args.chat_prompt_tokens, "chat_prompt_tokens": [len(p) for p in chat_prompts],
        "chat_max_tokens": args.chat_max_tokens, "prefix_caching": args.prefix_caching,
        "prompts_sha256": prompts_hash(prompts, chat_prompts), "greedy": True, "ignore_eos": True,
    }  # fmt: skip
    result = {
        "command": command_line(argv),
        "config": config,
        "workload": workload,
        "systems": systems,
        "reference": VLLM_REFERENCE,
        "summary": summarize(systems["kvbridge"], systems.get("transformers")),
    }
    table = render_table(result)
    result["table"] = table
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    png = out / "results.png"
    plotted = plot(result, png)
    print(table)
    print(f"# wrote {out / 'results.json'}" + (f" and {png}" if plotted else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
