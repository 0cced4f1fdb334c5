"""Wire capture for the deployment tests: a logging TCP proxy, an HTTP/1.1 reader, a needle search.

`WireTap` sits between the SuperNodes and the SuperLink (point the SuperNodes at `tap.address`) and
forwards bytes unchanged while keeping a copy of each direction of every connection:
``site_to_server`` (what the hospitals sent) and ``server_to_site``. With a plaintext transport
(``--insecure``) that copy is what anyone on the path would see; with TLS it is ciphertext.

`NeedleSearch` answers "which of these (up to hundreds of thousands of) byte strings occur anywhere in
these few megabytes" in one vectorised pass per needle (key) length: a rolling polynomial hash of every
window of the haystack, matched against the needles' hashes with `numpy.isin`, and only the rare
candidate positions compared in full. `bytes.find` per needle would scan the capture 150 000 times.

`http1_messages` reads the HTTP/1.1 framing of a captured plaintext connection (Flower 1.41's SuperNode
reaches the SuperLink's Fleet API over HTTP/1.1 with protobuf bodies, not over gRPC), so a test can prove
that the capture really is the Fleet API in the clear, with no compressed body a byte search would miss.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


# ----------------------------------------------------------------------------------- the proxy
@dataclass
class Connection:
    """One proxied TCP connection: what the site (the client side) sent, what the server answered."""

    peer: tuple[str, int]
    site_to_server: bytearray = field(default_factory=bytearray)
    server_to_site: bytearray = field(default_factory=bytearray)


class WireTap:
    """A forwarding TCP proxy on 127.0.0.1 that records every byte, per connection and direction.

    ``with WireTap(("127.0.0.1", superlink_port)) as tap: ...; tap.site_to_server()``. Thread per
    direction; the upstream connection is opened when a client connects (the upstream need not be
    listening before that).
    """

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        self.connections: list[Connection] = []
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self._listener = socket.create_server((host, port))
        self.host, self.port = self._listener.getsockname()[:2]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- lifecycle
    def start(self) -> "WireTap":
        t = threading.Thread(target=self._accept_loop, name="wiretap-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._closing.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> "WireTap":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- forwarding
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, peer = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = Connection(peer=peer)
            with self._lock:
                self.connections.append(conn)
                self._sockets += [client, server]
            for src, dst, buf, name in ((client, server, conn.site_to_server, "up"),
                                        (server, client, conn.server_to_site, "down")):
                t = threading.Thread(target=self._pump, args=(src, dst, buf), name=f"wiretap-{name}",
                                     daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        while True:
            try:
                chunk = src.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self._lock:
                buf += chunk
            try:
                dst.sendall(chunk)
            except OSError:
                return

    # -- what was seen
    def site_to_server(self) -> list[bytes]:
        """The bytes the sites sent, one entry per connection."""
        with self._lock:
            return [bytes(c.site_to_server) for c in self.connections]

    def server_to_site(self) -> list[bytes]:
        with self._lock:
            return [bytes(c.server_to_site) for c in self.connections]


# ---------------------------------------------------------------------------------- HTTP/1.1
@dataclass(frozen=True)
class HttpMessage:
    """One HTTP/1.1 request or response of a captured connection."""

    start_line: str                 # "POST /v1/fleet/push-object HTTP/1.1" or "HTTP/1.1 200 OK"
    headers: dict[str, str]         # lower-case names
    body: bytes


def http1_messages(stream: bytes) -> list[HttpMessage]:
    """Split one direction of a plaintext HTTP/1.1 keep-alive connection into its messages.

    Flower 1.41's SuperNode talks to the SuperLink's Fleet API over HTTP/1.1 (httpx -> uvicorn),
    with protobuf bodies (`application/protobuf`). Bodies must be plain and Content-Length-framed:
    a compressed (Content-Encoding) or chunked body raises ValueError, because a byte search over it
    would be blind. A truncated last message (capture cut at teardown) is dropped; anything that is
    not HTTP/1.1 framing raises ValueError.
    """
    out, pos = [], 0
    while pos < len(stream):
        end = stream.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        head = stream[pos:end].decode("latin-1").split("\r\n")
        start = head[0]
        if not (start.startswith("HTTP/1.1 ") or start.endswith(" HTTP/1.1")):
            raise ValueError(f"not an HTTP/1.1 message at offset {pos}: {start[:60]!r}")
        headers = {}
        for line in head[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"malformed header line at offset {pos}: {line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        if headers.get("content-encoding", "identity").lower() != "identity":
            raise ValueError(f"compressed body ({headers['content-encoding']}): the capture cannot be searched")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise ValueError("chunked body: not expected from Flower's Fleet API")
        length = int(headers.get("content-length", "0"))
        body_start = end + 4
        if body_start + length > len(stream):
            break
        out.append(HttpMessage(start, headers, stream[body_start:body_start + length]))
        pos = body_start + length
    return out


# ------------------------------------------------------------------------------ needle search
_MIN_HASHED = 8
_MULT = np.uint64(0x100000001B3)  # FNV prime; any odd multiplier works for a mod-2^64 polynomial hash


def _window_hashes(rows: np.ndarray) -> np.ndarray:
    """Polynomial hash (mod 2^64) of each row of a (count, length) uint8 array, vectorised over rows."""
    h = np.zeros(rows.shape[0], dtype=np.uint64)
    for j in range(rows.shape[1]):
        h = h * _MULT + rows[:, j].astype(np.uint64)
    return h


class NeedleSearch:
    """Which of many byte strings occur in a haystack, in one vectorised pass per key length.

    Each needle is keyed by one of its windows of ``key_len`` bytes (all of it when ``key_len`` is
    None, the right choice for many fixed-length needles such as pixel rows): the window with the
    most distinct byte values among a few evenly spaced ones, so that a row ending in a flat
    background or UIDs sharing a root prefix do not all share one key. For each key length K the
    polynomial hash of every K-byte window of the haystack is computed with numpy (Horner's rule over
    the K shifts), matched against the keys' hashes with `numpy.isin`, and only candidate positions
    are compared byte for byte: a hash collision can cost time, never give a wrong answer. The cost
    is about K vector operations over the haystack per distinct K. Needles shorter than
    ``max(8, key_len)`` are searched with `bytes.find` (keep them few).
    """

    def __init__(self, needles: Iterable[bytes], key_len: int | None = None) -> None:
        self.short: set[bytes] = set()
        self.tables: dict[int, dict[int, list[tuple[bytes, int]]]] = {}
        self._keys: dict[int, np.ndarray] = {}
        by_len: dict[int, list[bytes]] = {}
        floor = max(_MIN_HASHED, key_len or 0)
        for n in set(needles):
            if not n:
                raise ValueError("empty needle")
            (self.short.add(n) if len(n) < floor else by_len.setdefault(len(n), []).append(n))
        keyed: dict[int, list[tuple[np.ndarray, list[bytes], np.ndarray]]] = {}
        for length, group in by_len.items():
            k = key_len or length
            rows = np.frombuffer(b"".join(group), dtype=np.uint8).reshape(len(group), length)
            offsets = sorted({*range(0, length - k + 1, max(1, k // 2)), length - k})
            distinct = np.stack([_distinct_bytes(rows[:, o:o + k]) for o in offsets], axis=1)
            best = np.asarray(offsets)[np.argmax(distinct, axis=1)]
            keys = rows[np.arange(len(group))[:, None], best[:, None] + np.arange(k)]
            keyed.setdefault(k, []).append((keys, group, best))
        for k, parts in keyed.items():
            table: dict[int, list[tuple[bytes, int]]] = {}
            all_hashes = []
            for keys, group, best in parts:
                hashes = _window_hashes(keys)
                all_hashes.append(hashes)
                for h, n, o in zip(hashes.tolist(), group, best.tolist()):
                    table.setdefault(h, []).append((n, o))
            self.tables[k] = table
            self._keys[k] = np.unique(np.concatenate(all_hashes))

    def __len__(self) -> int:
        return len(self.short) + sum(len(v) for t in self.tables.values() for v in t.values())

    def find(self, haystack: bytes) -> dict[bytes, int]:
        """Every needle that occurs in ``haystack``, with the offset of one occurrence."""
        hits: dict[bytes, int] = {}
        arr = np.frombuffer(haystack, dtype=np.uint8)
        for k, table in self.tables.items():
            count = len(arr) - k + 1
            if count <= 0:
                continue
            h = np.zeros(count, dtype=np.uint64)
            for j in range(k):
                h *= _MULT
                h += arr[j:j + count]
            for pos in np.flatnonzero(np.isin(h, self._keys[k])).tolist():
                for needle, off in table.get(int(h[pos]), ()):
                    at = pos - off
                    if needle not in hits and at >= 0 and haystack.startswith(needle, at):
                        hits[needle] = at
        for needle in self.short:
            at = haystack.find(needle)
            if at >= 0:
                hits[needle] = at
        return hits


def _distinct_bytes(windows: np.ndarray) -> np.ndarray:
    """Number of distinct byte values in each row of a (count, k) uint8 array."""
    srt = np.sort(windows, axis=1)
    return 1 + (np.diff(srt, axis=1) != 0).sum(axis=1)
