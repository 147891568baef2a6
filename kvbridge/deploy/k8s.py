"""Kubernetes manifests for a whole kvbridge deployment, as plain dicts.

    manifests(cfg) -> [ComputeDomain?, ConfigMap, etcd, NATS, prefill, decode, frontend]

Objects are listed in the order ``kubectl apply`` should see them. Every pod has readiness and
liveness probes on ``/health``; workers also get a startup probe, because loading a large model
takes minutes. Hardware rules (EFA, GB200, the multinode plugin-dir override) are added by
``profiles.apply_profile``; this module builds the plain pods.

Workers and the frontend find etcd and NATS through the flags below; with ``etcd.endpoints`` or
``nats.url`` in cluster.yaml the existing services are used and none is deployed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kvbridge.deploy.cluster_config import ClusterConfig, WorkerConfig
from kvbridge.deploy.profiles import apply_profile, profile_objects

ENGINE_DIR = "/etc/kvbridge"
ENGINE_FILE = "engine.yaml"
ENGINE_PATH = f"{ENGINE_DIR}/{ENGINE_FILE}"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
NATS_PORT = 4222
NATS_MONITOR_PORT = 8222
GPU_RESOURCE = "nvidia.com/gpu"
LWS_API = "leaderworkerset.x-k8s.io/v1"
NODE_ROLE_LABEL = "kvbridge.io/node-role"  # multinode decode: leader | worker
DECODE_GROUP_LABEL = "kvbridge.io/decode-group"  # multinode decode on StatefulSets: group index
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"  # set by the StatefulSet controller (k8s >= 1.28)

Obj = dict[str, Any]


# --------------------------------------------------------------------------- names and helpers


def labels(cfg: ClusterConfig, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kvbridge",
        "app.kubernetes.io/instance": cfg.name,
        "app.kubernetes.io/component": component,
    }


def selector(cfg: ClusterConfig, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": cfg.name, "app.kubernetes.io/component": component}


def _meta(cfg: ClusterConfig, name: str, component: str) -> Obj:
    return {"name": name, "namespace": cfg.namespace, "labels": labels(cfg, component)}


def etcd_endpoints(cfg: ClusterConfig) -> str:
    if cfg.etcd.endpoints:
        return ",".join(cfg.etcd.endpoints)
    return f"http://{cfg.name}-etcd.{cfg.namespace}.svc:{ETCD_CLIENT_PORT}"


def nats_url(cfg: ClusterConfig) -> str:
    return cfg.nats.url or f"nats://{cfg.name}-nats.{cfg.namespace}.svc:{NATS_PORT}"


def _probes(port: int | str, startup: bool) -> Obj:
    """Fresh dicts every call (no shared objects, so the YAML has no anchors)."""

    def http(period: int, failures: int) -> Obj:
        return {
            "httpGet": {"path": "/health", "port": port},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    probes = {"readinessProbe": http(5, 3), "livenessProbe": http(10, 6)}
    if startup:
        probes["startupProbe"] = http(10, 90)  # up to 15 minutes to load the model
    return probes


def _env_list(env: dict[str, str]) -> list[Obj]:
    return [{"name": k, "value": v} for k, v in env.items()]


# --------------------------------------------------------------------------- engine config


def engine_configmap(cfg: ClusterConfig) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(cfg, f"{cfg.name}-engine", "engine-config"),
        "data": {ENGINE_FILE: yaml.safe_dump(cfg.engine, sort_keys=False)},
    }


# --------------------------------------------------------------------------- etcd and NATS


def etcd_objects(cfg: ClusterConfig) -> list[Obj]:
    """A single-member etcd (worker leases only: short-lived state) behind a headless Service."""
    if not cfg.etcd.deploy:
        return []
    name = f"{cfg.name}-etcd"
    peer = f"http://$(POD_NAME).{name}.{cfg.namespace}.svc"
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cfg, name, "etcd"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(cfg, "etcd"),
            "ports": [{"name": "client", "port": ETCD_CLIENT_PORT}, {"name": "peer", "port": ETCD_PEER_PORT}],
        },
    }
    container = {
        "name": "etcd",
        "image": cfg.etcd.image,
        "command": [
            "etcd",
            "--name=$(POD_NAME)",
            "--data-dir=/var/lib/etcd",
            f"--listen-client-urls=http://0.0.0.0:{ETCD_CLIENT_PORT}",
            f"--advertise-client-urls={peer}:{ETCD_CLIENT_PORT}",
            f"--listen-peer-urls=http://0.0.0.0:{ETCD_PEER_PORT}",
            f"--initial-advertise-peer-urls={peer}:{ETCD_PEER_PORT}",
            f"--initial-cluster={name}-0=http://{name}-0.{name}.{cfg.namespace}.svc:{ETCD_PEER_PORT}",
            "--initial-cluster-state=new",
        ],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [
            {"name": "client", "containerPort": ETCD_CLIENT_PORT},
            {"name": "peer", "containerPort": ETCD_PEER_PORT},
        ],
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}],
        **_probes(ETCD_CLIENT_PORT, startup=False),
    }
    spec: Obj = {
        "serviceName": name,
        "replicas": 1,
        "selector": {"matchLabels": selector(cfg, "etcd")},
        "template": {"metadata": {"labels": labels(cfg, "etcd")}, "spec": {"containers": [container]}},
    }
    if cfg.etcd.storage:
        spec["volumeClaimTemplates"] = [
            {
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": cfg.etcd.storage}}},
            }
        ]
    else:
        spec["template"]["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    statefulset = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(cfg, name, "etcd"), "spec": spec}
    return [service, statefulset]


def nats_objects(cfg: ClusterConfig) -> list[Obj]:
    if not cfg.nats.deploy:
        return []
    name = f"{cfg.name}-nats"
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cfg, name, "nats"),
        "spec": {
            "selector": selector(cfg, "nats"),
            "ports": [{"name": "client", "port": NATS_PORT}, {"name": "monitor", "port": NATS_MONITOR_PORT}],
        },
    }
    container = {
        "name": "nats",
        "image": cfg.nats.image,
        "args": [f"--port={NATS_PORT}", f"--http_port={NATS_MONITOR_PORT}"],
        "ports": [
            {"name": "client", "containerPort": NATS_PORT},
            {"name": "monitor", "containerPort": NATS_MONITOR_PORT},
        ],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": NATS_MONITOR_PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": NATS_MONITOR_PORT}, "periodSeconds": 10},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(cfg, name, "nats"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(cfg, "nats")},
            "template": {"metadata": {"labels": labels(cfg, "nats")}, "spec": {"containers": [container]}},
        },
    }
    return [service, deployment]


# --------------------------------------------------------------------------- frontend


def engine_mount() -> Obj:
    """Where workers and the frontend read the engine config (a fresh dict: YAML would
    write a shared one as an anchor and aliases)."""
    return {"name": "engine-config", "mountPath": ENGINE_DIR, "readOnly": True}


def engine_volume(cfg: ClusterConfig) -> Obj:
    """The engine ConfigMap as a pod volume (see ``engine_mount``)."""
    return {"name": "engine-config", "configMap": {"name": f"{cfg.name}-engine"}}


def frontend_objects(cfg: ClusterConfig) -> list[Obj]:
    fe = cfg.frontend
    name = f"{cfg.name}-frontend"
    container = {
        "name": "frontend",
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": [
            "kvbridge",
            "serve",
            "--config",  # the workers' engine config: the frontend tokenizes with the same model
            ENGINE_PATH,
            "--etcd",
            etcd_endpoints(cfg),
            "--nats",
            nats_url(cfg),
            "--host",
            "0.0.0.0",
            "--port",
            str(fe.port),
        ],
        "ports": [{"name": "http", "containerPort": fe.port}],
        "resources": {"requests": {"cpu": fe.cpu, "memory": fe.memory}, "limits": {"memory": fe.memory}},
        "volumeMounts": [engine_mount()],
        **_probes(fe.port, startup=False),
    }
    if fe.env:
        container["env"] = _env_list(fe.env)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(cfg, name, "frontend"),
        "spec": {
            "replicas": fe.replicas,
            "selector": {"matchLabels": selector(cfg, "frontend")},
            "template": {
                "metadata": {"labels": labels(cfg, "frontend")},
                "spec": {
                    "containers": [container],
                    "volumes": [engine_volume(cfg)],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cfg, name, "frontend"),
        "spec": {
            "type": fe.service_type,
            "selector": selector(cfg, "frontend"),
            "ports": [{"name": "http", "port": fe.port, "targetPort": "http"}],
        },
    }
    return [service, deployment]


# --------------------------------------------------------------------------- workers


def worker_pod_spec(
    cfg: ClusterConfig, role: str, extra_args: list[str] | None = None, extra_env: list[Obj] | None = None
) -> Obj:
    """The pod spec of one prefill or decode worker, with the profile's rules applied."""
    w: WorkerConfig = cfg.prefill if role == "prefill" else cfg.decode
    requests: dict[str, str] = {"cpu": w.cpu, "memory": w.memory}
    limits: dict[str, str] = {"cpu": w.cpu, "memory": w.memory}  # Guaranteed QoS: no CPU sharing
    if w.gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(w.gpus)
    container: Obj = {
        "name": role,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": [
            "kvbridge",
            "worker",
            "--role",
            role,
            "--config",
            ENGINE_PATH,
            "--etcd",
            etcd_endpoints(cfg),
            "--nats",
            nats_url(cfg),
            "--host",
            "0.0.0.0",
            "--port",
            str(cfg.worker_port),
            *(extra_args or []),
        ],
        "ports": [{"name": "http", "containerPort": cfg.worker_port}],
        "env": [*(extra_env or []), *_env_list(w.env)],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [engine_mount()],
        **_probes("http", startup=True),
    }
    pod: Obj = {
        "containers": [container],
        "terminationGracePeriodSeconds": 60,  # let in-flight transfers finish or release their blocks
        "volumes": [engine_volume(cfg)],
    }
    if w.shm_size:
        pod["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": w.shm_size}})
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    if w.node_selector:
        pod["nodeSelector"] = dict(w.node_selector)
    apply_profile(cfg, role, pod)
    if not container["env"]:
        del container["env"]
    return pod


