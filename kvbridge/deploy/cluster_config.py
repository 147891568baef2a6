"""``cluster.yaml``: what ``kvbridge deploy k8s`` deploys, one dataclass per concern.

A minimal file::

    name: kvbridge
    namespace: llm
    image: registry.example.com/kvbridge:0.1.0
    profile: efa                  # or gb200; --profile overrides
    prefill: {replicas: 2, gpus: 1}
    decode:  {replicas: 1, gpus: 1, multinode: {nodes: 2}}
    engine:                       # the engine YAML, stored as a ConfigMap
      engine: {model: /models/llama-3.1-8b, device: cuda, dtype: bfloat16}
      cache_transceiver_config: {backend: DEFAULT}

Every value is checked when the object is built; a wrong one raises ``ConfigError`` with
the setting's path and what to write instead. The ``engine`` section is validated with
``kvbridge.config`` itself, so a deployment never ships an engine YAML the workers refuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvbridge.config import ConfigError, _build, config_from_dict

PROFILES = ("efa", "gb200")
MULTINODE_KINDS = ("leaderworkerset", "statefulset")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
CD_ALLOCATION_MODES = ("Single", "All")

# DNS-1035 label; kept short so that "<name>-decode-0-1" etc. still fit in 63 characters
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Variables whose value the profiles own: setting them by hand is how deployments go wrong.
NIXL_PLUGIN_DIR = "NIXL_PLUGIN_DIR"


def _quantity(value: str, path: str) -> str:
    if not _QUANTITY_RE.match(str(value)):
        raise ConfigError(f"{path} must be a Kubernetes quantity such as 8, 500m, 64Gi; not {value!r}")
    return str(value)


def _positive(value: int, path: str, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{path} must be >= {minimum}, not {value}")


def _env(env: Any, path: str) -> dict[str, str]:
    if not isinstance(env, dict):
        raise ConfigError(f"{path} must be a mapping of NAME: value")
    out: dict[str, str] = {}
    for k, v in env.items():
        if not isinstance(k, str) or not _ENV_NAME_RE.match(k):
            raise ConfigError(f"{path}: {k!r} is not a valid environment variable name")
        if isinstance(v, (dict, list)) or v is None:
            raise ConfigError(f"{path}.{k} must be a string, not {v!r}")
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _labels(labels: Any, path: str) -> dict[str, str]:
    if not isinstance(labels, dict) or not all(isinstance(k, str) for k in labels):
        raise ConfigError(f"{path} must be a mapping of label: value")
    return {k: str(v) for k, v in labels.items()}


# --------------------------------------------------------------------------- control plane


@dataclass
class EtcdConfig:
    """etcd: give ``endpoints`` of an existing cluster, or leave them out to deploy one."""

    endpoints: list[str] = field(default_factory=list)  # e.g. ["http://etcd.infra:2379"]
    image: str = "quay.io/coreos/etcd:v3.5.21"
    storage: str = ""  # PersistentVolumeClaim size; empty: emptyDir (leases are short-lived state)

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str):
            self.endpoints = [self.endpoints]
        if not isinstance(self.endpoints, list) or not all(isinstance(e, str) and e for e in self.endpoints):
            raise ConfigError("etcd.endpoints must be a list of URLs such as http://etcd.infra:2379")
        for e in self.endpoints:
            if not e.startswith(("http://", "https://")):
                raise ConfigError(f"etcd.endpoints: {e!r} must start with http:// or https://")
        if self.storage:
            _quantity(self.storage, "etcd.storage")

    @property
    def deploy(self) -> bool:
        return not self.endpoints


@dataclass
class NatsConfig:
    """NATS: give ``url`` of an existing server, or leave it out to deploy one."""

    url: str = ""  # e.g. nats://nats.infra:4222
    image: str = "nats:2.11-alpine"

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("nats://", "tls://")):
            raise ConfigError(f"nats.url {self.url!r} must start with nats:// or tls://")

    @property
    def deploy(self) -> bool:
        return not self.url


# --------------------------------------------------------------------------- components


@dataclass
class FrontendConfig:
    """The OpenAI-compatible frontend and router (``kvbridge serve``)."""

    replicas: int = 1
    port: int = 8000
    service_type: str = "ClusterIP"
    cpu: str = "2"
    memory: str = "4Gi"
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive(self.replicas, "frontend.replicas")
        if not 0 < self.port < 65536:
            raise ConfigError(f"frontend.port must be 1..65535, not {self.port}")
        if self.service_type not in SERVICE_TYPES:
            raise ConfigError(
                f"frontend.service_type must be one of {', '.join(SERVICE_TYPES)}, not {self.service_type!r}"
            )
        self.cpu = _quantity(self.cpu, "frontend.cpu")
        self.memory = _quantity(self.memory, "frontend.memory")
        self.env = _env(self.env, "frontend.env")


@dataclass
class WorkerConfig:
    """A pool of prefill or decode workers (``kvbridge worker --role ...``)."""

    replicas: int = 1
    gpus: int = 1  # nvidia.com/gpu per pod; 0 for a CPU-only deployment
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = "16Gi"  # /dev/shm for NCCL and CUDA IPC; empty: none
    env: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)

    role = "worker"  # class attribute, set by the subclasses

    def __post_init__(self) -> None:
        where = self.role
        _positive(self.replicas, f"{where}.replicas")
        _positive(self.gpus, f"{where}.gpus", minimum=0)
        self.cpu = _quantity(self.cpu, f"{where}.cpu")
        self.memory = _quantity(self.memory, f"{where}.memory")
        if self.shm_size:
            self.shm_size = _quantity(self.shm_size, f"{where}.shm_size")
        self.env = _env(self.env, f"{where}.env")
        self.node_selector = _labels(self.node_selector, f"{where}.node_selector")


@dataclass
class PrefillConfig(WorkerConfig):
    role = "prefill"

    def __post_init__(self) -> None:
        super().__post_init__()
        if NIXL_PLUGIN_DIR in self.env:
            raise ConfigError(
                "prefill.env sets NIXL_PLUGIN_DIR: the plugin-dir override belongs on the decode service "
                "only (decode.multinode.nixl_plugin_dir); on prefill it loads plugins that do not match "
                "its NIXL. Remove it from prefill.env."
            )


@dataclass
class MultinodeConfig:
    """One decode worker spanning several pods: a leader (rank 0) and ``nodes - 1`` workers."""

    nodes: int = 1  # pods per decode worker; 1: single-pod decode
    kind: str = "leaderworkerset"  # leaderworkerset (needs the LWS controller) | statefulset
    nixl_plugin_dir: str = ""  # NIXL_PLUGIN_DIR for the decode pods only

    def __post_init__(self) -> None:
        _positive(self.nodes, "decode.multinode.nodes")
        kind = str(self.kind).lower()
        if kind not in MULTINODE_KINDS:
            raise ConfigError(f"decode.multinode.kind must be one of {', '.join(MULTINODE_KINDS)}, not {self.kind!r}")
        self.kind = kind
        if self.nixl_plugin_dir and not self.nixl_plugin_dir.startswith("/"):
            raise ConfigError(
                f"decode.multinode.nixl_plugin_dir must be an absolute path, not {self.nixl_plugin_dir!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.nodes > 1


@dataclass
class DecodeConfig(WorkerConfig):
    multinode: MultinodeConfig = field(default_factory=MultinodeConfig)

    role = "decode"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.multinode.nixl_plugin_dir and NIXL_PLUGIN_DIR in self.env:
            raise ConfigError("set NIXL_PLUGIN_DIR once: decode.multinode.nixl_plugin_dir or decode.env, not both")


# --------------------------------------------------------------------------- profiles


@dataclass
class EfaConfig:
    """``--profile efa``: AWS Elastic Fabric Adapter (UCX over SRD)."""

    devices: int = 1  # vpc.amazonaws.com/efa per worker pod (p5.48xlarge has 32)
    hugepages_2mi: str = ""  # e.g. 5120Mi; empty: no hugepages

    def __post_init__(self) -> None:
        _positive(self.devices, "efa.devices")
        if self.hugepages_2mi:
            self.hugepages_2mi = _quantity(self.hugepages_2mi, "efa.hugepages_2mi")


@dataclass
class Gb200Config:
    """``--profile gb200``: GB200 NVL72 with the NVIDIA DRA driver's ComputeDomain (IMEX channels)."""

    compute_domain: str = ""  # ComputeDomain name; empty: "<name>-compute-domain"
    num_nodes: int = 0  # ComputeDomain spec.numNodes (0: recommended with DNS-named IMEX daemons)
    allocation_mode: str = "Single"  # channel.allocationMode: Single | All

    def __post_init__(self) -> None:
        _positive(self.num_nodes, "gb200.num_nodes", minimum=0)
        if self.allocation_mode not in CD_ALLOCATION_MODES:
            raise ConfigError(
                f"gb200.allocation_mode must be one of {', '.join(CD_ALLOCATION_MODES)}, not {self.allocation_mode!r}"
            )
        if self.compute_domain and not _NAMESPACE_RE.match(self.compute_domain):
            raise ConfigError(f"gb200.compute_domain {self.compute_domain!r} is not a valid Kubernetes name")


