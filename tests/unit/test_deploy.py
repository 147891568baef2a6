"""`kvbridge deploy k8s`: every generated manifest passes schema validation, and each profile rule holds.

Validation is done by libraries, not by hand:
- built-in kinds: ``kubernetes-validate`` (the Kubernetes OpenAPI schemas as JSON Schema, bundled in
  the wheel, so it runs offline), in strict mode: unknown fields are errors;
- custom resources (ComputeDomain, LeaderWorkerSet): ``jsonschema`` against the CRD schemas shipped in
  kvbridge/deploy/schemas/, and the LeaderWorkerSet's pod templates against the Kubernetes schema of
  PodTemplateSpec through ``kubernetes-validate``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kvbridge.config import ConfigError, config_from_dict
from kvbridge.deploy import cli
from kvbridge.deploy.cluster_config import cluster_config_from_dict
from kvbridge.deploy.k8s import ENGINE_FILE, ENGINE_PATH, manifests, to_yaml
from kvbridge.deploy.profiles import COMPUTE_DOMAIN_CLAIM, EFA_ENV, EFA_RESOURCE, GB200_ENV

K8S_VERSION = "1.34"  # resource.k8s.io/v1 (DRA) is GA from 1.34; the NVIDIA DRA driver needs >= 1.32
SCHEMAS = Path(__file__).resolve().parents[2] / "kvbridge" / "deploy" / "schemas"
CRD_SCHEMAS = {
    "ComputeDomain": "computedomain-resource-v1beta1.json",
    "LeaderWorkerSet": "leaderworkerset-leaderworkerset-v1.json",
}
PLUGIN_DIR = "/opt/nvidia/nixl/lib/plugins"

BASE: dict[str, Any] = {
    "name": "kvb",
    "namespace": "llm",
    "image": "registry.example.com/kvbridge:0.1.0",
    "prefill": {"replicas": 2, "gpus": 1},
    "decode": {"replicas": 2, "gpus": 4},
    "efa": {"devices": 4},
    "engine": {
        "engine": {"model": "/models/llama-3.1-8b", "device": "cuda", "dtype": "bfloat16"},
        "cache_transceiver_config": {"backend": "DEFAULT", "max_tokens_in_buffer": 8192},
    },
}


def make(profile: str | None = None, multinode: str | None = None, **top: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    if profile:
        data["profile"] = profile
    if multinode:
        data["decode"]["multinode"] = {"nodes": 2, "kind": multinode, "nixl_plugin_dir": PLUGIN_DIR}
    data.update(top)
    return data


def objects(data: dict[str, Any]) -> list[dict[str, Any]]:
    return manifests(cluster_config_from_dict(data))


# --------------------------------------------------------------------------- schema validation


def validate(obj: dict[str, Any]) -> None:
    """Raise if ``obj`` does not validate against its Kubernetes or CRD schema."""
    kind = obj["kind"]
    if kind in CRD_SCHEMAS:
        schema = json.loads((SCHEMAS / CRD_SCHEMAS[kind]).read_text())
        jsonschema.Draft202012Validator(schema).validate(obj)
        for tmpl in pod_template_specs(obj):  # LeaderWorkerSet: the embedded PodTemplateSpecs
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tmpl}
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def pod_template_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "LeaderWorkerSet":
        lwt = obj["spec"]["leaderWorkerTemplate"]
        return [lwt["leaderTemplate"], lwt["workerTemplate"]]
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return [obj["spec"]["template"]]
    return []


def pods(objs: list[dict[str, Any]], component: str | None = None) -> Iterator[dict[str, Any]]:
    """Pod specs of every workload (each LWS template counts), optionally of one component."""
    for obj in objs:
        for tmpl in pod_template_specs(obj):
            if component is None or tmpl["metadata"]["labels"]["app.kubernetes.io/component"] == component:
                yield tmpl["spec"]


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}


CASES = {
    "plain": make(),
    "efa": make("efa", efa={"devices": 4, "hugepages_2mi": "5120Mi"}),
    "gb200": make("gb200"),
    "efa-multinode-lws": make("efa", "leaderworkerset"),
    "efa-multinode-statefulset": make("efa", "statefulset"),
    "gb200-multinode-lws": make("gb200", "leaderworkerset"),
    "gb200-multinode-statefulset": make("gb200", "statefulset"),
    "external-control-plane": make(
        etcd={"endpoints": ["http://etcd.infra:2379"]}, nats={"url": "nats://nats.infra:4222"}
    ),
    "etcd-pvc": make(etcd={"storage": "1Gi"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_manifest_passes_schema_validation(case: str) -> None:
    objs = objects(CASES[case])
    assert objs
    for obj in objs:
        validate(obj)
    # the YAML written is the same objects
    assert list(yaml.safe_load_all(to_yaml(objs))) == objs


def test_validation_is_real() -> None:
    """The validators reject broken objects: a typo'd field (strict) and a wrong type."""
    objs = objects(make("efa", "leaderworkerset"))
    dep = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    dep = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    lws = copy.deepcopy(next(o for o in objs if o["kind"] == "LeaderWorkerSet"))
    lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["ports"] = [{"containerPort": "x"}]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(lws)
    lws = copy.deepcopy(next(o for o in objs if o["kind"] == "LeaderWorkerSet"))
    lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError):
        validate(lws)
    cd = next(o for o in objects(make("gb200")) if o["kind"] == "ComputeDomain")
    cd = copy.deepcopy(cd)
    del cd["spec"]["channel"]["resourceClaimTemplate"]
    with pytest.raises(jsonschema.ValidationError):
        validate(cd)


