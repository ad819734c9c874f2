"""Talking to devices through a TVM RPC tracker: address parsing, reachability and key
checks with one-line errors, and sessions."""

from __future__ import annotations

import socket

from ..errors import RebirthError


def parse_tracker(text: str) -> tuple:
    """'host:port' -> (host, port)."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RebirthError(f"--tracker '{text}': expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def tracker_summary(host: str, port: int) -> dict:
    """The tracker's summary ({"queue_info": {key: {free, pending}}, "server_info": [...]}),
    or a one-line error when nothing answers at host:port."""
    from tvm import rpc

    try:  # fail fast: connect_tracker itself retries for a minute
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        raise RebirthError(f"RPC tracker {host}:{port} is unreachable ({exc.strerror or exc})")
    try:
        return rpc.connect_tracker(host, port).summary()
    except Exception as exc:  # noqa: BLE001 -- something answered, but not a tracker
        raise RebirthError(f"{host}:{port} did not answer as an RPC tracker "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")


def require_key(host: str, port: int, key: str) -> dict:
    """The tracker's queue entry for ``key``; a one-line error listing the keys it has."""
    queues = tracker_summary(host, port).get("queue_info", {})
    if key not in queues:
        known = ", ".join(sorted(queues)) or "none"
        raise RebirthError(f"no device with key '{key}' on tracker {host}:{port} "
                           f"(keys there: {known})")
    return queues[key]


def request_session(host: str, port: int, key: str, timeout: float = 600):
    """A session on a free device with ``key`` (waits while all are busy)."""
    from tvm import rpc

    try:
        return rpc.connect_tracker(host, port).request(key, priority=1,
                                                       session_timeout=timeout)
    except Exception as exc:  # noqa: BLE001
        raise RebirthError(f"no session with key '{key}' from tracker {host}:{port} "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
