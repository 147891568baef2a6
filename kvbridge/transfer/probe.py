"""What NIXL and UCX are really on this machine: plugins, whether each loads, what is missing.

Used by ``select.py`` (refuse a backend that cannot load, naming what is missing), by the
NIXL backend (its start line and the per-peer transport line) and by ``kvbridge doctor``.

How a plugin's missing libraries are found: a plugin is a shared object that NIXL
``dlopen``s. We ``dlopen`` it ourselves (RTLD_LAZY, after NIXL's own libraries are loaded,
as NIXL would) to get the verdict, and list every ``not found`` line of ``ldd`` whose
library is not already mapped into this process (NIXL's bundled ``libnixl_common.so`` etc.
are ``not found`` for ldd but loaded here, so they are not missing).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from kvbridge.config import nixl_plugin_dir_env, ucx_protocol_log

NIXL_DISTRIBUTIONS = ("nixl-cu12", "nixl-cu13", "nixl")
NIXL_MODULES = ("nixl_cu12", "nixl_cu13")


@dataclass
class PluginStatus:
    name: str  # UCX, LIBFABRIC, ...
    path: str
    loads: bool
    missing: list[str] = field(default_factory=list)  # sonames that cannot be found
    error: str = ""  # the dlopen error

    def describe(self) -> str:
        if self.loads:
            return f"{self.name}: loads ({self.path})"
        what = ", ".join(self.missing) if self.missing else self.error
        return f"{self.name}: cannot load, missing {what} ({self.path})"


@dataclass
class NixlInstall:
    module: str  # the python module used (nixl_cu12)
    version: str
    library_dir: str  # where libnixl.so lives
    plugin_dirs: list[str]  # candidate plugin directories, the one NIXL uses first
    copies: list[str]  # every NIXL python module/distribution reachable (more than one: a warning)


def nixl_module_name() -> str:
    for name in NIXL_MODULES:
        if importlib.util.find_spec(name) is not None:
            return name
    raise ModuleNotFoundError("NIXL is not installed: pip install nixl-cu12==1.5.1")


def nixl_install() -> NixlInstall:
    module = nixl_module_name()
    spec = importlib.util.find_spec(module)
    assert spec and spec.origin
    site = Path(spec.origin).parent.parent
    version = ""
    for dist in NIXL_DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(dist)
            if dist.replace("-", "_") == module:
                break
        except importlib.metadata.PackageNotFoundError:
            continue
    libdir = site / f".{module}.mesonpy.libs"
    dirs: list[str] = []
    env_dir = nixl_plugin_dir_env()
    if env_dir:
        dirs.append(env_dir)
    for cand in (libdir / "plugins", site / f"{module}.libs" / "nixl"):
        if cand.is_dir():
            dirs.append(str(cand))
    copies = [m for m in NIXL_MODULES if importlib.util.find_spec(m) is not None]
    return NixlInstall(module, version, str(libdir), dirs, copies)


def loaded_libraries() -> list[str]:
    """Paths of the shared objects mapped into this process."""
    out: set[str] = set()
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6 and ".so" in parts[-1]:
                out.add(parts[-1])
    except OSError:
        pass
    return sorted(out)


def loaded_plugin_dir() -> str | None:
    """The directory (or directories, comma-separated: a warning sign) of the NIXL plugins
    actually mapped into this process (after an agent created a backend), from
    /proc/self/maps."""
    dirs = sorted({str(Path(p).parent) for p in loaded_libraries() if re.search(r"/libplugin_[A-Z_]+\.so$", p)})
    return ", ".join(dirs) if dirs else None


def _ldd_not_found(path: str) -> list[str]:
    ldd = shutil.which("ldd")
    if not ldd:
        return []
    try:
        out = subprocess.run([ldd, path], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln.split("=>")[0].strip() for ln in out.splitlines() if "not found" in ln]


def setup_ucx_log() -> Path:
    """Make UCX print its protocol choices into a file we read back (see
    ``config.ucx_protocol_log``); runs before anything loads UCX (plugin probing included)."""
    return ucx_protocol_log()


def plugin_status(name: str, plugin_dir: str | None = None) -> PluginStatus:
    """Whether the NIXL plugin ``name`` (UCX, LIBFABRIC, ...) loads here, and if not, why."""
    setup_ucx_log()
    inst = nixl_install()
    dirs = [plugin_dir] if plugin_dir else inst.plugin_dirs
    path = next((str(Path(d) / f"libplugin_{name}.so") for d in dirs if (Path(d) / f"libplugin_{name}.so").exists()), "")
    if not path:
        return PluginStatus(name, "", False, [f"libplugin_{name}.so"], f"no libplugin_{name}.so in {', '.join(dirs) or '(no plugin directory)'}")
    importlib.import_module(f"{inst.module}._bindings")  # NIXL's own libraries, as NIXL would have them
    loaded = {Path(p).name for p in loaded_libraries()}
    missing = [so for so in _ldd_not_found(path) if so not in loaded]
    try:
        ctypes.CDLL(path, mode=os.RTLD_LAZY | os.RTLD_LOCAL)
        return PluginStatus(name, path, True, [])
    except OSError as e:
        err = str(e)
        first = err.split(":")[0].strip()
        if first and first not in missing and first.endswith(tuple(".so" + s for s in ("", ".0", ".1", ".2", ".12", ".15"))):
            missing.insert(0, first)
        return PluginStatus(name, path, False, missing, err)


def all_plugins() -> list[PluginStatus]:
    inst = nixl_install()
    names: set[str] = set()
    for d in inst.plugin_dirs[:1]:
        for p in Path(d).glob("libplugin_*.so"):
            names.add(p.name[len("libplugin_") : -len(".so")])
    return [plugin_status(n) for n in sorted(names)]


def ucx_version() -> str:
    """The version of the UCX library NIXL's UCX plugin uses (already loaded, or bundled)."""
    candidates = [p for p in loaded_libraries() if re.search(r"/libucp[-.]", p)]
    if not candidates:
        inst = nixl_install()
        libs = Path(inst.library_dir).parent / f"{inst.module}.libs"
        candidates = [str(p) for p in libs.glob("libucp*.so*")]
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            fn = lib.ucp_get_version_string
            fn.restype = ctypes.c_char_p
            return fn().decode()
        except (OSError, AttributeError):
            continue
    return "unknown"


