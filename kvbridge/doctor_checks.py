"""The checks of ``kvbridge doctor`` (devices and UCX are in ``doctor_devices.py``): each takes
what it inspects as parameters (an environment dict, plugin statuses, directories to search)
and returns findings, so tests can hand it a fake plugin directory or a second NIXL copy.

What the machine really has is gathered by ``kvbridge.doctor`` (and ``transfer/probe.py``);
nothing here reads ``os.environ`` (config.py does: ``doctor_environment()``).
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

from kvbridge.transfer.probe import PluginStatus

Env = dict[str, "str | None"]


class Status(enum.Enum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    FAIL = "fail"  # blocks serving: `kvbridge doctor` exits non-zero


@dataclass
class Finding:
    check: str  # short name of what was checked ("nixl plugin LIBFABRIC")
    status: Status
    summary: str  # what was found
    todo: str = ""  # what to do about it (empty when nothing)

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.value, "summary": self.summary, "what_to_do": self.todo}


def env_value(env: Env, name: str) -> str | None:
    v = env.get(name)
    return v if v not in (None, "") else None


# --------------------------------------------------------------------------- versions

PACKAGES = (
    ("torch", "torch"),
    ("nixl-cu12", "NIXL (CUDA 12 build)"),
    ("nixl-cu13", "NIXL (CUDA 13 build)"),
    ("ucxx-cu12", "ucxx (UCX directly)"),
    ("libucx-cu12", "UCX for ucxx"),
)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist, _ in PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def check_versions(versions: dict[str, str | None], python: str = platform.python_version()) -> list[Finding]:
    found = ", ".join(f"{d} {v}" for d, v in versions.items() if v)
    out = [Finding("python", Status.INFO, f"Python {python}; {found or 'no transfer packages'}")]
    if not versions.get("torch"):
        out.append(
            Finding(
                "torch",
                Status.FAIL,
                "torch is not installed",
                "make install (torch from the CPU wheel, or a CUDA build on GPU nodes)",
            )
        )
    if not (versions.get("nixl-cu12") or versions.get("nixl-cu13")):
        out.append(
            Finding(
                "nixl",
                Status.WARN,
                "NIXL is not installed: backends DEFAULT and NIXL cannot run",
                "pip install nixl-cu12==1.5.1",
            )
        )
    if not versions.get("ucxx-cu12"):
        out.append(
            Finding(
                "ucxx",
                Status.INFO,
                "ucxx is not installed: backend UCX cannot run",
                "pip install ucxx-cu12==0.52 if you want `backend: UCX`",
            )
        )
    return out


# --------------------------------------------------------------------------- NIXL copies and plugins

SYSTEM_LIB_DIRS = (
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/opt/nvidia/nvda_nixl/lib",
    "/opt/nvidia/nvda_nixl/lib/x86_64-linux-gnu",
)


def find_libnixl(dirs: list[str]) -> list[str]:
    """Every ``libnixl.so*`` in ``dirs`` (symlinks resolved, each file once)."""
    out: dict[str, str] = {}
    for d in dirs:
        p = Path(d)
        if not d or not p.is_dir():
            continue
        for f in sorted(p.glob("libnixl.so*")):
            out.setdefault(str(f.resolve()), str(f))
    return list(out.values())


def check_nixl_copies(
    modules: list[str],
    own_library_dir: str,
    loaded_libnixl: str | None,
    ld_library_path: str | None,
    system_dirs: tuple[str, ...] = SYSTEM_LIB_DIRS,
) -> list[Finding]:
    """More than one NIXL reachable is the ABI-mismatch trap: a plugin or libnixl.so of one copy
    loaded by the other's bindings (undefined symbols, crashes, backends that fail to create)."""
    out: list[Finding] = []
    own = Path(own_library_dir).resolve()
    if len(modules) > 1:
        out.append(
            Finding(
                "nixl copies",
                Status.WARN,
                f"{len(modules)} NIXL Python packages installed: {', '.join(modules)}; kvbridge uses {modules[0]}",
                "keep one: pip uninstall the other (the `nixl` meta-package installs both; install nixl-cu12 alone)",
            )
        )
    ld_dirs = [d for d in (ld_library_path or "").split(":") if d]
    other = [f for f in find_libnixl(ld_dirs) if Path(f).resolve().parent != own]
    if other:
        out.append(
            Finding(
                "nixl copies",
                Status.WARN,
                f"another libnixl.so on LD_LIBRARY_PATH: {', '.join(other)} (kvbridge's NIXL is in {own_library_dir})",
                "remove that directory from LD_LIBRARY_PATH: libraries there win over the wheel's own",
            )
        )
    system = [f for f in find_libnixl(list(system_dirs)) if Path(f).resolve().parent != own and f not in other]
    if system:
        out.append(
            Finding(
                "nixl copies",
                Status.INFO,
                f"a system NIXL is installed too: {', '.join(system)}",
                "fine while it is not on LD_LIBRARY_PATH; do not point NIXL_PLUGIN_DIR at its plugins",
            )
        )
    if loaded_libnixl and Path(loaded_libnixl).resolve().parent != own:
        out.append(
            Finding(
                "nixl library",
                Status.FAIL,
                f"the libnixl.so loaded is {loaded_libnixl}, not the one of {modules[0] if modules else 'the NIXL package'} ({own_library_dir})",
                "remove the other NIXL from LD_LIBRARY_PATH (and /etc/ld.so.conf.d); bindings and library must come from one copy",
            )
        )
    if not out:
        out.append(Finding("nixl copies", Status.OK, f"one NIXL: {modules[0] if modules else '?'} ({own_library_dir})"))
    return out


