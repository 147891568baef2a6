"""``kvbridge doctor``: preflight checks and a KV transport self-test.

    kvbridge doctor [--config engine.yaml] [--role prefill|decode|both]
                    [--etcd URL[,URL]] [--nats URL] [--self-test] [--json]

Answers "which transport really moves my KV cache, and why is it slow or failing?" before a
worker starts: versions, the NIXL copy and plugins (and what each plugin that cannot load is
missing), the backend the config resolves to, UCX transports and devices, EFA and GPUs, the
environment traps, etcd and NATS reachability and, with ``--self-test``, a real transfer
between two local transceivers. Every finding has a status (ok / info / warn / fail) and says
what to do. Exit status 1 when a finding fails (something blocks serving), 0 otherwise.

The checks live in ``doctor_checks.py`` (pure: they take the environment, sysfs root and
plugin statuses as parameters), ``doctor_net.py`` (etcd, NATS) and ``doctor_selftest.py``;
this module gathers what the machine has and prints the report.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from kvbridge import doctor_checks as checks
from kvbridge import doctor_devices as devices
from kvbridge.config import LEGACY_TRANSCEIVER_ENV, CacheTransceiverConfig, ConfigError, doctor_environment, load_config
from kvbridge.doctor_checks import Finding, Status
from kvbridge.doctor_net import check_etcd, check_nats

ROLES = ("prefill", "decode", "both")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvbridge doctor", description=__doc__.split("\n\n")[2].replace("\n", " ").replace("``", "`"))
    p.add_argument("--config", metavar="YAML", help="engine config (cache_transceiver_config decides the backend)")
    p.add_argument("--role", choices=ROLES, help="the worker this node runs (default: KVBRIDGE_ROLE, else both)")
    p.add_argument("--etcd", metavar="URL", help="etcd endpoint(s), comma-separated (http://host:2379)")
    p.add_argument("--nats", metavar="URL", help="NATS server (nats://host:4222)")
    p.add_argument(
        "--self-test", action="store_true", help="a real transfer between two local transceivers, with bandwidth"
    )
    p.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    p.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)  # tests: a fake /sys tree
    return p


# --------------------------------------------------------------------------- gathering


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_backend(
    cfg: CacheTransceiverConfig, env: checks.Env, *, check_loadable: bool = True
) -> tuple[list[Finding], Any]:
    """The backend the config resolves to (transfer/select.py), its legacy-variable warnings,
    and whether it loads. Returns (findings, ResolvedBackend | None)."""
    from kvbridge.transfer.base import BackendUnavailable
    from kvbridge.transfer.select import check_loads, resolve_backend

    out: list[Finding] = []
    legacy = {k: v for k in LEGACY_TRANSCEIVER_ENV if (v := env.get(k))}
    cap = _Capture()
    logger = logging.getLogger("kvbridge.transfer.select")
    logger.addHandler(cap)
    propagate, logger.propagate = logger.propagate, False
    try:
        resolved = resolve_backend(cfg, check_loadable=False)
    finally:
        logger.removeHandler(cap)
        logger.propagate = propagate
    if resolved is None:
        out.append(
            Finding(
                "backend",
                Status.INFO,
                "cache_transceiver_config.backend is not set: transceiver off (aggregated serving); the self-test uses DEFAULT (NIXL/UCX)",
                "set cache_transceiver_config.backend for disaggregated serving",
            )
        )
    else:
        out.append(
            Finding(
                "backend",
                Status.OK,
                f"{resolved.describe()} (cache_transceiver_config.backend: {cfg.backend}, transfer_mode: {cfg.transfer_mode})",
            )
        )
    for msg in cap.messages:
        out.append(
            Finding(
                "legacy variable",
                Status.WARN,
                msg,
                "write `backend: UCX` in cache_transceiver_config to use UCX directly, and unset the variable",
            )
        )
    if not cap.messages:
        for k, v in legacy.items():
            out.append(
                Finding(
                    "legacy variable",
                    Status.INFO,
                    f"{k}={v} is ignored: only cache_transceiver_config.backend chooses the backend",
                    f"unset {k}",
                )
            )
    if resolved is not None and check_loadable:
        try:
            check_loads(resolved)
        except BackendUnavailable as e:
            out.append(
                Finding("backend loads", Status.FAIL, str(e), "install what is missing, or choose another backend")
            )
    return out, resolved


def _loaded_libnixl() -> str | None:
    from kvbridge.transfer import probe

    return next((p for p in probe.loaded_libraries() if Path(p).name.startswith("libnixl.so")), None)


def check_nixl(env: checks.Env, role: str, selected: str | None) -> list[Finding]:
    from kvbridge.transfer import probe

    try:
        inst = probe.nixl_install()
    except ModuleNotFoundError as e:
        return [Finding("nixl", Status.FAIL if selected else Status.WARN, str(e), "pip install nixl-cu12==1.5.1")]
    statuses = probe.all_plugins()  # loads NIXL's own libraries first, as NIXL would
    out = [Finding("nixl", Status.OK, f"{inst.module} {inst.version}, library {_loaded_libnixl() or inst.library_dir}")]
    out += checks.check_plugins(statuses, selected, inst.plugin_dirs[0] if inst.plugin_dirs else "")
    out += checks.check_nixl_copies(inst.copies, inst.library_dir, _loaded_libnixl(), env.get("LD_LIBRARY_PATH"))
    out += checks.check_role(role, env, str(Path(inst.library_dir) / "plugins"))
    return out


def ucx_transports() -> list[str] | None:
    cmd = devices.ucx_info_command()
    if cmd is None:
        return None
    argv, extra = cmd
    run_env = dict(os.environ)  # passed through to ucx_info, not read
    if extra.get("LD_LIBRARY_PATH"):
        run_env["LD_LIBRARY_PATH"] = ":".join(
            x for x in (extra["LD_LIBRARY_PATH"], run_env.get("LD_LIBRARY_PATH", "")) if x
        )
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=run_env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return devices.parse_ucx_info(res.stdout)


def check_ucx_and_devices(env: checks.Env, sysfs: str, device: str) -> list[Finding]:
    from kvbridge.transfer import probe

    transports = ucx_transports()
    try:
        inst = probe.nixl_install()
        modules = devices.nixl_ucx_modules(str(Path(inst.library_dir).parent / f"{inst.module}.libs"))
        version = probe.ucx_version()
    except ModuleNotFoundError:
        modules, version = [], ""
    out = devices.check_ucx(transports, version, modules, env, devices.existing_devices(sysfs, transports))
    gpus = devices.gpu_devices()
    out += devices.check_efa(devices.efa_devices(sysfs), gpus, env)
    out += devices.check_gpus(gpus, _torch_cuda_count(), device, env)
    return out


def _torch_cuda_count() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.device_count() if torch.version.cuda else 0


def collect(args: argparse.Namespace, env: checks.Env) -> tuple[list[Finding], CacheTransceiverConfig | None, str]:
    role = args.role or env.get("KVBRIDGE_ROLE") or "both"
    out = checks.check_versions(checks.package_versions())
    if role not in ROLES:
        out.append(
            Finding(
                "role",
                Status.WARN,
                f"KVBRIDGE_ROLE={role} is not one of {', '.join(ROLES)}; checking as both",
                "set --role or KVBRIDGE_ROLE to prefill, decode or both",
            )
        )
        role = "both"
    device = "cpu"
    cfg: CacheTransceiverConfig | None = None
    try:
        config = load_config(args.config)
        cfg, device = config.cache_transceiver_config, config.engine.device
        out.append(
            Finding(
                "config",
                Status.OK,
                f"{args.config or '(defaults)'}: model {config.engine.model_name}, device {device}, role {role}",
            )
        )
    except ConfigError as e:
        out.append(Finding("config", Status.FAIL, str(e), "fix the config file (kvbridge serve refuses it too)"))
    selected = None
    if cfg is not None:
        found, resolved = check_backend(cfg, env)
        out += found
        if resolved is not None and resolved.nixl_backend is not None:
            selected = resolved.nixl_backend.value
    out += check_nixl(env, role, selected)
    out += check_ucx_and_devices(env, args.sysfs, device)
    out += check_etcd(args.etcd)
    out += check_nats(args.nats)
    out.append(checks.env_summary(env))
    return out, cfg, role


def self_test_backend(cfg: CacheTransceiverConfig | None) -> tuple[dict[str, Any], str]:
    cfg = cfg or CacheTransceiverConfig()
    backend = cfg.backend or "DEFAULT"
    label = {"DEFAULT": "NIXL/UCX", "NIXL": f"NIXL/{cfg.nixl_backend}", "UCX": "UCX (direct, ucxx)"}[backend]
    return {
        "backend": backend,
        "nixl_backend": cfg.nixl_backend,
        "transfer_mode": cfg.transfer_mode,
        "kv_transfer_timeout_ms": 20000,
    }, label


# --------------------------------------------------------------------------- output

MARK = {Status.OK: "ok", Status.INFO: "info", Status.WARN: "WARN", Status.FAIL: "FAIL"}


def render_table(findings: list[Finding], width: int | None = None) -> str:
    width = width or max(80, min(160, shutil.get_terminal_size((120, 24)).columns))
    cw = min(24, max(len(f.check) for f in findings))
    indent = " " * (7 + cw + 2)
    lines = [f"{'STATUS':<7}{'CHECK':<{cw + 2}}FINDING / WHAT TO DO"]
    wrap = functools.partial(textwrap.wrap, width=width, break_on_hyphens=False, break_long_words=False)
    for f in findings:
        head = f"{MARK[f.status]:<7}{f.check[:cw]:<{cw + 2}}"
        lines += wrap(f.summary, initial_indent=head, subsequent_indent=indent) or [head]
        if f.todo and f.status is not Status.OK:
            lines += wrap(f.todo, initial_indent=indent + "→ ", subsequent_indent=indent + "  ")
    counts = {s: sum(f.status is s for f in findings) for s in Status}
    lines.append("")
    lines.append(", ".join(f"{n} {s.value}" for s, n in counts.items()) + f" — exit status {exit_status(findings)}")
    return "\n".join(lines)


def exit_status(findings: list[Finding]) -> int:
    return 1 if any(f.status is Status.FAIL for f in findings) else 0


def _remove_own_ucx_log() -> None:
    """Plugin probing (probe.setup_ucx_log) points UCX at /tmp/kvbridge-ucx-<pid>.log; the
    doctor itself makes no UCX connection, so an empty one is removed."""
    path = Path(tempfile.gettempdir()) / f"kvbridge-ucx-{os.getpid()}.log"
    try:
        if path.stat().st_size == 0:
            path.unlink()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        _remove_own_ucx_log()


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    env = doctor_environment()
    findings, cfg, role = collect(args, env)
    result = None
    if args.self_test:
        from kvbridge import doctor_selftest

        if any(f.check == "backend loads" and f.status is Status.FAIL for f in findings):
            findings.append(
                Finding(
                    "self-test", Status.FAIL, "skipped: the configured backend cannot load", "see `backend loads` above"
                )
            )
        else:
            backend, label = self_test_backend(cfg)
            if not args.json:
                print(f"self-test: {label}, two local transceivers ...", file=sys.stderr, flush=True)
            result = doctor_selftest.run_self_test(backend, label)
            findings += doctor_selftest.findings(result)
    code = exit_status(findings)
    if args.json:
        doc = {
            "kvbridge_doctor": 1,
            "role": role,
            "config": args.config,
            "exit_status": code,
            "findings": [f.as_dict() for f in findings],
            "self_test": result.as_dict() if result else None,
        }
        print(json.dumps(doc, indent=2))
    else:
        print(render_table(findings))
    return code


if __name__ == "__main__":
    sys.exit(main())
