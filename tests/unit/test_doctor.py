"""`kvbridge doctor`: every environment trap and every missing-library case gives its finding.

The checks take their inputs as parameters, so an EFA node is a tmp /sys tree, a plugin that
needs a missing library is a tiny .so built here with gcc (or a copy of NIXL's real LIBFABRIC
plugin), a second NIXL is a fake libnixl.so in a directory on LD_LIBRARY_PATH, and etcd and
NATS are small servers on 127.0.0.1.
"""

from __future__ import annotations

import ctypes.util
import http.server
import importlib.util
import json
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from kvbridge import doctor
from kvbridge import doctor_checks as checks
from kvbridge import doctor_devices as devs
from kvbridge.config import CacheTransceiverConfig
from kvbridge.doctor_checks import Finding, Status
from kvbridge.doctor_net import check_etcd, check_nats
from kvbridge.transfer.probe import PluginStatus

HAS_NIXL = importlib.util.find_spec("nixl_cu12") is not None
needs_nixl = pytest.mark.skipif(not HAS_NIXL, reason="nixl-cu12 is not installed")


@pytest.fixture(autouse=True)
def _keep_ucx_env(monkeypatch):
    """probe.setup_ucx_log() sets UCX_LOG_FILE / UCX_PROTO_INFO in this process's environment;
    put them back afterwards so later tests' child processes do not inherit them."""
    monkeypatch.delenv("UCX_LOG_FILE", raising=False)
    monkeypatch.delenv("UCX_PROTO_INFO", raising=False)


def by_check(findings: list[Finding], check: str) -> Finding:
    hits = [f for f in findings if f.check == check]
    assert len(hits) == 1, (check, findings)
    return hits[0]


def fake_sysfs(tmp_path: Path, efa: tuple[str, ...] = (), net: tuple[str, ...] = ("lo", "eth0")) -> str:
    root = tmp_path / "sys"
    for name in net:
        (root / "class" / "net" / name).mkdir(parents=True)
    for name in efa:
        (root / "class" / "infiniband" / name).mkdir(parents=True)
    return str(root)


# --------------------------------------------------------------------------- EFA traps


def test_no_efa_gives_no_efa_findings(tmp_path):
    sysfs = fake_sysfs(tmp_path)
    out = devs.check_efa(devs.efa_devices(sysfs), [], {"FI_EFA_ENABLE_SHM_TRANSFER": "1"})
    assert [(f.check, f.status) for f in out] == [("efa", Status.INFO)]


@pytest.mark.parametrize("shm", [None, "1", ""])
def test_efa_with_shm_transfer_not_zero_fails(tmp_path, shm):
    sysfs = fake_sysfs(tmp_path, efa=("rdmap0s6", "rdmap1s6"))
    assert devs.efa_devices(sysfs) == ["rdmap0s6", "rdmap1s6"]
    out = devs.check_efa(devs.efa_devices(sysfs), [], {"FI_EFA_ENABLE_SHM_TRANSFER": shm, "FI_PROVIDER": "efa"})
    f = by_check(out, "FI_EFA_ENABLE_SHM_TRANSFER")
    assert f.status is Status.FAIL
    assert "FI_EFA_ENABLE_SHM_TRANSFER=0" in f.todo and "registrations" in f.summary
    assert by_check(out, "efa").status is Status.OK


