"""etcd and NATS reachability for ``kvbridge doctor``: a TCP connect, then for etcd an HTTP
``GET /version`` and for NATS the ``INFO`` line the server sends first. Every step has a
timeout; nothing is written to either service."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from urllib.parse import urlsplit

from kvbridge.doctor_checks import Finding, Status

TIMEOUT_S = 3.0


def _split(url: str, default_scheme: str, default_port: int) -> tuple[str, str, int]:
    if "://" not in url:
        url = f"{default_scheme}://{url}"
    u = urlsplit(url)
    return u.scheme, u.hostname or "127.0.0.1", u.port or default_port


def _connect(host: str, port: int, timeout: float) -> socket.socket | str:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def check_etcd(urls: str | None, timeout: float = TIMEOUT_S) -> list[Finding]:
    if not urls:
        return [
            Finding(
                "etcd", Status.INFO, "no endpoint given (--etcd): `kvbridge serve` starts an embedded etcd on 127.0.0.1"
            )
        ]
    out = []
    for url in [u.strip() for u in urls.split(",") if u.strip()]:
        scheme, host, port = _split(url, "http", 2379)
        sock = _connect(host, port, timeout)
        if isinstance(sock, str):
            out.append(
                Finding(
                    f"etcd {host}:{port}",
                    Status.FAIL,
                    f"cannot connect: {sock}",
                    "check the endpoint, that etcd runs, and network policies between this pod and etcd",
                )
            )
            continue
        sock.close()
        try:
            if scheme == "https":
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    host, port, timeout=timeout, context=ssl.create_default_context()
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            conn.request("GET", "/version")
            resp = conn.getresponse()
            body = resp.read(4096).decode(errors="replace")
            conn.close()
        except (OSError, http.client.HTTPException) as e:
            out.append(
                Finding(
                    f"etcd {host}:{port}",
                    Status.FAIL,
                    f"TCP connects but GET /version failed: {e}",
                    "is this etcd's client port (2379)? with TLS use an https:// endpoint",
                )
            )
            continue
        if resp.status != 200:
            out.append(
                Finding(
                    f"etcd {host}:{port}",
                    Status.FAIL,
                    f"GET /version answered HTTP {resp.status}",
                    "is this etcd's client port (2379)?",
                )
            )
            continue
        try:
            version = json.loads(body).get("etcdserver", "?")
        except (ValueError, AttributeError):
            out.append(
                Finding(
                    f"etcd {host}:{port}",
                    Status.FAIL,
                    f"GET /version answered something else than etcd: {body[:80]!r}",
                    "is this etcd's client port (2379)?",
                )
            )
            continue
        out.append(Finding(f"etcd {host}:{port}", Status.OK, f"reachable, etcd {version}"))
    return out


def check_nats(url: str | None, timeout: float = TIMEOUT_S) -> list[Finding]:
    if not url:
        return [
            Finding(
                "nats",
                Status.INFO,
                "no server given (--nats): `kvbridge serve` starts an embedded nats-server on 127.0.0.1",
            )
        ]
    _, host, port = _split(url, "nats", 4222)
    sock = _connect(host, port, timeout)
    if isinstance(sock, str):
        return [
            Finding(
                f"nats {host}:{port}",
                Status.FAIL,
                f"cannot connect: {sock}",
                "check the URL, that nats-server runs, and network policies",
            )
        ]
    try:
        sock.settimeout(timeout)
        data = b""
        while b"\n" not in data and len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        return [
            Finding(
                f"nats {host}:{port}",
                Status.FAIL,
                f"connected, but no INFO line within {timeout:g} s: {e}",
                "is this the NATS client port (4222)?",
            )
        ]
    finally:
        sock.close()
    line = data.split(b"\n", 1)[0].decode(errors="replace").strip()
    if not line.startswith("INFO "):
        return [
            Finding(
                f"nats {host}:{port}",
                Status.FAIL,
                f"connected, but the server did not speak NATS: {line[:80]!r}",
                "is this the NATS client port (4222)?",
            )
        ]
    try:
        info = json.loads(line[5:])
    except ValueError:
        info = {}
    return [
        Finding(
            f"nats {host}:{port}",
            Status.OK,
            f"reachable, nats-server {info.get('version', '?')}" + (" (JetStream)" if info.get("jetstream") else ""),
        )
    ]
