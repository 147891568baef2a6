"""Which transceiver backend runs, from the config (and only the config).

    backend left out     → no transceiver (aggregated serving)
    DEFAULT              → NIXL with its UCX backend
    NIXL                 → NIXL with ``nixl_backend`` (UCX | LIBFABRIC)
    UCX                  → UCX directly (ucxx)

Legacy TensorRT-LLM selectors (TRTLLM_USE_UCX_KVCACHE, ...) never change the choice; with
DEFAULT each one set gets one warning that says to write ``backend: UCX``. NIXL_PLUGIN_DIR
is honoured (NIXL reads it; probe.py reports it). A backend that cannot load is a startup
error naming what is missing; there is no fallback to another transport.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbridge.config import Backend, CacheTransceiverConfig, NixlBackend, legacy_transceiver_env, nixl_plugin_dir_env
from kvbridge.transfer import probe
from kvbridge.transfer.base import BackendUnavailable

if TYPE_CHECKING:
    from kvbridge.engine.kv_cache import KVCache
    from kvbridge.transfer.base import KVTransceiver

log = logging.getLogger("kvbridge.transfer.select")


@dataclass(frozen=True)
class ResolvedBackend:
    backend: Backend
    nixl_backend: NixlBackend | None  # for NIXL only
    plugin_dir: str | None  # NIXL_PLUGIN_DIR when set

    def describe(self) -> str:
        if self.backend is Backend.NIXL:
            return f"NIXL/{self.nixl_backend.value}" if self.nixl_backend else "NIXL"
        return "UCX (direct, ucxx)"


def resolve_backend(config: CacheTransceiverConfig, *, check_loadable: bool = True) -> ResolvedBackend | None:
    """The backend the config asks for, or None (transceiver off). Raises
    ``BackendUnavailable`` when it cannot load here."""
    legacy = legacy_transceiver_env()
    if config.backend is None:
        return None
    if config.backend == "DEFAULT":
        if legacy:  # one warning, naming every legacy variable that is set
            log.warning(
                "%s ignored: cache_transceiver_config.backend is DEFAULT, which means NIXL over UCX; "
                "UCX is used directly only with `backend: UCX` written in the config",
                " and ".join(f"{k}={v}" for k, v in legacy.items()) + (" is" if len(legacy) == 1 else " are"),
            )
        resolved = ResolvedBackend(Backend.NIXL, NixlBackend.UCX, nixl_plugin_dir_env())
    elif config.backend == "NIXL":
        resolved = ResolvedBackend(Backend.NIXL, NixlBackend(config.nixl_backend), nixl_plugin_dir_env())
    else:
        resolved = ResolvedBackend(Backend.UCX, None, None)
    if check_loadable:
        check_loads(resolved)
    return resolved


def check_loads(resolved: ResolvedBackend) -> None:
    """Raise ``BackendUnavailable`` naming what is missing when ``resolved`` cannot load."""
    if resolved.backend is Backend.NIXL:
        try:
            probe.nixl_install()
        except ModuleNotFoundError as e:
            raise BackendUnavailable(str(e)) from None
        assert resolved.nixl_backend is not None
        st = probe.plugin_status(resolved.nixl_backend.value, resolved.plugin_dir)
        if not st.loads:
            what = ", ".join(st.missing) if st.missing else st.error
            raise BackendUnavailable(
                f"cache_transceiver_config: NIXL backend {resolved.nixl_backend.value} cannot load on this machine: "
                f"its plugin {st.path or 'libplugin_' + resolved.nixl_backend.value + '.so'} needs {what}. "
                f"Install the missing libraries, or choose nixl_backend: UCX"
            )
    else:
        import importlib.util

        if importlib.util.find_spec("ucxx") is None:
            raise BackendUnavailable("cache_transceiver_config.backend UCX needs ucxx: pip install ucxx-cu12==0.52")


def create_transceiver(
    config: CacheTransceiverConfig,
    kv: KVCache,
    *,
    model_id: str,
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "kvbridge",
    **kwargs: Any,
) -> KVTransceiver | None:
    """Resolve the backend and build its transceiver (None when the transceiver is off)."""
    resolved = resolve_backend(config)
    if resolved is None:
        return None
    if resolved.backend is Backend.NIXL:
        from kvbridge.transfer.nixl import NixlTransceiver

        assert resolved.nixl_backend is not None
        return NixlTransceiver(kv, config, model_id=model_id, host=host, port=port, name=name, nixl_backend=resolved.nixl_backend.value, **kwargs)
    from kvbridge.transfer.ucx import UcxTransceiver  # written against base.KVTransceiver

    return UcxTransceiver(kv, config, model_id=model_id, host=host, port=port, name=name, **kwargs)