# --------------------------------------------------------------------------- the whole deployment


def test_deployment_has_every_part() -> None:
    objs = objects(make())
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert kinds == {
        ("ConfigMap", "kvb-engine"),
        ("Service", "kvb-etcd"),
        ("StatefulSet", "kvb-etcd"),
        ("Service", "kvb-nats"),
        ("Deployment", "kvb-nats"),
        ("Deployment", "kvb-prefill"),
        ("Deployment", "kvb-decode"),
        ("Service", "kvb-frontend"),
        ("Deployment", "kvb-frontend"),
    }
    assert all(o["metadata"]["namespace"] == "llm" for o in objs)
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    assert by_name["Deployment", "kvb-prefill"]["spec"]["replicas"] == 2
    assert by_name["Deployment", "kvb-decode"]["spec"]["replicas"] == 2


def test_commands_config_and_probes() -> None:
    objs = objects(make())
    for role in ("prefill", "decode"):
        (pod,) = pods(objs, role)
        cmd = pod["containers"][0]["command"]
        assert cmd[:6] == ["kvbridge", "worker", "--role", role, "--config", ENGINE_PATH]
        assert cmd[cmd.index("--etcd") + 1] == "http://kvb-etcd.llm.svc:2379"
        assert cmd[cmd.index("--nats") + 1] == "nats://kvb-nats.llm.svc:4222"
        mounts = pod["containers"][0]["volumeMounts"]
        assert any(m["mountPath"] == "/etc/kvbridge" for m in mounts)
        assert {"name": "engine-config", "configMap": {"name": "kvb-engine"}} in pod["volumes"]
    (fe,) = pods(objs, "frontend")
    cmd = fe["containers"][0]["command"]
    # the frontend reads the workers' engine config: it tokenizes with the model they serve
    assert cmd[:4] == ["kvbridge", "serve", "--config", ENGINE_PATH]
    assert any(m["mountPath"] == "/etc/kvbridge" for m in fe["containers"][0]["volumeMounts"])
    assert {"name": "engine-config", "configMap": {"name": "kvb-engine"}} in fe["volumes"]
    assert cmd[cmd.index("--etcd") + 1] == "http://kvb-etcd.llm.svc:2379"
    assert cmd[cmd.index("--nats") + 1] == "nats://kvb-nats.llm.svc:4222"
    # probes on /health and resource requests on every kvbridge pod
    for comp in ("frontend", "prefill", "decode"):
        for pod in pods(objs, comp):
            c = pod["containers"][0]
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"]["path"] == "/health", (comp, probe)
            assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    for comp in ("prefill", "decode"):
        (pod,) = pods(objs, comp)
        res = pod["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    # the engine YAML in the ConfigMap is what kvbridge.config reads back
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    engine = yaml.safe_load(cm["data"][ENGINE_FILE])
    assert engine == BASE["engine"]
    assert config_from_dict(engine).cache_transceiver_config.backend == "DEFAULT"


def test_existing_etcd_and_nats_are_used_not_deployed() -> None:
    objs = objects(CASES["external-control-plane"])
    comps = {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in objs}
    assert "etcd" not in comps and "nats" not in comps
    for comp in ("frontend", "prefill", "decode"):
        (pod,) = pods(objs, comp)
        cmd = pod["containers"][0]["command"]
        assert cmd[cmd.index("--etcd") + 1] == "http://etcd.infra:2379"
        assert cmd[cmd.index("--nats") + 1] == "nats://nats.infra:4222"


# --------------------------------------------------------------------------- profile rules


@pytest.mark.parametrize("case", ["efa", "efa-multinode-lws", "efa-multinode-statefulset"])
def test_efa_profile_rules(case: str) -> None:
    objs = objects(CASES[case])
    for role in ("prefill", "decode"):
        worker_pods = list(pods(objs, role))
        assert worker_pods
        for pod in worker_pods:
            c = pod["containers"][0]
            assert c["resources"]["requests"][EFA_RESOURCE] == "4"
            assert c["resources"]["limits"][EFA_RESOURCE] == "4"
            assert c["securityContext"]["privileged"] is True
            env = env_of(pod)
            assert env["FI_PROVIDER"] == "efa"
            assert env["FI_EFA_USE_DEVICE_RDMA"] == "1"
            assert env["FI_EFA_ENABLE_SHM_TRANSFER"] == "0"
            (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert term["topologyKey"] == "kubernetes.io/hostname"
            exprs = {e["key"]: e["values"] for e in term["labelSelector"]["matchExpressions"]}
            assert set(exprs["app.kubernetes.io/component"]) == {"prefill", "decode"}
            assert exprs["app.kubernetes.io/instance"] == ["kvb"]
    for comp in ("frontend", "etcd", "nats"):
        for pod in pods(objs, comp):
            assert EFA_RESOURCE not in pod["containers"][0]["resources"].get("requests", {})
            assert not set(EFA_ENV) & set(env_of(pod))


def test_efa_hugepages_optional() -> None:
    with_hp = objects(CASES["efa"])
    for role in ("prefill", "decode"):
        (pod,) = pods(with_hp, role)
        res = pod["containers"][0]["resources"]
        assert res["requests"]["hugepages-2Mi"] == res["limits"]["hugepages-2Mi"] == "5120Mi"
        assert {"name": "hugepages", "emptyDir": {"medium": "HugePages-2Mi"}} in pod["volumes"]
    without = objects(make("efa"))
    for pod in pods(without):
        assert "hugepages-2Mi" not in pod["containers"][0]["resources"].get("requests", {})


def test_efa_refuses_shm_transfer_left_on() -> None:
    data = make("efa")
    data["decode"]["env"] = {"FI_EFA_ENABLE_SHM_TRANSFER": "1"}
    with pytest.raises(ConfigError, match="FI_EFA_ENABLE_SHM_TRANSFER"):
        objects(data)


@pytest.mark.parametrize("case", ["gb200", "gb200-multinode-lws", "gb200-multinode-statefulset"])
def test_gb200_profile_rules(case: str) -> None:
    objs = objects(CASES[case])
    (cd,) = [o for o in objs if o["kind"] == "ComputeDomain"]
    assert cd["apiVersion"] == "resource.nvidia.com/v1beta1"
    assert objs.index(cd) == 0  # created before any pod claims its template
    template = cd["spec"]["channel"]["resourceClaimTemplate"]["name"]
    for role in ("prefill", "decode"):
        worker_pods = list(pods(objs, role))
        assert worker_pods
        for pod in worker_pods:
            assert {"name": COMPUTE_DOMAIN_CLAIM, "resourceClaimTemplateName": template} in pod["resourceClaims"]
            assert {"name": COMPUTE_DOMAIN_CLAIM} in pod["containers"][0]["resources"]["claims"]
            env = env_of(pod)
            for name, value in GB200_ENV.items():
                assert env[name] == value == "1"
            assert "vpc.amazonaws.com/efa" not in pod["containers"][0]["resources"]["requests"]
    for pod in pods(objs, "frontend"):
        assert "resourceClaims" not in pod


def test_no_profile_adds_nothing() -> None:
    objs = objects(make())
    assert not [o for o in objs if o["kind"] == "ComputeDomain"]
    for pod in pods(objs):
        assert "resourceClaims" not in pod and "affinity" not in pod
        assert not pod["containers"][0].get("securityContext")


# --------------------------------------------------------------------------- multinode decode


@pytest.mark.parametrize(
    "case", ["efa-multinode-lws", "efa-multinode-statefulset", "gb200-multinode-lws", "gb200-multinode-statefulset"]
)
def test_multinode_plugin_dir_on_decode_only(case: str) -> None:
    objs = objects(CASES[case])
    decode_pods = list(pods(objs, "decode"))
    assert len(decode_pods) >= 2  # leader and worker templates, or one StatefulSet per decode replica
    for pod in decode_pods:
        assert env_of(pod)["NIXL_PLUGIN_DIR"] == PLUGIN_DIR
    prefill_pods = list(pods(objs, "prefill"))
    assert prefill_pods
    for pod in prefill_pods:
        assert "NIXL_PLUGIN_DIR" not in env_of(pod)
    for comp in ("frontend", "etcd", "nats"):
        for pod in pods(objs, comp):
            assert "NIXL_PLUGIN_DIR" not in env_of(pod)


def test_multinode_leaderworkerset_shape() -> None:
    objs = objects(CASES["efa-multinode-lws"])
    (lws,) = [o for o in objs if o["kind"] == "LeaderWorkerSet"]
    assert lws["spec"]["replicas"] == 2
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2
    for key, role in (("leaderTemplate", "leader"), ("workerTemplate", "worker")):
        assert lwt[key]["metadata"]["labels"]["kvbridge.io/node-role"] == role
        cmd = lwt[key]["spec"]["containers"][0]["command"]
        assert cmd[cmd.index("--num-nodes") + 1] == "2"
        assert cmd[cmd.index("--node-rank") + 1] == "$(LWS_WORKER_INDEX)"
        assert cmd[cmd.index("--leader-address") + 1] == "$(LWS_LEADER_ADDRESS)"
    assert not [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "kvb-decode"]


def test_multinode_statefulset_shape() -> None:
    objs = objects(CASES["efa-multinode-statefulset"])
    groups = [o for o in objs if o["kind"] == "StatefulSet" and "decode" in o["metadata"]["name"]]
    assert [g["metadata"]["name"] for g in groups] == ["kvb-decode-0", "kvb-decode-1"]
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    for sts in groups:
        name = sts["metadata"]["name"]
        svc = services[name]
        assert svc["spec"]["clusterIP"] == "None"  # headless: stable DNS for the leader
        assert sts["spec"]["serviceName"] == name
        assert sts["spec"]["replicas"] == 2
        assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
        cmd = sts["spec"]["template"]["spec"]["containers"][0]["command"]
        assert cmd[cmd.index("--leader-address") + 1] == f"{name}-0.{name}.llm.svc"


# --------------------------------------------------------------------------- bad cluster.yaml


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": ""}, "image is required"),
        ({"profile": "azure"}, "profile must be one of efa, gb200"),
        ({"name": "Bad_Name"}, "lowercase DNS label"),
        ({"prefill": {"env": {"NIXL_PLUGIN_DIR": "/opt/x"}}}, "belongs on the decode service only"),
        ({"prefill": {"multinode": {"nodes": 2}}}, "unknown setting 'prefill.multinode'"),
        ({"decode": {"memory": "lots"}}, "decode.memory must be a Kubernetes quantity"),
        ({"decode": {"multinode": {"nodes": 2, "kind": "deployment"}}}, "decode.multinode.kind must be one of"),
        ({"decode": {"replicas": "two"}}, "decode.replicas must be an integer"),
        ({"etcd": {"endpoints": ["etcd:2379"]}}, "must start with http"),
        ({"gb200": {"allocation_mode": "Some"}}, "gb200.allocation_mode"),
        (
            {"engine": {"engine": {"device": "cuda"}, "cache_transceiver_config": {"backend": "DEFAULT"}}},
            "engine.engine.model is required",
        ),
        (
            {"engine": {"engine": {"model": "/m", "dtype": "fp8"}, "cache_transceiver_config": {"backend": "DEFAULT"}}},
            "engine.dtype must be one of",
        ),
        ({"engine": {"engine": {"model": "/m"}}}, "cache_transceiver_config.backend is not set"),
        ({"frontned": {}}, "unknown setting 'frontned'"),
    ],
)
def test_bad_cluster_config_is_a_clear_error(change: dict[str, Any], message: str) -> None:
    data = copy.deepcopy(BASE)
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        cluster_config_from_dict(data)