def plugin_role(name: str, selected: str | None) -> str:
    if selected and name == selected:
        return "the configured backend"
    return {"UCX": "backend DEFAULT / nixl_backend: UCX", "LIBFABRIC": "nixl_backend: LIBFABRIC"}.get(
        name, "storage/other, not used for KV transfer"
    )


def check_plugins(statuses: list[PluginStatus], selected: str | None, plugin_dir: str) -> list[Finding]:
    """One finding per NIXL plugin found. A plugin that cannot load is a failure only when it
    is the backend the config selects; otherwise information (with what is missing)."""
    out = [Finding("nixl plugin dir", Status.INFO, plugin_dir or "(none found)")]
    if not statuses:
        out.append(
            Finding(
                "nixl plugins",
                Status.FAIL if selected else Status.WARN,
                f"no libplugin_*.so in {plugin_dir or 'any plugin directory'}",
                "reinstall nixl-cu12; unset NIXL_PLUGIN_DIR if it points elsewhere",
            )
        )
    for st in statuses:
        if st.loads:
            out.append(Finding(f"nixl plugin {st.name}", Status.OK, f"loads ({plugin_role(st.name, selected)})"))
            continue
        what = ", ".join(st.missing) if st.missing else st.error
        todo = _missing_todo(st.missing)
        if st.name == "LIBFABRIC":
            todo = (
                f"{todo}; or use backend: DEFAULT (NIXL over UCX)" if todo else "use backend: DEFAULT (NIXL over UCX)"
            )
        status = Status.FAIL if selected and st.name == selected else Status.INFO
        out.append(
            Finding(
                f"nixl plugin {st.name}",
                status,
                f"present but cannot load: missing {what} ({plugin_role(st.name, selected)})",
                todo if status is not Status.INFO or st.name in ("UCX", "LIBFABRIC") else "",
            )
        )
    return out


_LIB_HINTS = {
    "libfabric.so": "install libfabric (AWS: the EFA installer, then LD_LIBRARY_PATH=/opt/amazon/efa/lib)",
    "libhwloc.so": "install hwloc (apt-get install libhwloc15)",
    "libcuda.so": "run on a node with the NVIDIA driver (libcuda.so.1 comes with the driver)",
    "libcudart.so": "install the CUDA runtime (pip install nvidia-cuda-runtime-cu12)",
    "libcufile.so": "install GPUDirect Storage (cuFile)",
}


def _missing_todo(missing: list[str]) -> str:
    hints = []
    for so in missing:
        hint = next((h for k, h in _LIB_HINTS.items() if so.startswith(k)), None)
        if hint and hint not in hints:
            hints.append(hint)
    return "; ".join(hints)


# --------------------------------------------------------------------------- roles


def check_role(role: str, env: Env, own_plugin_dir: str | None) -> list[Finding]:
    """NIXL_PLUGIN_DIR belongs on the decode service of a multinode decode only."""
    pd = env_value(env, "NIXL_PLUGIN_DIR")
    if not pd:
        return []
    foreign = own_plugin_dir is not None and Path(pd).resolve() != Path(own_plugin_dir).resolve()
    if not Path(pd).is_dir():
        return [
            Finding(
                "NIXL_PLUGIN_DIR",
                Status.FAIL,
                f"{pd} does not exist",
                "unset NIXL_PLUGIN_DIR, or point it at the plugins of the installed NIXL",
            )
        ]
    if role == "prefill":
        return [
            Finding(
                "NIXL_PLUGIN_DIR",
                Status.FAIL if foreign else Status.WARN,
                f"set on a prefill worker ({pd}" + (f", not this NIXL's own {own_plugin_dir})" if foreign else ")"),
                "unset it on prefill: the override belongs on the decode service of a multinode decode only",
            )
        ]
    if foreign:
        return [
            Finding(
                "NIXL_PLUGIN_DIR",
                Status.WARN,
                f"{pd} is not the plugin directory of the installed NIXL ({own_plugin_dir})",
                "make sure the plugins there come from the same NIXL version (two copies of NIXL break)",
            )
        ]
    return [Finding("NIXL_PLUGIN_DIR", Status.INFO, f"{pd} ({role})")]


def env_summary(env: Env) -> Finding:
    shown = {k: v for k, v in env.items() if v is not None and k != "LD_LIBRARY_PATH"}
    text = ", ".join(f"{k}={v}" for k, v in shown.items()) or "none of the inspected variables is set"
    return Finding("environment", Status.INFO, text)
