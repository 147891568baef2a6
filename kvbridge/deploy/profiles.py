"""Hardware profiles: what a worker pod needs on AWS EFA, on GB200 NVL72, and as multinode decode.

Each rule lives here and nowhere else; ``k8s.py`` builds plain pods and calls ``apply_profile``.

- ``efa``: ``vpc.amazonaws.com/efa`` in requests and limits, a privileged container (EFA and
  GPUDirect RDMA need the device files and locked memory), ``FI_PROVIDER=efa``,
  ``FI_EFA_USE_DEVICE_RDMA=1``, ``FI_EFA_ENABLE_SHM_TRANSFER=0`` (libfabric's shared-memory path
  breaks NIXL's GPU buffer registrations), optional 2 MiB hugepages, and anti-affinity so that
  no two workers share a node (each worker gets the node's EFA devices).
- ``gb200``: one ComputeDomain (NVIDIA DRA driver) whose ResourceClaimTemplate every prefill and
  decode pod claims, so that they share IMEX channels over multi-node NVLink; plus
  ``NCCL_MNNVL_ENABLE=1``, ``NCCL_CUMEM_ENABLE=1``, ``NCCL_NVLS_ENABLE=1``. Without the claim NCCL
  fails with "unhandled system error" while the model loads.
- multinode decode: the ``NIXL_PLUGIN_DIR`` override goes on decode pods only, never on prefill.
"""

from __future__ import annotations

from typing import Any

from kvbridge.config import ConfigError
from kvbridge.deploy.cluster_config import NIXL_PLUGIN_DIR, ClusterConfig

EFA_RESOURCE = "vpc.amazonaws.com/efa"
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_ENABLE_SHM_TRANSFER": "0"}
GB200_ENV = {"NCCL_MNNVL_ENABLE": "1", "NCCL_CUMEM_ENABLE": "1", "NCCL_NVLS_ENABLE": "1"}
COMPUTE_DOMAIN_API = "resource.nvidia.com/v1beta1"
COMPUTE_DOMAIN_CLAIM = "compute-domain-channel"  # the pod-level claim name
WORKER_ROLES = ("prefill", "decode")


def set_env(container: dict[str, Any], name: str, value: str, why: str) -> None:
    """Set ``name`` on a container; a different value given by the user is an error, not overridden."""
    env = container.setdefault("env", [])
    for item in env:
        if item["name"] == name:
            if item.get("value") != value:
                raise ConfigError(
                    f"{container['name']} env sets {name}={item.get('value')!r}, but {why} needs {name}={value}"
                )
            return
    env.append({"name": name, "value": value})


def _add_resource(container: dict[str, Any], resource: str, amount: str) -> None:
    """Extended resources must appear in requests and limits with the same amount."""
    res = container.setdefault("resources", {})
    res.setdefault("requests", {})[resource] = amount
    res.setdefault("limits", {})[resource] = amount


def _efa(cfg: ClusterConfig, pod: dict[str, Any]) -> None:
    c = pod["containers"][0]
    _add_resource(c, EFA_RESOURCE, str(cfg.efa.devices))
    c.setdefault("securityContext", {})["privileged"] = True
    for name, value in EFA_ENV.items():
        set_env(c, name, value, "the efa profile")
    if cfg.efa.hugepages_2mi:
        _add_resource(c, "hugepages-2Mi", cfg.efa.hugepages_2mi)
        pod.setdefault("volumes", []).append({"name": "hugepages", "emptyDir": {"medium": "HugePages-2Mi"}})
        c.setdefault("volumeMounts", []).append({"name": "hugepages", "mountPath": "/dev/hugepages"})
    # one worker per node: every worker owns its node's EFA devices
    pod.setdefault("affinity", {})["podAntiAffinity"] = {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {
                "labelSelector": {
                    "matchExpressions": [
                        {"key": "app.kubernetes.io/instance", "operator": "In", "values": [cfg.name]},
                        {"key": "app.kubernetes.io/component", "operator": "In", "values": list(WORKER_ROLES)},
                    ]
                },
                "topologyKey": "kubernetes.io/hostname",
            }
        ]
    }


def _gb200(cfg: ClusterConfig, pod: dict[str, Any]) -> None:
    c = pod["containers"][0]
    pod.setdefault("resourceClaims", []).append(
        {"name": COMPUTE_DOMAIN_CLAIM, "resourceClaimTemplateName": compute_domain_claim_template(cfg)}
    )
    c.setdefault("resources", {}).setdefault("claims", []).append({"name": COMPUTE_DOMAIN_CLAIM})
    for name, value in GB200_ENV.items():
        set_env(c, name, value, "the gb200 profile")


def compute_domain_claim_template(cfg: ClusterConfig) -> str:
    """The ResourceClaimTemplate that the DRA driver creates for the ComputeDomain."""
    return f"{cfg.compute_domain_name}-channel"


def apply_profile(cfg: ClusterConfig, role: str, pod: dict[str, Any]) -> None:
    """Add the profile's rules to a worker's pod spec (``role``: prefill | decode)."""
    if role not in WORKER_ROLES:
        raise ValueError(f"profiles apply to workers only, not {role!r}")
    if cfg.profile == "efa":
        _efa(cfg, pod)
    elif cfg.profile == "gb200":
        _gb200(cfg, pod)
    plugin_dir = cfg.decode.multinode.nixl_plugin_dir
    if role == "decode" and plugin_dir:
        set_env(pod["containers"][0], NIXL_PLUGIN_DIR, plugin_dir, "decode.multinode.nixl_plugin_dir")


def profile_objects(cfg: ClusterConfig) -> list[dict[str, Any]]:
    """Objects a profile adds to the deployment (the gb200 ComputeDomain)."""
    if cfg.profile != "gb200":
        return []
    return [
        {
            "apiVersion": COMPUTE_DOMAIN_API,
            "kind": "ComputeDomain",
            "metadata": {
                "name": cfg.compute_domain_name,
                "namespace": cfg.namespace,
                "labels": {"app.kubernetes.io/name": "kvbridge", "app.kubernetes.io/instance": cfg.name},
            },
            "spec": {
                "numNodes": cfg.gb200.num_nodes,
                "channel": {
                    "allocationMode": cfg.gb200.allocation_mode,
                    "resourceClaimTemplate": {"name": compute_domain_claim_template(cfg)},
                },
            },
        }
    ]