def test_efa_correct_environment_is_ok(tmp_path):
    sysfs = fake_sysfs(tmp_path, efa=("rdmap0s6",))
    env = {"FI_EFA_ENABLE_SHM_TRANSFER": "0", "FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}
    out = devs.check_efa(devs.efa_devices(sysfs), ["GPU 0: H100"], env)
    assert all(f.status is Status.OK for f in out), out


@pytest.mark.parametrize("provider", [None, "tcp", "shm"])
def test_efa_with_other_fi_provider_warns(tmp_path, provider):
    out = devs.check_efa(["rdmap0s6"], [], {"FI_EFA_ENABLE_SHM_TRANSFER": "0", "FI_PROVIDER": provider})
    f = by_check(out, "FI_PROVIDER")
    assert f.status is Status.WARN and "FI_PROVIDER=efa" in f.todo


def test_efa_with_gpus_and_no_device_rdma_warns():
    out = devs.check_efa(["rdmap0s6"], ["GPU 0"], {"FI_EFA_ENABLE_SHM_TRANSFER": "0", "FI_PROVIDER": "efa"})
    assert by_check(out, "FI_EFA_USE_DEVICE_RDMA").status is Status.WARN


# --------------------------------------------------------------------------- UCX traps


def test_parse_ucx_info():
    text = "#\n# Memory domain: tcp\n#     Component: tcp\n#      Transport: tcp\n#         Device: eth0\n#      Transport: tcp\n#         Device: lo\n# Memory domain: cma\n#      Transport: cma\n#         Device: memory\n"
    assert devs.parse_ucx_info(text) == ["tcp/eth0", "tcp/lo", "cma/memory"]


@pytest.mark.parametrize(
    "value,status",
    [
        ("lo", Status.OK),
        ("lo,eth0", Status.OK),
        ("mlx5_0:1", Status.FAIL),
        ("lo,rdmap0s6", Status.FAIL),
        ("rdmap9s6:1", Status.FAIL),
    ],
)
def test_ucx_net_devices_naming_a_missing_device_fails(tmp_path, value, status):
    devices = devs.existing_devices(fake_sysfs(tmp_path), ["tcp/lo", "cma/memory"])
    f = by_check(
        devs.check_ucx(["tcp/lo"], "1.23.0", ["cma"], {"UCX_NET_DEVICES": value}, devices), "UCX_NET_DEVICES"
    )
    assert f.status is status, f
    if status is Status.FAIL:
        assert value.split(",")[-1] in f.summary and "UCX_NET_DEVICES" in f.todo


def test_ucx_net_devices_with_efa_port_is_ok(tmp_path):
    devices = devs.existing_devices(fake_sysfs(tmp_path, efa=("rdmap0s6",)), None)
    f = by_check(devs.check_ucx(None, "", [], {"UCX_NET_DEVICES": "rdmap0s6:1"}, devices), "UCX_NET_DEVICES")
    assert f.status is Status.OK


def test_ucx_tls_shared_memory_only_warns():
    out = devs.check_ucx(["tcp/lo"], "", [], {"UCX_TLS": "self,sm"}, ["lo"])
    assert by_check(out, "UCX_TLS").status is Status.WARN
    assert by_check(devs.check_ucx([], "", [], {"UCX_TLS": "tcp,cma"}, ["lo"]), "UCX_TLS").status is Status.INFO


# --------------------------------------------------------------------------- NIXL_PLUGIN_DIR and roles


def test_nixl_plugin_dir_on_prefill(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    same = checks.check_role("prefill", {"NIXL_PLUGIN_DIR": str(own)}, str(own))
    assert [(f.check, f.status) for f in same] == [("NIXL_PLUGIN_DIR", Status.WARN)]
    assert "decode service" in same[0].todo
    foreign = checks.check_role("prefill", {"NIXL_PLUGIN_DIR": str(other)}, str(own))
    assert foreign[0].status is Status.FAIL and str(own) in foreign[0].summary
    missing = checks.check_role("decode", {"NIXL_PLUGIN_DIR": str(tmp_path / "nope")}, str(own))
    assert missing[0].status is Status.FAIL and "does not exist" in missing[0].summary


def test_nixl_plugin_dir_on_decode_is_fine(tmp_path):
    assert checks.check_role("decode", {"NIXL_PLUGIN_DIR": str(tmp_path)}, str(tmp_path))[0].status is Status.INFO
    assert checks.check_role("decode", {"NIXL_PLUGIN_DIR": str(tmp_path)}, "/elsewhere")[0].status is Status.WARN
    assert checks.check_role("prefill", {}, str(tmp_path)) == []


# --------------------------------------------------------------------------- plugins and missing libraries


@pytest.fixture
def plugin_needing_missing_lib(tmp_path):
    """plugins/libplugin_FAKE.so linked against libkvbmissing.so.1, which is then deleted."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    lib = tmp_path / "lib"
    lib.mkdir()
    (tmp_path / "dep.c").write_text("int kvb_dep(void) { return 1; }\n")
    (tmp_path / "plugin.c").write_text("int kvb_dep(void);\nint kvb_plugin(void) { return kvb_dep(); }\n")
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-Wl,-soname,libkvbmissing.so.1",
            "-o",
            str(lib / "libkvbmissing.so.1"),
            str(tmp_path / "dep.c"),
        ],
        check=True,
        timeout=60,
    )
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-Wl,--no-as-needed",
            "-o",
            str(plugins / "libplugin_FAKE.so"),
            str(tmp_path / "plugin.c"),
            f"-L{lib}",
            "-l:libkvbmissing.so.1",
        ],
        check=True,
        timeout=60,
    )
    (lib / "libkvbmissing.so.1").unlink()
    return plugins


@needs_nixl
def test_plugin_that_needs_a_missing_library(plugin_needing_missing_lib):
    from kvbridge.transfer.probe import plugin_status

    st = plugin_status("FAKE", str(plugin_needing_missing_lib))
    assert not st.loads and "libkvbmissing.so.1" in st.missing
    selected = checks.check_plugins([st], "FAKE", str(plugin_needing_missing_lib))
    f = by_check(selected, "nixl plugin FAKE")
    assert f.status is Status.FAIL and "libkvbmissing.so.1" in f.summary
    assert by_check(checks.check_plugins([st], None, ""), "nixl plugin FAKE").status is Status.INFO


@needs_nixl
@pytest.mark.skipif(ctypes.util.find_library("fabric") is not None, reason="libfabric is installed here")
def test_real_libfabric_plugin_copy_names_libfabric(tmp_path):
    from kvbridge.transfer.probe import nixl_install, plugin_status

    src = next(
        (
            Path(d) / "libplugin_LIBFABRIC.so"
            for d in nixl_install().plugin_dirs
            if (Path(d) / "libplugin_LIBFABRIC.so").exists()
        ),
        None,
    )
    if src is None:
        pytest.skip("this NIXL has no LIBFABRIC plugin")
    shutil.copy(src, tmp_path / "libplugin_LIBFABRIC.so")
    st = plugin_status("LIBFABRIC", str(tmp_path))
    assert not st.loads and "libfabric.so.1" in st.missing
    f = by_check(checks.check_plugins([st], "LIBFABRIC", str(tmp_path)), "nixl plugin LIBFABRIC")
    assert f.status is Status.FAIL and "libfabric.so.1" in f.summary
    assert "libfabric" in f.todo and "backend: DEFAULT" in f.todo


@pytest.mark.parametrize(
    "missing,hint",
    [
        (["libfabric.so.1"], "EFA installer"),
        (["libcuda.so.1"], "NVIDIA driver"),
        (["libhwloc.so.15"], "hwloc"),
        (["libcudart.so.12"], "cuda-runtime"),
    ],
)
def test_each_missing_library_says_what_to_install(missing, hint):
    st = PluginStatus(
        "LIBFABRIC", "/x/libplugin_LIBFABRIC.so", False, missing, f"{missing[0]}: cannot open shared object file"
    )
    f = by_check(checks.check_plugins([st], None, "/x"), "nixl plugin LIBFABRIC")
    assert f.status is Status.INFO and missing[0] in f.summary and hint in f.todo


def test_selected_plugin_that_loads_is_ok_and_no_plugins_fails():
    ok = by_check(
        checks.check_plugins([PluginStatus("UCX", "/x/libplugin_UCX.so", True)], "UCX", "/x"), "nixl plugin UCX"
    )
    assert ok.status is Status.OK and "configured backend" in ok.summary
    assert by_check(checks.check_plugins([], "UCX", "/empty"), "nixl plugins").status is Status.FAIL


# --------------------------------------------------------------------------- two copies of NIXL


def test_one_nixl_copy_is_ok(tmp_path):
    out = checks.check_nixl_copies(["nixl_cu12"], str(tmp_path), str(tmp_path / "libnixl.so"), None, system_dirs=())
    assert [(f.check, f.status) for f in out] == [("nixl copies", Status.OK)]


def test_two_nixl_packages_warn(tmp_path):
    out = checks.check_nixl_copies(["nixl_cu12", "nixl_cu13"], str(tmp_path), None, None, system_dirs=())
    f = by_check(out, "nixl copies")
    assert f.status is Status.WARN and "nixl_cu13" in f.summary


def test_system_libnixl_on_ld_library_path_warns_and_loaded_one_fails(tmp_path):
    own, system = tmp_path / "wheel", tmp_path / "opt" / "nixl" / "lib"
    own.mkdir()
    system.mkdir(parents=True)
    (own / "libnixl.so").write_bytes(b"")
    (system / "libnixl.so").write_bytes(b"")
    out = checks.check_nixl_copies(
        ["nixl_cu12"], str(own), str(own / "libnixl.so"), f"/nowhere:{system}", system_dirs=()
    )
    f = by_check(out, "nixl copies")
    assert f.status is Status.WARN and str(system / "libnixl.so") in f.summary and "LD_LIBRARY_PATH" in f.todo
    loaded = checks.check_nixl_copies(["nixl_cu12"], str(own), str(system / "libnixl.so"), str(system), system_dirs=())
    assert by_check(loaded, "nixl library").status is Status.FAIL
    installed = checks.check_nixl_copies(["nixl_cu12"], str(own), None, None, system_dirs=(str(system),))
    assert by_check(installed, "nixl copies").status is Status.INFO


# --------------------------------------------------------------------------- backend (select.py)


@needs_nixl
def test_legacy_variable_with_default_backend_warns(monkeypatch):
    monkeypatch.setenv("TRTLLM_USE_UCX_KVCACHE", "1")
    env = {"TRTLLM_USE_UCX_KVCACHE": "1"}
    out, resolved = doctor.check_backend(CacheTransceiverConfig(backend="DEFAULT"), env)
    assert resolved.describe() == "NIXL/UCX"
    f = by_check(out, "legacy variable")
    assert f.status is Status.WARN and "TRTLLM_USE_UCX_KVCACHE" in f.summary and "backend: UCX" in f.todo
    assert by_check(out, "backend").status is Status.OK


def test_legacy_variable_with_transceiver_off_is_information(monkeypatch):
    monkeypatch.setenv("TRTLLM_USE_NIXL_KVCACHE", "1")
    out, resolved = doctor.check_backend(CacheTransceiverConfig(), {"TRTLLM_USE_NIXL_KVCACHE": "1"})
    assert resolved is None
    assert by_check(out, "legacy variable").status is Status.INFO
    assert by_check(out, "backend").status is Status.INFO


@needs_nixl
@pytest.mark.skipif(ctypes.util.find_library("fabric") is not None, reason="libfabric is installed here")
def test_libfabric_backend_that_cannot_load_fails():
    out, _ = doctor.check_backend(CacheTransceiverConfig(backend="NIXL", nixl_backend="LIBFABRIC"), {})
    f = by_check(out, "backend loads")
    assert f.status is Status.FAIL and "libfabric.so.1" in f.summary


# --------------------------------------------------------------------------- GPUs


def test_gpus_from_proc_and_cuda_device_without_gpu(tmp_path):
    (tmp_path / "driver" / "nvidia" / "gpus" / "0000:00:1e.0").mkdir(parents=True)
    gpus = devs.gpu_devices(str(tmp_path), run_nvidia_smi=False)
    assert gpus == ["GPU at PCI 0000:00:1e.0"]
    assert by_check(devs.check_gpus(gpus, 1, "cuda", {}), "gpu").status is Status.OK
    assert by_check(devs.check_gpus([], 0, "cpu", {}), "gpu").status is Status.INFO
    assert by_check(devs.check_gpus([], 0, "cuda:0", {}), "gpu").status is Status.FAIL
    assert by_check(devs.check_gpus(gpus, 0, "cuda", {}), "torch cuda").status is Status.FAIL


# --------------------------------------------------------------------------- etcd and NATS


class _Etcd(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = (
            json.dumps({"etcdserver": "3.5.1", "etcdcluster": "3.5.0"}).encode() if self.path == "/version" else b"{}"
        )
        self.send_response(200 if self.path == "/version" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def etcd_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Etcd)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _line_server(greeting: bytes | None):
    """A TCP server on 127.0.0.1 that sends ``greeting`` to each client (None: stays silent)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    conns = []

    def serve():
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            conns.append(c)
            if greeting is not None:
                c.sendall(greeting)

    threading.Thread(target=serve, daemon=True).start()
    return lsock, conns


def _closed_port() -> int:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_etcd_reachable_and_unreachable(etcd_server):
    f = check_etcd(etcd_server, timeout=2)[0]
    assert f.status is Status.OK and "3.5.1" in f.summary
    bad = check_etcd(f"http://127.0.0.1:{_closed_port()}", timeout=1)[0]
    assert bad.status is Status.FAIL and "cannot connect" in bad.summary
    assert check_etcd(None)[0].status is Status.INFO


def test_etcd_port_that_is_not_etcd_fails():
    lsock, conns = _line_server(b"INFO {}\r\n")
    try:
        f = check_etcd(f"127.0.0.1:{lsock.getsockname()[1]}", timeout=1)[0]
        assert f.status is Status.FAIL
    finally:
        lsock.close()
        for c in conns:
            c.close()


@pytest.mark.parametrize(
    "greeting,status",
    [
        (b'INFO {"server_id":"x","version":"2.15.1","jetstream":false}\r\n', Status.OK),
        (b"HTTP/1.1 400 Bad Request\r\n", Status.FAIL),
        (None, Status.FAIL),
    ],
    ids=["nats", "not-nats", "silent"],
)
def test_nats(greeting, status):
    lsock, conns = _line_server(greeting)
    try:
        f = check_nats(f"nats://127.0.0.1:{lsock.getsockname()[1]}", timeout=0.5)[0]
        assert f.status is status, f
        if status is Status.OK:
            assert "2.15.1" in f.summary
    finally:
        lsock.close()
        for c in conns:
            c.close()
    assert check_nats(f"127.0.0.1:{_closed_port()}", timeout=1)[0].status is Status.FAIL


# --------------------------------------------------------------------------- the whole command


@needs_nixl
def test_main_on_a_fake_efa_node_exits_non_zero(tmp_path, monkeypatch, capsys):
    sysfs = fake_sysfs(tmp_path, efa=("rdmap0s6",))
    for k in ("FI_EFA_ENABLE_SHM_TRANSFER", "FI_PROVIDER", "NIXL_PLUGIN_DIR", "UCX_TLS", "KVBRIDGE_ROLE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    code = doctor.main(["--json", "--sysfs", sysfs, "--role", "decode"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["exit_status"] == 1
    fails = {f["check"] for f in doc["findings"] if f["status"] == "fail"}
    assert fails == {"FI_EFA_ENABLE_SHM_TRANSFER"}, doc["findings"]
    assert all(f["what_to_do"] for f in doc["findings"] if f["status"] in ("warn", "fail"))


def test_render_table():
    text = doctor.render_table(
        [Finding("efa", Status.INFO, "no EFA"), Finding("FI_PROVIDER", Status.FAIL, "is tcp", "set FI_PROVIDER=efa")]
    )
    lines = text.splitlines()
    assert lines[0].startswith("STATUS") and "FI_PROVIDER" in lines[2] and "→ set FI_PROVIDER=efa" in lines[3]
    assert lines[-1].endswith("exit status 1")
