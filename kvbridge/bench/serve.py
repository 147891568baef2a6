"""`kvbridge bench serve`: one workload against aggregated and disaggregated serving.

For each target (by default: a single-process aggregated server, then the local
disaggregated cluster, each started here on free 127.0.0.1 ports and stopped by pid) and
each workload, it sends a bounded number of requests at a fixed concurrency (or rate) and
reports time to first token p50/p99, time per output token, request latency (E2E p50),
request and token throughput, and, for disaggregated serving, the KV transfer's share of
TTFT (from the frontend's /metrics). Results go to stdout, a JSON file and PNG plots.

Workloads:
  --prompt-tokens 512,2048 --output-tokens 64        random token ids (no prefix reuse)
  --chat                                              ~200-token chat prompts, 32 output
                                                      tokens, 8 concurrent (the vLLM comparison)

In a closed loop (a fixed number of streams, each sending its next request when the last one
ends) the cycle of a stream is set by throughput, so a target with shorter TPOT shows a longer
TTFT at the same req/s: a disaggregated cluster's prompts wait in the prefill worker's queue
where an aggregated server's decodes wait behind prompt chunks. Compare TTFT at concurrency 1
(``--concurrency 1``), and E2E and req/s under load.

On a shared VM one run can differ from the next by 10-20%: ``--rounds N`` measures every
target N times, each round on freshly started servers and the targets' order alternating,
and reports every round and, per target and workload, the round with the median req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from kvbridge.bench import out_folder

VLLM_REFERENCE = "vLLM 0.32 CPU build (reported in the issue): aggregated 4.4 req/s (TTFT p50 ~730 ms); disaggregated with NixlConnector 2.0 req/s (TTFT p50 686 ms, p99 2.5 s)"
TOPICS = [
    "the history of the printing press", "how tides work", "the rules of chess", "photosynthesis",
    "the water cycle", "how vaccines train the immune system", "the causes of the French Revolution",
    "how a CPU cache works", "the life cycle of stars", "why the sky is blue", "how bread rises",
    "plate tectonics", "the invention of the telephone", "how bees communicate", "compound interest",
    "the Roman aqueducts",
]  # fmt: skip


@dataclass
class Workload:
    name: str
    num_requests: int
    concurrency: int
    output_tokens: int
    prompt_tokens: int = 0  # token-id prompts of this length (0: chat prompts)
    rate: float = 0.0  # requests/s (0: closed loop at `concurrency`)


@dataclass
class Result:
    target: str
    workload: str
    num_ok: int
    num_failed: int
    seconds: float
    req_per_s: float
    out_tok_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_ms: float
    prompt_tokens_mean: float = float("nan")  # as the server counted them (chat: with the template)
    e2e_p50_ms: float = float("nan")  # request latency, first byte sent to last token
    transfer_share_of_ttft: float | None = None
    ttft_split_ms: dict[str, float] = field(default_factory=dict)
    round: int = 1  # with --rounds N: which of the N rounds measured this


# --------------------------------------------------------------------------- targets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `kvbridge serve` subprocess on a free port, stopped by its own pid."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = (log_dir / f"{name}.log").open("w")
        env = {**os.environ, "UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo")}
        cmd = [sys.executable, "-m", "kvbridge.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


# --------------------------------------------------------------------------- load


# Notes per chat prompt: ~200 prompt tokens as the server counts them (the chat template and
# the model's default system prompt included, as vLLM's usage counts them too); 150 made ~290.
CHAT_WORDS = 100


def chat_prompt(i: int, target_words: int = CHAT_WORDS) -> list[dict[str, str]]:
    topic = TOPICS[i % len(TOPICS)]
    context = " ".join(f"Note {j} about {topic}: keep the answer short and concrete." for j in range(target_words // 10))
    return [{"role": "user", "content": f"Request {i}. {context} Explain {topic} in two sentences."}]


async def one_request(client: httpx.AsyncClient, url: str, w: Workload, i: int, rng: random.Random) -> tuple[float, float, int, int] | None:
    """→ (ttft s, total s, output tokens, prompt tokens) or None on failure. Streams and times
    the first content."""
    if w.prompt_tokens:
        body = {"prompt": [rng.randrange(100, 40000) for _ in range(w.prompt_tokens)], "max_tokens": w.output_tokens}
        path = "/v1/completions"
    else:
        body = {"messages": chat_prompt(i), "max_tokens": w.output_tokens}
        path = "/v1/chat/completions"
    body |= {"stream": True, "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, prompt_tokens = None, 0, 0
    try:
        async with client.stream("POST", url + path, json=body, timeout=600) as r:
            if r.status_code != 200:
                return None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return None
                if chunk.get("usage"):
                    tokens, prompt_tokens = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
                if ttft is None and chunk.get("choices"):
                    ttft = time.perf_counter() - t0
    except httpx.HTTPError:
        return None
    if ttft is None:
        return None
    return ttft, time.perf_counter() - t0, tokens, prompt_tokens


async def run_load(url: str, w: Workload, seed: int = 0) -> tuple[list[tuple[float, float, int, int]], int, float]:
    rng = random.Random(seed)
    results: list[tuple[float, float, int, int]] = []
    failed = 0
    limits = httpx.Limits(max_connections=w.concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        sem = asyncio.Semaphore(w.concurrency)

        async def task(i: int) -> None:
            nonlocal failed
            async with sem:
                got = await one_request(client, url, w, i, rng)
            if got is None:
                failed += 1
            else:
                results.append(got)

        t0 = time.perf_counter()
        tasks = []
        for i in range(w.num_requests):
            tasks.append(asyncio.create_task(task(i)))
            if w.rate:
                await asyncio.sleep(rng.expovariate(w.rate))
        await asyncio.gather(*tasks)
        return results, failed, time.perf_counter() - t0


def ttft_split(url: str) -> dict[str, tuple[float, int]]:
    """Sum and count of the frontend's TTFT components (empty for an aggregated server)."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[str, list[float]] = {}
    for m in re.finditer(r'^kvbridge_ttft_part_seconds_(sum|count)\{part="(\w+)"\}\s+(\S+)', text, re.M):
        kind, comp, value = m.groups()
        out.setdefault(comp, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def summarize(target: str, w: Workload, runs: list[tuple[float, float, int, int]], failed: int, seconds: float,
              before: dict, after: dict) -> Result:  # fmt: skip
    ttfts = sorted(r[0] for r in runs) or [float("nan")]
    tpots = [(r[1] - r[0]) / (r[2] - 1) for r in runs if r[2] > 1]
    out_tokens = sum(r[2] for r in runs)
    split = {}
    for comp, (s, n) in after.items():
        s0, n0 = before.get(comp, (0.0, 0))
        if n - n0 > 0:
            split[comp] = 1000 * (s - s0) / (n - n0)
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    ttft_mean_ms = 1000 * statistics.fmean(ttfts) if runs else float("nan")
    share = split["transfer"] / ttft_mean_ms if "transfer" in split and runs else None
    return Result(
        target=target, workload=w.name, num_ok=len(runs), num_failed=failed, seconds=seconds,
        req_per_s=len(runs) / seconds, out_tok_per_s=out_tokens / seconds,
        ttft_p50_ms=1000 * statistics.median(ttfts), ttft_p99_ms=1000 * p99,
        tpot_ms=1000 * statistics.fmean(tpots) if tpots else float("nan"),
        prompt_tokens_mean=statistics.fmean(r[3] for r in runs) if runs else float("nan"),
        e2e_p50_ms=1000 * statistics.median(r[1] for r in runs) if runs else float("nan"),
        transfer_share_of_ttft=share, ttft_split_ms=split,
    )  # fmt: skip


# --------------------------------------------------------------------------- report


def print_table(results: list[Result], rounds: int = 1, spread: list[Result] | None = None) -> None:
    """One row per result (its round after the target when ``rounds`` > 1); ``spread``: every
    round's results, whose req/s are listed under each row."""
    head = f"{'target':<17} {'workload':<22} {'in tok':>6} {'ok':>4} {'fail':>4} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT ms':>8} {'E2E p50':>9} {'KV xfer/TTFT':>12}"
    print(head)
    print("-" * len(head))
    for r in results:
        share = f"{100 * r.transfer_share_of_ttft:.1f}%" if r.transfer_share_of_ttft is not None else "-"
        target = f"{r.target} #{r.round}" if rounds > 1 else r.target
        print(f"{target:<17} {r.workload:<22} {r.prompt_tokens_mean:>6.0f} {r.num_ok:>4} {r.num_failed:>4} {r.req_per_s:>7.2f} {r.out_tok_per_s:>8.1f} "
              f"{r.ttft_p50_ms:>8.0f}ms {r.ttft_p99_ms:>8.0f}ms {r.tpot_ms:>8.1f} {r.e2e_p50_ms:>8.0f}ms {share:>12}")  # fmt: skip
        if r.ttft_split_ms:
            print(" " * 18 + "TTFT split (mean ms): " + ", ".join(f"{k} {v:.1f}" for k, v in r.ttft_split_ms.items()))
        if spread:
            same = [x.req_per_s for x in spread if (x.target, x.workload) == (r.target, r.workload)]
            print(" " * 18 + f"req/s by round: {', '.join(f'{v:.2f}' for v in same)} (min {min(same):.2f}, max {max(same):.2f})")


def plot(results: list[Result], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    workloads = list(dict.fromkeys(r.workload for r in results))
    targets = list(dict.fromkeys(r.target for r in results))
    for metric, label in (("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"), ("req_per_s", "requests/s")):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / max(1, len(targets))
        for j, t in enumerate(targets):
            vals = [next((getattr(r, metric) for r in results if r.target == t and r.workload == w), 0) for w in workloads]
            ax.bar([i + j * width for i in range(len(workloads))], vals, width, label=t)
        ax.set_xticks([i + width * (len(targets) - 1) / 2 for i in range(len(workloads))], workloads)
        ax.set_ylabel(label)
        ax.legend()
        fig.tight_layout()
        path = out / f"serve_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


# --------------------------------------------------------------------------- main


def measure(name: str, how: list[str] | str, workloads: list[Workload], out: Path, rnd: int, rounds: int) -> list[Result]:
    """Every workload against one target: a running server's URL, or `kvbridge serve` flags
    (started here, warmed up, and stopped by pid afterwards)."""
    server = None
    if isinstance(how, str):
        url = how
    else:
        print(f"starting {name}: kvbridge serve {' '.join(how)}", flush=True)
        server = Server(name if rounds == 1 else f"{name}-round{rnd}", how, out)  # its log: <name>.log
        server.wait_ready()
        url = server.url
    results = []
    try:
        asyncio.run(run_load(url, Workload("warm-up", 4, 2, 4, 64)))
        for w in workloads:
            before = ttft_split(url)
            runs, failed, seconds = asyncio.run(run_load(url, w))
            r = summarize(name, w, runs, failed, seconds, before, ttft_split(url))
            r.round = rnd
            results.append(r)
            print_table([r], rounds)
    finally:
        if server:
            server.stop()
    return results


def median_rounds(results: list[Result]) -> list[Result]:
    """For each (target, workload), the round whose req/s is the median (the lower of the
    two middle ones for an even count): one measured round, not a blend of several."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.target, r.workload), []).append(r)
    return [sorted(g, key=lambda r: r.req_per_s)[(len(g) - 1) // 2] for g in groups.values()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvbridge bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="aggregated,disaggregated", help="which to start and measure (comma list)")
    p.add_argument("--url", action="append", default=[], metavar="NAME=URL", help="measure a running server instead (repeatable)")
    p.add_argument("--prompt-tokens", default="512,2048", help="token-id prompt lengths (comma list); empty: none")
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.0, help="requests/s (default: closed loop at --concurrency)")
    p.add_argument("--chat", action="store_true", help="also the vLLM comparison: ~200-token chats, 32 out, 8 concurrent")
    p.add_argument("--chat-requests", type=int, default=48)
    p.add_argument("--serve-args", default="", help="extra flags for both `kvbridge serve` commands")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every target this many times, each round on freshly started servers, the "
                        "targets' order alternating; reports each round and the median round (1)")  # fmt: skip
    p.add_argument("--out", type=out_folder, default="bench_out/serve")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    print("command:", "kvbridge bench serve " + " ".join(argv if argv is not None else sys.argv[3:]))
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    workloads = [Workload(f"{n} in/{a.output_tokens} out", a.num_requests, a.concurrency, a.output_tokens, int(n), a.rate)
                 for n in a.prompt_tokens.split(",") if n.strip()]  # fmt: skip
    if a.chat:
        workloads.append(Workload("chat ~200 in/32 out c8", a.chat_requests, 8, 32))
    extra = a.serve_args.split()
    plans: list[tuple[str, list[str] | str]] = [tuple(u.split("=", 1)) for u in a.url]  # type: ignore[misc]
    if not plans:
        for t in a.targets.split(","):
            plans.append((t, ["--aggregated", *extra] if t == "aggregated" else extra))
    if a.rounds < 1:
        raise SystemExit("kvbridge bench serve: --rounds must be at least 1")
    results: list[Result] = []
    for rnd in range(1, a.rounds + 1):
        if a.rounds > 1:
            print(f"round {rnd} of {a.rounds}", flush=True)
        for name, how in plans if rnd % 2 else plans[::-1]:  # alternate: neither target always goes first
            results.extend(measure(name, how, workloads, out, rnd, a.rounds))
    print()
    print_table(results, a.rounds)
    summary = median_rounds(results)
    if a.rounds > 1:
        print(f"\nmedian of {a.rounds} rounds (the round with the median req/s of each target and workload; req/s of every round):")
        print_table(summary, spread=results)
    if a.chat:
        print(VLLM_REFERENCE)
    (out / "serve.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    for f in plot(summary, out):
        print("plot:", f)
    print("json:", out / "serve.json")
    return 0 if all(r.num_failed == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