# --------------------------------------------------------------------------- UCX transports

# How we learn which transports UCX chose for a peer, from UCX itself:
# UCX prints its protocol selection tables when UCX_PROTO_INFO=y, at the moment it selects
# protocols for an endpoint configuration (the first operation of each kind to a peer):
#
#   | kvb-123 intra-node cfg#1                                       |
#   | remote memory write by ucp_put* from host memory to host       |
#   | 0..inf | zero-copy   | cma/memory                              |
#
# The first line names the worker (NIXL names it after the agent) and whether the peer is
# on this node; the second the operation; the rows the transport/device per size range.
# With UCX_LOG_FILE set, UCX writes these lines (and its warnings) to that file instead of
# stdout, so the transceiver sets both before NIXL creates its UCX backend, reads the file
# after the first transfer to a peer, and logs one line: e.g. "rma write: cma/memory; am:
# tcp/lo" here, "rma write: srd/rdmap0s6-..." on AWS EFA.

_TABLE_HEAD = re.compile(r"\|\s*(\S+) (intra-node|inter-node) cfg#(\d+)\s*\|")
_TABLE_ROW = re.compile(r"\|\s*[\d.]+(?:inf)?\s*\|[^|]*\|\s*([^|]+?)\s*\|")


def parse_proto_info(text: str) -> dict[str, set[str]]:
    """{operation (e.g. 'remote memory write'): {transport/device, ...}} from UCX_PROTO_INFO
    output."""
    out: dict[str, set[str]] = {}
    op: str | None = None
    expect_op = False
    for raw in text.splitlines():
        line = raw.split("]", 2)[-1] if raw.startswith("[") else raw
        if _TABLE_HEAD.search(line):
            expect_op, op = True, None
            continue
        if expect_op:
            m = re.search(r"\|\s*(.+?) by ucp_", line)
            if m:
                op, expect_op = m.group(1).strip(), False
            continue
        if op:
            m = _TABLE_ROW.search(line)
            if m and "Config" not in line:
                for part in re.split(r"[,\s]+", m.group(1)):
                    if "/" in part:
                        out.setdefault(op, set()).add(part.strip())
    return out


def summarize_transports(ops: dict[str, set[str]]) -> str:
    groups = {"rma write": "remote memory write", "rma read": "remote memory read", "am": "active message"}
    parts = []
    for label, key in groups.items():
        found: set[str] = set()
        for op, tls in ops.items():
            if op.startswith(key):
                found |= tls
        if found:
            parts.append(f"{label}: {', '.join(sorted(found))}")
    return "; ".join(parts) if parts else "(UCX printed no protocol table)"


_LANE = re.compile(r"lane\[\d+\]:\s+\d+:(\S+?)(?:\.\d+)?\s+md\[\d+\].*?seg\s+\d+\s*(.*)$")


def ep_lanes(info: str) -> list[tuple[str, list[str]]]:
    """[(transport/device, [roles])] from ``ucp_ep_print_info``: e.g. ("cma/memory", ["rma_bw#0"])."""
    out = []
    for line in info.splitlines():
        m = _LANE.search(line)
        if m:
            out.append((m.group(1), m.group(2).split()))
    return out


def summarize_ep_lanes(info: str) -> str:
    """The transports of one UCP endpoint (UCX-direct), in ``summarize_transports``' words:
    "rma: cma/memory; am: tcp/lo"; RMA with no lane of its own is emulated over the AM lane."""
    lanes = ep_lanes(info)
    rma = sorted({tl for tl, roles in lanes if any(r.startswith("rma") for r in roles)})
    am = sorted({tl for tl, roles in lanes if "am" in roles})
    return "; ".join(
        [
            f"rma: {', '.join(rma)}" if rma else f"rma: {', '.join(am) or '?'} (software emulation)",
            f"am: {', '.join(am) or '?'}",
        ]
    )
