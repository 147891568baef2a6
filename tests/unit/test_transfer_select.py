"""Backend resolution: config decides, legacy variables only warn, unloadable is an error."""

from __future__ import annotations

import logging
import os

import pytest

from kvbridge.config import Backend, CacheTransceiverConfig, ConfigError, NixlBackend
from kvbridge.transfer import probe
from kvbridge.transfer.base import BackendUnavailable
from kvbridge.transfer.select import create_transceiver, resolve_backend

LEGACY = ("TRTLLM_USE_UCX_KVCACHE", "TRTLLM_USE_NIXL_KVCACHE", "TRTLLM_USE_MPI_KVCACHE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in LEGACY + ("NIXL_PLUGIN_DIR",):
        monkeypatch.delenv(name, raising=False)


def test_left_out_means_off():
    assert resolve_backend(CacheTransceiverConfig()) is None
    assert create_transceiver(CacheTransceiverConfig(), kv=None, model_id="m") is None  # type: ignore[arg-type]


def test_default_is_nixl_over_ucx():
    r = resolve_backend(CacheTransceiverConfig(backend="default"))
    assert (r.backend, r.nixl_backend) == (Backend.NIXL, NixlBackend.UCX)


def test_nixl_and_ucx_as_written():
    assert resolve_backend(CacheTransceiverConfig(backend="NIXL")).nixl_backend is NixlBackend.UCX
    assert resolve_backend(CacheTransceiverConfig(backend="ucx")).backend is Backend.UCX


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="DEFAULT, NIXL, UCX"):
        CacheTransceiverConfig(backend="MPI")
    with pytest.raises(ConfigError, match="UCX, LIBFABRIC"):
        CacheTransceiverConfig(backend="NIXL", nixl_backend="verbs")


@pytest.mark.parametrize("var", LEGACY)
def test_legacy_variable_never_changes_the_choice_and_warns_once(monkeypatch, caplog, var):
    monkeypatch.setenv(var, "1")
    with caplog.at_level(logging.WARNING, logger="kvbridge.transfer.select"):
        r = resolve_backend(CacheTransceiverConfig(backend="DEFAULT"))
    assert (r.backend, r.nixl_backend) == (Backend.NIXL, NixlBackend.UCX)
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert var in warnings[0] and "backend: UCX" in warnings[0]


def test_two_legacy_variables_still_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("TRTLLM_USE_UCX_KVCACHE", "1")
    monkeypatch.setenv("TRTLLM_USE_MPI_KVCACHE", "1")
    with caplog.at_level(logging.WARNING, logger="kvbridge.transfer.select"):
        assert resolve_backend(CacheTransceiverConfig(backend="DEFAULT")).backend is Backend.NIXL
    (rec,) = caplog.records
    assert "TRTLLM_USE_UCX_KVCACHE" in rec.getMessage() and "TRTLLM_USE_MPI_KVCACHE" in rec.getMessage()


def test_legacy_variable_with_explicit_backend_is_silent(monkeypatch, caplog):
    monkeypatch.setenv("TRTLLM_USE_UCX_KVCACHE", "1")
    with caplog.at_level(logging.WARNING, logger="kvbridge.transfer.select"):
        assert resolve_backend(CacheTransceiverConfig(backend="NIXL")).backend is Backend.NIXL
        assert resolve_backend(CacheTransceiverConfig(backend="UCX")).backend is Backend.UCX
    assert not caplog.records


def test_unloadable_libfabric_names_what_is_missing():
    st = probe.plugin_status("LIBFABRIC")
    if st.loads:
        pytest.skip("libfabric is installed on this machine")
    with pytest.raises(BackendUnavailable) as e:
        resolve_backend(CacheTransceiverConfig(backend="NIXL", nixl_backend="LIBFABRIC"))
    msg = str(e.value)
    assert "LIBFABRIC" in msg and "libfabric.so.1" in msg and "nixl_backend: UCX" in msg
    # no fallback: nothing else was chosen
    assert "libfabric.so.1" in st.missing
    assert "libnixl_common.so" not in st.missing  # loaded with NIXL itself: not missing


def test_ucx_plugin_loads_and_is_reported():
    st = probe.plugin_status("UCX")
    assert st.loads, st.describe()
    names = {p.name: p for p in probe.all_plugins()}
    assert names["UCX"].loads and "LIBFABRIC" in names
    inst = probe.nixl_install()
    assert inst.version and inst.plugin_dirs and inst.copies