def _deployment(cfg: ClusterConfig, role: str, replicas: int) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(cfg, f"{cfg.name}-{role}", role),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(cfg, role)},
            "template": {"metadata": {"labels": labels(cfg, role)}, "spec": worker_pod_spec(cfg, role)},
        },
    }


def prefill_objects(cfg: ClusterConfig) -> list[Obj]:
    return [_deployment(cfg, "prefill", cfg.prefill.replicas)]


def decode_objects(cfg: ClusterConfig) -> list[Obj]:
    if not cfg.multinode:
        return [_deployment(cfg, "decode", cfg.decode.replicas)]
    if cfg.decode.multinode.kind == "leaderworkerset":
        return [_decode_leaderworkerset(cfg)]
    return [obj for group in range(cfg.decode.replicas) for obj in _decode_statefulset(cfg, group)]


def _decode_leaderworkerset(cfg: ClusterConfig) -> Obj:
    """One LeaderWorkerSet: ``decode.replicas`` groups of ``nodes`` pods; the LWS controller injects
    LWS_LEADER_ADDRESS and LWS_WORKER_INDEX into every container."""
    n = cfg.decode.multinode.nodes
    rank_args = [
        "--num-nodes",
        str(n),
        "--node-rank",
        "$(LWS_WORKER_INDEX)",
        "--leader-address",
        "$(LWS_LEADER_ADDRESS)",
    ]

    def template(node_role: str) -> Obj:
        return {
            "metadata": {"labels": {**labels(cfg, "decode"), NODE_ROLE_LABEL: node_role}},
            "spec": worker_pod_spec(cfg, "decode", rank_args),
        }

    return {
        "apiVersion": LWS_API,
        "kind": "LeaderWorkerSet",
        "metadata": _meta(cfg, f"{cfg.name}-decode", "decode"),
        "spec": {
            "replicas": cfg.decode.replicas,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": n,
                "restartPolicy": "RecreateGroupOnPodRestart",  # a rank lost: the whole worker restarts
                "leaderTemplate": template("leader"),
                "workerTemplate": template("worker"),
            },
        },
    }


