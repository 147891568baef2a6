"""Device and transport checks of ``kvbridge doctor``: EFA, GPUs, UCX transports and the
UCX_NET_DEVICES / UCX_TLS traps. Like ``doctor_checks.py``, each check takes what it inspects
(a sysfs or proc root, an environment dict, ucx_info output) as parameters."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

from kvbridge.doctor_checks import Env, Finding, Status, env_value

# --------------------------------------------------------------------------- devices


def efa_devices(sysfs: str = "/sys") -> list[str]:
    d = Path(sysfs) / "class" / "infiniband"
    return sorted(p.name for p in d.glob("rdmap*")) if d.is_dir() else []


def rdma_devices(sysfs: str = "/sys") -> list[str]:
    d = Path(sysfs) / "class" / "infiniband"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def net_devices(sysfs: str = "/sys") -> list[str]:
    d = Path(sysfs) / "class" / "net"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def check_efa(efa: list[str], gpus: list[str], env: Env) -> list[Finding]:
    """EFA traps: FI_EFA_ENABLE_SHM_TRANSFER must be 0 (libfabric's shm provider breaks NIXL's
    GPU buffer registrations), FI_PROVIDER should be efa, FI_EFA_USE_DEVICE_RDMA=1 with GPUs."""
    if not efa:
        return [Finding("efa", Status.INFO, "no EFA devices (/sys/class/infiniband/rdmap*)")]
    out = [
        Finding(
            "efa",
            Status.OK,
            f"{len(efa)} EFA device(s): {', '.join(efa)}; verify SRD in the worker log line `UCX transports ... srd/rdmap...`",
        )
    ]
    shm = env_value(env, "FI_EFA_ENABLE_SHM_TRANSFER")
    if shm != "0":
        out.append(
            Finding(
                "FI_EFA_ENABLE_SHM_TRANSFER",
                Status.FAIL,
                f"is {shm or 'unset (libfabric default: on)'} on a node with EFA: it breaks NIXL's GPU buffer registrations",
                "set FI_EFA_ENABLE_SHM_TRANSFER=0 on prefill and decode (kvbridge deploy --profile efa does)",
            )
        )
    else:
        out.append(Finding("FI_EFA_ENABLE_SHM_TRANSFER", Status.OK, "0"))
    prov = env_value(env, "FI_PROVIDER")
    if prov != "efa":
        out.append(
            Finding(
                "FI_PROVIDER",
                Status.WARN,
                f"is {prov or 'unset'} on a node with EFA: libfabric may pick another provider (tcp, shm)",
                "set FI_PROVIDER=efa",
            )
        )
    else:
        out.append(Finding("FI_PROVIDER", Status.OK, "efa"))
    if gpus and env_value(env, "FI_EFA_USE_DEVICE_RDMA") != "1":
        out.append(
            Finding(
                "FI_EFA_USE_DEVICE_RDMA",
                Status.WARN,
                "not 1 on a node with EFA and GPUs: GPU memory goes through host bounce buffers",
                "set FI_EFA_USE_DEVICE_RDMA=1",
            )
        )
    return out


def gpu_devices(proc: str = "/proc", run_nvidia_smi: bool = True) -> list[str]:
    """GPUs seen by the driver: ``nvidia-smi -L`` lines, else /proc/driver/nvidia/gpus/*."""
    smi = shutil.which("nvidia-smi") if run_nvidia_smi else None
    if smi:
        try:
            res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15)
            lines = [ln.strip() for ln in res.stdout.splitlines() if ln.startswith("GPU ")]
            if lines:
                return lines
        except (OSError, subprocess.TimeoutExpired):
            pass
    d = Path(proc) / "driver" / "nvidia" / "gpus"
    return [f"GPU at PCI {p.name}" for p in sorted(d.iterdir())] if d.is_dir() else []


def check_gpus(gpus: list[str], torch_cuda: int | None, device: str, env: Env) -> list[Finding]:
    cvd = env_value(env, "CUDA_VISIBLE_DEVICES")
    wants_cuda = device.startswith("cuda")
    if not gpus and not torch_cuda:
        if wants_cuda:
            return [
                Finding(
                    "gpu",
                    Status.FAIL,
                    f"engine.device is {device} but no GPU is visible",
                    "run on a GPU node, or set engine.device: cpu",
                )
            ]
        return [Finding("gpu", Status.INFO, "no GPU: KV lives in host memory (registered as DRAM)")]
    out = [
        Finding(
            "gpu",
            Status.OK,
            f"{len(gpus) or torch_cuda} GPU(s): {'; '.join(gpus) if gpus else 'seen by torch'}"
            + (f"; CUDA_VISIBLE_DEVICES={cvd}" if cvd is not None else ""),
        )
    ]
    if gpus and torch_cuda == 0 and wants_cuda:
        out.append(
            Finding(
                "torch cuda",
                Status.FAIL,
                "the driver sees GPUs but torch does not (a CPU build of torch, or CUDA_VISIBLE_DEVICES hides them)",
                "install a CUDA build of torch; check CUDA_VISIBLE_DEVICES",
            )
        )
    return out


# --------------------------------------------------------------------------- UCX


def ucx_info_command() -> tuple[list[str], dict[str, str]] | None:
    # NIXL's wheel bundles UCX without ucx_info; libucx-cu12's (ucxx's UCX) sees the same devices
    """The ``ucx_info`` of the libucx wheel (ucxx's UCX) and the environment it needs."""
    spec = importlib.util.find_spec("libucx")
    if spec is None or not spec.submodule_search_locations:
        exe = shutil.which("ucx_info")
        return ([exe, "-d"], {}) if exe else None
    root = Path(list(spec.submodule_search_locations)[0])
    exe = root / "bin" / "ucx_info"
    if not exe.exists():
        return None
    return [str(exe), "-d"], {"LD_LIBRARY_PATH": str(root / "lib")}


def parse_ucx_info(text: str) -> list[str]:
    """``transport/device`` pairs from ``ucx_info -d`` output."""
    out: list[str] = []
    tl = None
    for line in text.splitlines():
        m = re.match(r"#\s+Transport:\s+(\S+)", line)
        if m:
            tl = m.group(1)
            continue
        m = re.match(r"#\s+Device:\s+(\S+)", line)
        if m and tl:
            pair = f"{tl}/{m.group(1)}"
            if pair not in out:
                out.append(pair)
    return out


def nixl_ucx_modules(nixl_libs_dir: str) -> list[str]:
    """UCX transport modules bundled with NIXL's UCX (cma, ib, ib_efa, ...)."""
    d = Path(nixl_libs_dir) / "ucx"
    return (
        sorted({re.sub(r"\.so.*$", "", p.name)[len("libuct_") :] for p in d.glob("libuct_*.so*")}) if d.is_dir() else []
    )


def check_ucx(
    transports: list[str] | None, nixl_ucx_version: str, modules: list[str], env: Env, devices: list[str]
) -> list[Finding]:
    """UCX transports available, and the UCX_NET_DEVICES / UCX_TLS traps. ``devices`` is every
    device name that exists here (network interfaces, RDMA devices, UCX's ``memory``)."""
    out: list[Finding] = []
    if transports is None:
        out.append(
            Finding(
                "ucx transports",
                Status.INFO,
                "ucx_info not found (libucx-cu12 not installed); the self-test shows what UCX picks",
            )
        )
    else:
        out.append(
            Finding(
                "ucx transports",
                Status.INFO if transports else Status.WARN,
                f"available (ucx_info -d): {', '.join(transports) or 'none listed'}",
            )
        )
    if nixl_ucx_version or modules:
        out.append(
            Finding(
                "nixl ucx",
                Status.INFO,
                f"NIXL's UCX {nixl_ucx_version or '?'}, modules: {', '.join(modules) or '(none)'}",
            )
        )
    nd = env_value(env, "UCX_NET_DEVICES")
    if nd and nd != "all":
        missing = [e for e in nd.split(",") if e and e.split(":")[0] not in devices]
        if missing:
            out.append(
                Finding(
                    "UCX_NET_DEVICES",
                    Status.FAIL,
                    f"names device(s) that do not exist here: {', '.join(missing)} (devices: {', '.join(devices) or 'none'})",
                    "set UCX_NET_DEVICES to devices of this node (lo in local mode; rdmap... on EFA), or unset it",
                )
            )
        else:
            out.append(Finding("UCX_NET_DEVICES", Status.OK, nd))
    tls = env_value(env, "UCX_TLS")
    if tls:
        names = {t.strip().lstrip("^") for t in tls.split(",")}
        if not tls.startswith("^") and not names & {
            "all",
            "tcp",
            "ib",
            "rc",
            "rc_x",
            "ud",
            "ud_x",
            "dc",
            "dc_x",
            "srd",
            "rc_v",
            "ud_v",
        }:
            out.append(
                Finding(
                    "UCX_TLS",
                    Status.WARN,
                    f"{tls}: no network transport; UCX cannot reach a peer on another node, and NIXL fails with shared memory alone",
                    "unset UCX_TLS, or add tcp (and srd/rc for RDMA)",
                )
            )
        else:
            out.append(Finding("UCX_TLS", Status.INFO, tls))
    return out


def existing_devices(sysfs: str, ucx_transports: list[str] | None) -> list[str]:
    devs = set(net_devices(sysfs)) | set(rdma_devices(sysfs)) | {"memory"}
    devs |= {t.split("/", 1)[1] for t in ucx_transports or [] if "/" in t}
    return sorted(devs)
