"""Talking to devices through a TVM RPC tracker: address parsing, reachability and key
checks with one-line errors, and sessions.

Every wait on the network has a deadline and an error naming what it waited for: TVM's own
tracker client waits without one (a port where an HTTP server or a hung process listens
held `bench` and `tune` for ever), so the tracker protocol (a magic number, then JSON
messages with a length prefix) is spoken here with socket timeouts.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import struct
import time

from ..errors import RebirthError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0    # seconds to open a TCP connection
ANSWER_TIMEOUT = 15.0    # seconds for a tracker to answer a message
GONE_GRACE = 20.0        # seconds a key may have no server at all while a request waits
REQUEST_WAIT = 900.0     # seconds a request may wait for a busy device

_TRACKER_MAGIC = 0x2F271  # tvm.rpc.base.RPC_TRACKER_MAGIC
_SUCCESS, _REQUEST, _SUMMARY = 0, 4, 6  # tvm.rpc.base.TrackerCode
_MAX_MESSAGE = 64 << 20


def parse_tracker(text: str) -> tuple:
    """'host:port' -> (host, port)."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RebirthError(f"--tracker '{text}': expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def _recv_exact(sock, nbytes: int, where: str) -> bytes:
    chunks, got = [], 0
    while got < nbytes:
        try:
            chunk = sock.recv(min(nbytes - got, 1 << 16))
        except socket.timeout:
            raise RebirthError(f"{where} did not answer as an RPC tracker within "
                               f"{sock.gettimeout():g}s") from None
        except OSError as exc:
            raise RebirthError(f"{where}: connection failed ({exc.strerror or exc})") from None
        if not chunk:
            raise RebirthError(f"{where} closed the connection (not an RPC tracker?)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _send_json(sock, value, where: str) -> None:
    data = json.dumps(value).encode()
    try:
        sock.sendall(struct.pack("<i", len(data)) + data)
    except OSError as exc:
        raise RebirthError(f"{where}: sending to the tracker failed ({exc.strerror or exc})")


def _recv_json(sock, where: str):
    size = struct.unpack("<i", _recv_exact(sock, 4, where))[0]
    if not 0 < size <= _MAX_MESSAGE:
        raise RebirthError(f"{where} did not answer as an RPC tracker (a garbled message)")
    try:
        return json.loads(_recv_exact(sock, size, where).decode())
    except (UnicodeDecodeError, ValueError):
        raise RebirthError(f"{where} did not answer as an RPC tracker (a garbled message)")


def _open_tracker(host: str, port: int):
    """A socket to the tracker at host:port after the magic-number handshake."""
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise RebirthError(f"RPC tracker {where} is unreachable ({exc.strerror or exc})")
    try:
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            sock.sendall(struct.pack("<i", _TRACKER_MAGIC))
        except OSError as exc:
            raise RebirthError(f"RPC tracker {where}: connection failed ({exc.strerror or exc})")
        magic = struct.unpack("<i", _recv_exact(sock, 4, where))[0]
        if magic != _TRACKER_MAGIC:
            raise RebirthError(f"{where} did not answer as an RPC tracker (it sent "
                               f"0x{magic & 0xFFFFFFFF:08x}, not the tracker's magic number)")
    except BaseException:
        sock.close()
        raise
    return sock


def _ask(sock, message, where: str):
    _send_json(sock, message, where)
    value = _recv_json(sock, where)
    if not isinstance(value, list) or not value or value[0] != _SUCCESS:
        raise RebirthError(f"{where} did not answer as an RPC tracker (answer {str(value)[:100]})")
    return value[1] if len(value) > 1 else None


def tracker_summary(host: str, port: int) -> dict:
    """The tracker's summary ({"queue_info": {key: {free, pending}}, "server_info": [...]}),
    or a one-line error when nothing (or not a tracker) answers at host:port in time."""
    sock = _open_tracker(host, port)
    try:
        summary = _ask(sock, [_SUMMARY], f"{host}:{port}")
    finally:
        sock.close()
    if not isinstance(summary, dict):
        raise RebirthError(f"{host}:{port} did not answer as an RPC tracker (no summary)")
    return summary


def require_key(host: str, port: int, key: str) -> dict:
    """The tracker's queue entry for ``key``; a one-line error listing the keys it has."""
    queues = tracker_summary(host, port).get("queue_info", {})
    if key not in queues:
        known = ", ".join(sorted(queues)) or "none"
        raise RebirthError(f"no device with key '{key}' on tracker {host}:{port} "
                           f"(keys there: {known})")
    return queues[key]


def servers_of(summary: dict, key: str) -> int:
    """How many servers (free or busy) are connected to the tracker under ``key``."""
    return sum(1 for s in summary.get("server_info", [])
               if str(s.get("key", "")).split(":", 1)[-1] == key)


def _wait_for_server(host, port, key, wait, poll=2.0):
    """Ask the tracker for a server with ``key``; [host, port, matchkey] once one is free.
    Gives up when the key has had no server at all for GONE_GRACE seconds (its devices went
    away) or after ``wait`` seconds of busy devices."""
    where = f"{host}:{port}"
    sock = _open_tracker(host, port)
    try:
        _send_json(sock, [_REQUEST, key, "", 1], where)
        started = time.monotonic()
        gone_since = None
        while True:
            ready, _, _ = select.select([sock], [], [], poll)
            if ready:
                value = _recv_json(sock, where)
                if not isinstance(value, list) or len(value) < 2 or value[0] != _SUCCESS:
                    raise RebirthError(f"tracker {where} refused the request for '{key}' "
                                       f"({str(value)[:100]})")
                return value[1]
            now = time.monotonic()
            if servers_of(tracker_summary(host, port), key):
                gone_since = None
            elif gone_since is None:
                gone_since = now
            elif now - gone_since >= GONE_GRACE:
                raise RebirthError(f"timed out after {now - started:.0f}s waiting for a device "
                                   f"with key '{key}' from tracker {where}: no server with that "
                                   "key is connected any more (killed or gone)")
            if now - started >= wait:
                raise RebirthError(f"timed out after {wait:.0f}s waiting for a free device "
                                   f"with key '{key}' from tracker {where} (all busy)")
    finally:
        sock.close()


def request_session(host: str, port: int, key: str, timeout: float = 600,
                    wait: float = REQUEST_WAIT, attempts: int = 3):
    """A session on a free device with ``key``; waits while all are busy (up to ``wait``
    seconds), fails when the key has no server left. ``timeout``: the session's length,
    after which the device ends it."""
    from tvm import rpc

    last = None
    for _ in range(attempts):
        server_host, server_port, matchkey = _wait_for_server(host, port, key, wait)
        try:  # a server that died after the tracker handed it out refuses at once
            return rpc.connect(server_host, server_port, matchkey, session_timeout=timeout)
        except Exception as exc:  # noqa: BLE001
            last = exc
            logger.warning(f"[rpc] device {server_host}:{server_port} ('{key}') did not take "
                           f"the session: {(str(exc).splitlines() or [''])[0][:200]}")
    raise RebirthError(f"no session with key '{key}' from tracker {host}:{port} "
                       f"({type(last).__name__}: {(str(last).splitlines() or [''])[0][:200]})")
