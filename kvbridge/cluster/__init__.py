"""Control plane: who is alive (etcd, leases), what they cache and how loaded they are (NATS),
and the local etcd + nats-server launcher.

    services.py   LocalServices / EtcdServer / NatsServer: real servers on 127.0.0.1, free ports
    messages.py   WorkerInfo, KVEvent, LoadReport: versioned msgspec Structs, one serializer
    discovery.py  Registration (a worker keeps its key alive) and WorkerWatcher (the live view)
    events.py     EventBus (NATS), KVEventPublisher, LoadPublisher, KVIndex, LoadView
    backoff.py    retry helpers
"""

from __future__ import annotations

from .discovery import DEFAULT_TTL, Registration, WorkerWatcher, worker_key, workers_prefix
from .events import EventBus, KVEventPublisher, KVIndex, LoadPublisher, LoadView, kv_subject, load_subject
from .messages import PROTOCOL_VERSION, KVEvent, LoadReport, ProtocolError, WorkerInfo, WorkerRole
from .services import EtcdServer, LocalServices, NatsServer, ServiceError

__all__ = [
    "DEFAULT_TTL",
    "PROTOCOL_VERSION",
    "EtcdServer",
    "EventBus",
    "KVEvent",
    "KVEventPublisher",
    "KVIndex",
    "LoadPublisher",
    "LoadReport",
    "LoadView",
    "LocalServices",
    "NatsServer",
    "ProtocolError",
    "Registration",
    "ServiceError",
    "WorkerInfo",
    "WorkerRole",
    "WorkerWatcher",
    "kv_subject",
    "load_subject",
    "worker_key",
    "workers_prefix",
]