def _decode_statefulset(cfg: ClusterConfig, group: int) -> list[Obj]:
    """One decode worker as a StatefulSet of ``nodes`` pods; pod 0 is the leader, found through a
    headless Service; each pod's rank is its StatefulSet index."""
    n = cfg.decode.multinode.nodes
    name = f"{cfg.name}-decode-{group}"
    leader = f"{name}-0.{name}.{cfg.namespace}.svc"
    sel = {**selector(cfg, "decode"), DECODE_GROUP_LABEL: str(group)}
    rank_env = [
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}}
    ]
    rank_args = ["--num-nodes", str(n), "--node-rank", "$(NODE_RANK)", "--leader-address", leader]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cfg, name, "decode"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": sel,
            "ports": [{"name": "http", "port": cfg.worker_port}],
        },
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(cfg, name, "decode"),
        "spec": {
            "serviceName": name,
            "replicas": n,
            "podManagementPolicy": "Parallel",  # ranks start together and rendezvous at the leader
            "selector": {"matchLabels": sel},
            "template": {
                "metadata": {"labels": {**labels(cfg, "decode"), DECODE_GROUP_LABEL: str(group)}},
                "spec": worker_pod_spec(cfg, "decode", rank_args, rank_env),
            },
        },
    }
    return [service, statefulset]


# --------------------------------------------------------------------------- whole deployment


def manifests(cfg: ClusterConfig) -> list[Obj]:
    """Every object of the deployment, in apply order."""
    return [
        *profile_objects(cfg),
        engine_configmap(cfg),
        *etcd_objects(cfg),
        *nats_objects(cfg),
        *prefill_objects(cfg),
        *decode_objects(cfg),
        *frontend_objects(cfg),
    ]


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None  # the engine YAML reads as a block in the ConfigMap
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_NoAliasDumper.add_representer(str, _str_representer)


def to_yaml(objs: list[Obj]) -> str:
    """A multi-document YAML stream, ready for ``kubectl apply -f -``."""
    return yaml.dump_all(objs, Dumper=_NoAliasDumper, sort_keys=False, explicit_start=True)


def write_manifests(objs: list[Obj], out_dir: str | Path) -> list[Path]:
    """One file per object, numbered in apply order (``kubectl apply -f DIR`` applies them sorted)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, obj in enumerate(objs):
        path = out / f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(to_yaml([obj]))
        paths.append(path)
    return paths