def test_nixl_plugin_dir_is_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("NIXL_PLUGIN_DIR", str(tmp_path))
    assert probe.nixl_install().plugin_dirs[0] == str(tmp_path)
    r = resolve_backend(CacheTransceiverConfig(backend="NIXL"), check_loadable=False)
    assert r.plugin_dir == str(tmp_path)
    with pytest.raises(BackendUnavailable, match="libplugin_UCX.so"):
        resolve_backend(CacheTransceiverConfig(backend="DEFAULT"))


def test_proto_info_parsing():
    text = """[1.1] [vm:1:0]   | kvb-1 intra-node cfg#1                                   |
[1.1] [vm:1:0]   | remote memory write by ucp_put* from host memory to host |
[1.1] [vm:1:0]   +--------+-------------+-----------------------------------+
[1.1] [vm:1:0]   | Range  | Description |              Config               |
[1.1] [vm:1:0]   | 0..inf | zero-copy   | cma/memory                        |
[1.1] [vm:1:0]   | kvb-1 intra-node cfg#1                          |
[1.1] [vm:1:0]   | active message by ucp_am_send* from host memory |
[1.1] [vm:1:0]   |          0 | short              | tcp/lo        |
[1.1] [vm:1:0]   | 16516..inf | multi-frag copy-in | tcp/lo        |
"""
    ops = probe.parse_proto_info(text)
    assert probe.summarize_transports(ops) == "rma write: cma/memory; am: tcp/lo"


def test_ucx_logs_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    """Every process that may load UCX logs its protocol choices to kvbridge-ucx-<pid>.log
    (read back to report the transports); a killed worker cannot remove its file, so the
    next process removes those whose pid is gone."""
    import subprocess
    import sys

    from kvbridge.config import sweep_ucx_logs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = tmp_path / f"kvbridge-ucx-{int(gone.stdout)}.log"
    live = tmp_path / f"kvbridge-ucx-{os.getppid()}.log"
    other = tmp_path / "kvbridge-ucx-notes.log"
    for path in (dead, live, other):
        path.write_text("x")
    assert sweep_ucx_logs(tmp_path) == 1
    assert not dead.exists() and live.exists() and other.exists()


def test_ucx_defaults_keep_what_the_user_set(monkeypatch):
    from kvbridge import config

    monkeypatch.delenv("UCX_CMA_SEG_SIZE", raising=False)
    monkeypatch.delenv("UCX_MM_ERROR_HANDLING", raising=False)
    monkeypatch.delenv("UCX_CMA_TX_QUOTA", raising=False)
    assert config.ucx_defaults() == {"CMA_SEG_SIZE": "4M", "CMA_TX_QUOTA": "8", "MM_ERROR_HANDLING": "y"}
    assert os.environ["UCX_CMA_SEG_SIZE"] == "4M"  # NIXL's UCX reads the environment
    assert os.environ["UCX_MM_ERROR_HANDLING"] == "y"
    monkeypatch.setenv("UCX_CMA_SEG_SIZE", "1M")
    monkeypatch.setenv("UCX_MM_ERROR_HANDLING", "n")
    assert config.ucx_defaults() == {"CMA_SEG_SIZE": "1M", "CMA_TX_QUOTA": "8", "MM_ERROR_HANDLING": "n"}


def test_ucx_defaults_let_cuda_ipc_read_vram(monkeypatch):
    """KV in VRAM: cuda_ipc reads are on (UCX's "auto" turns them off on GPUs without
    NVLink, and a pull of VRAM then crawls over tcp); a user's value stays, and KV in host
    memory leaves the option alone."""
    from kvbridge import config

    monkeypatch.delenv("UCX_CMA_SEG_SIZE", raising=False)
    monkeypatch.delenv("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", raising=False)
    assert "CUDA_IPC_ENABLE_GET_ZCOPY" not in config.ucx_defaults()
    assert "UCX_CUDA_IPC_ENABLE_GET_ZCOPY" not in os.environ
    assert config.ucx_defaults(cuda=True)["CUDA_IPC_ENABLE_GET_ZCOPY"] == "y"
    assert os.environ["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "y"
    monkeypatch.setenv("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "n")
    assert config.ucx_defaults(cuda=True)["CUDA_IPC_ENABLE_GET_ZCOPY"] == "n"