# --------------------------------------------------------------------------- root


@dataclass
class ClusterConfig:
    name: str = "kvbridge"  # prefix of every object's name
    namespace: str = "default"
    image: str = ""  # the kvbridge container image (required)
    image_pull_policy: str = "IfNotPresent"
    profile: str = ""  # "" | efa | gb200
    worker_port: int = 8081  # each worker's HTTP port (/health, metrics)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    prefill: PrefillConfig = field(default_factory=PrefillConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    efa: EfaConfig = field(default_factory=EfaConfig)
    gb200: Gb200Config = field(default_factory=Gb200Config)
    engine: dict[str, Any] = field(default_factory=dict)  # the engine YAML (kvbridge.config tree)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(str(self.name)):
            raise ConfigError(
                f"name {self.name!r} must be a lowercase DNS label of at most 40 characters (a-z, 0-9, '-'), "
                "starting with a letter"
            )
        if not _NAMESPACE_RE.match(str(self.namespace)):
            raise ConfigError(f"namespace {self.namespace!r} is not a valid Kubernetes namespace name")
        if not self.image:
            raise ConfigError(
                "image is required: the kvbridge container image, e.g. registry.example.com/kvbridge:0.1.0"
            )
        if self.image_pull_policy not in PULL_POLICIES:
            raise ConfigError(
                f"image_pull_policy must be one of {', '.join(PULL_POLICIES)}, not {self.image_pull_policy!r}"
            )
        self.profile = str(self.profile or "").lower()
        if self.profile and self.profile not in PROFILES:
            raise ConfigError(f"profile must be one of {', '.join(PROFILES)} (or left out), not {self.profile!r}")
        if not 0 < self.worker_port < 65536:
            raise ConfigError(f"worker_port must be 1..65535, not {self.worker_port}")
        self._check_engine()

    def _check_engine(self) -> None:
        if not isinstance(self.engine, dict):
            raise ConfigError("engine must be a mapping: the engine YAML (engine:, cache_transceiver_config:, ...)")
        model = (self.engine.get("engine") or {}).get("model") if isinstance(self.engine.get("engine"), dict) else None
        if not model:
            raise ConfigError(
                "engine.engine.model is required: the model's path inside the container image "
                "(a GGUF file or a Hugging Face folder), e.g. /models/llama-3.1-8b"
            )
        try:
            cfg = config_from_dict(self.engine)
        except ConfigError as e:
            raise ConfigError(f"engine (the engine YAML): {e}") from None
        if not cfg.cache_transceiver_config.enabled:
            raise ConfigError(
                "engine.cache_transceiver_config.backend is not set: disaggregated serving needs the KV "
                "transceiver; write backend: DEFAULT (NIXL over UCX), NIXL or UCX"
            )

    @property
    def multinode(self) -> bool:
        return self.decode.multinode.enabled

    @property
    def compute_domain_name(self) -> str:
        return self.gb200.compute_domain or f"{self.name}-compute-domain"


def cluster_config_from_dict(data: dict[str, Any], profile: str | None = None) -> ClusterConfig:
    """Build from a mapping; ``profile`` (from ``--profile``) overrides the file's."""
    data = dict(data or {})
    if profile is not None:
        data["profile"] = profile
    return _build(ClusterConfig, data, "")


def load_cluster_config(path: str | Path, profile: str | None = None) -> ClusterConfig:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"cluster config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cluster config {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"cluster config {p} must hold a mapping at the top")
    return cluster_config_from_dict(data, profile)