# --------------------------------------------------------------------------- CLI


def test_cli_writes_manifests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(make(multinode="leaderworkerset")))
    out = tmp_path / "out"
    assert cli.main(["k8s", "--config", str(config), "--profile", "gb200", "--out", str(out)]) == 0
    files = sorted(out.glob("*.yaml"))
    assert files[0].name == "00-computedomain-kvb-compute-domain.yaml"
    written = [yaml.safe_load(f.read_text()) for f in files]
    assert {o["kind"] for o in written} >= {"ComputeDomain", "ConfigMap", "LeaderWorkerSet", "Deployment", "Service"}
    for obj in written:
        validate(obj)
    assert "kubectl apply" in capsys.readouterr().out


def test_cli_stdout_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(make("efa")))
    assert cli.main(["k8s", "--config", str(config)]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert any(d["kind"] == "Deployment" and d["metadata"]["name"] == "kvb-prefill" for d in docs)

    config.write_text("image: x\nprefill: [1, 2]\n")
    assert cli.main(["k8s", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "prefill must be a mapping" in err and "\n" == err[-1] and err.count("\n") == 1

    assert cli.main(["k8s", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cluster config not found" in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:
        cli.main(["k8s", "--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["k8s", "--config", str(config), "--profile", "tpu"])
    assert e.value.code == 2
