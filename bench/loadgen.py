"""The ping load generator: its own process(es), speaking PROTOCOL.md.

    python -m bench.loadgen CONFIG.json

CONFIG (written by :mod:`bench.ping`, one per load generator process)::

    {"urls": ["http://127.0.0.1:PORT", …], "transport": "ws" | "http",
     "path": "/api/agent/v1/ws", "hosts": [{"token": …, "vm_names": […]}, …],
     "connections": 50, "rate": 0, "warmup": 3, "seconds": 20,
     "go": "go.json", "out": "result.json"}

Every ping is a steady 10-VM report (``PowerOn`` for each VM the host runs), the
common case of a healthy fleet.

The process opens its sockets, prints ``loadgen: ready`` and waits until the file
``go`` exists: it holds ``{"start": <wall-clock time>}``, when the warm-up starts in
every load generator process of the run (the parent measures CPU over the same
window). Nothing is recorded during the warm-up.

* Closed loop (``rate`` 0): ``connections`` pings in flight at all times, each sent as
  soon as the previous one on that slot was answered — the most the server answers.
  ``ws``: one socket per host (host *i* on ``urls[i % len(urls)]``), and the slots take
  the idle sockets in turn, so the pings rotate over all hosts and no socket has two
  pings in flight (``connections`` = hosts: every agent pings again as soon as it has
  its answer). ``http``: ``connections`` keep-alive connections, POST /ping with the
  next host's token each time.
* Open loop (``rate`` R > 0): every host pings on its own fixed schedule, every
  ``hosts / R`` seconds with a random phase, as agents do; latency is measured from the
  scheduled time, so a server that falls behind shows it (no coordinated omission).

The websocket client is a small asyncio protocol of its own (a precomputed masked
frame per host, callbacks instead of a task per socket), not aiohttp: at thousands of
pings/s on a 2-core machine the load generator must cost far less CPU than the server
it measures (its CPU is in every result).

The result has the pings answered in the measured window, per-second buckets, the
latencies (for the parent to merge), errors, and how late the open loop's sends were.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import random
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from bench.common import median, percentile

OPEN_SOCKETS_AT_ONCE = 50
OPEN_ATTEMPTS = 5
OPEN_STATS: dict[str, Any] = {}
WS_PATH = "/api/agent/v1/ws"
BARE_PATH = "/bench/bare/ws"  # bench.asgi_experiment's bare consumer


class Recorder:
    def __init__(self) -> None:
        self.measuring = False
        self.t0 = 0.0
        self.buckets: dict[int, int] = {}
        self.latencies: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.late: list[float] = []  # open loop: how late each measured send went out

    def ok(self, latency: float) -> None:
        if not self.measuring:
            return
        b = int(time.monotonic() - self.t0)
        self.buckets[b] = self.buckets.get(b, 0) + 1
        self.latencies.append(latency)

    def error(self, what: str) -> None:
        if not self.measuring:
            return
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])


def ws_message(vm_names: list[str]) -> str:
    return json.dumps({"type": "ping",
                       "vms": [{"name": n, "power_state": "PowerOn"} for n in vm_names]})


def http_body(vm_names: list[str]) -> bytes:
    return json.dumps({"vms": [{"name": n, "power_state": "PowerOn"}
                               for n in vm_names]}).encode()


# --- a minimal websocket client (RFC 6455, client side) ---------------------------------

def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One final, masked client frame (clients must mask; any key will do)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + masked


class WsClient(asyncio.Protocol):
    """One agent's socket. ``on_text(sock, payload)`` / ``on_close(sock)`` are set by
    the load driver; the server's websocket pings are answered as they come."""

    def __init__(self, request: bytes, frame: bytes):
        self.request = request
        self.frame = frame
        self.buf = bytearray()
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.closed = False
        self.close_code: int | None = None
        self.transport: asyncio.Transport | None = None
        self.on_text = None
        self.on_close = None
        self.sent = 0.0  # when the ping in flight was sent (or was due: open loop)
        self.due = 0.0
        self.busy = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def send(self) -> None:
        self.busy = True
        self.transport.write(self.frame)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            del buf[:end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(
                        head.split(b"\r\n", 1)[0].decode("latin-1")))
                self.transport.close()
                return
            self.upgraded = True
            self.opened.set_result(None)
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            h = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n = int.from_bytes(buf[2:4], "big")
                h = 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n = int.from_bytes(buf[2:10], "big")
                h = 10
            if b1 & 0x80:
                h += 4  # servers do not mask; skip a key if one is there
            if len(buf) < h + n:
                return
            payload = bytes(buf[h:h + n])
            del buf[:h + n]
            op = b0 & 0x0F
            if op in (0, 1, 2):
                self.busy = False
                if self.on_text is not None:
                    self.on_text(self, payload)
            elif op == 9:  # the server's ping: pong at once
                self.transport.write(client_frame(payload, 0xA))
            elif op == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 \
                    else None
                self.transport.write(client_frame(payload[:2], 0x8))
                self.transport.close()
                return

    def connection_lost(self, exc) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        was_closed, self.closed = self.closed, True
        if not was_closed and self.on_close is not None:
            self.on_close(self)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.on_close = None
            self.closed = True
            self.transport.write(client_frame(b"\x03\xe8", 0x8))  # 1000 normal closure
            self.transport.close()


async def open_sockets(cfg: dict) -> list[WsClient]:
    urls, hosts = cfg["urls"], cfg["hosts"]
    path = cfg.get("path") or WS_PATH
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(OPEN_SOCKETS_AT_ONCE)
    opened = retries = 0
    open_errors: list[str] = []
    shown = time.monotonic()

    async def one(i: int, h: dict) -> WsClient:
        nonlocal opened, shown, retries
        u = urlsplit(urls[i % len(urls)])
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {h['token']}\r\n"
                   f"\r\n").encode()
        frame = client_frame(ws_message(h["vm_names"]).encode())
        for attempt in range(OPEN_ATTEMPTS):
            async with slots:
                try:
                    _, sock = await loop.create_connection(
                        lambda: WsClient(request, frame), u.hostname, u.port)
                    await asyncio.wait_for(sock.opened, 30)
                    break
                except (OSError, TimeoutError, ConnectionError) as exc:
                    if attempt == OPEN_ATTEMPTS - 1:
                        raise
                    retries += 1
                    if len(open_errors) < 5:
                        open_errors.append(f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(0.5 * (attempt + 1))  # as an agent backs off
        opened += 1
        if time.monotonic() - shown > 3:
            shown = time.monotonic()
            print(f"loadgen: {opened}/{len(hosts)} sockets open", flush=True)
        return sock

    sockets = list(await asyncio.gather(*(one(i, h) for i, h in enumerate(hosts))))
    if retries:
        print(f"loadgen: {retries} socket opens retried, e.g. {open_errors}", flush=True)
    OPEN_STATS.update(retries=retries, errors=open_errors)
    return sockets


def _problem(payload: bytes) -> str | None:
    return None if b'"pong"' in payload else payload[:200].decode("utf-8", "replace")


async def closed_ws(sockets: list[WsClient], cfg: dict, rec: Recorder, stop_at: float) -> None:
    """``connections`` pings in flight; an answered socket goes to the back of the idle
    queue and the slot sends on the socket at its front."""
    loop = asyncio.get_running_loop()
    idle = collections.deque(sockets)
    slots = min(cfg["connections"], len(sockets))
    running = [slots]
    done = loop.create_future()
    clock = time.perf_counter

    def next_ping() -> None:
        while idle and time.monotonic() < stop_at:
            s = idle.popleft()
            if s.closed:
                continue
            s.sent = clock()
            s.send()
            return
        running[0] -= 1
        if running[0] <= 0 and not done.done():
            done.set_result(None)

    def on_text(s: WsClient, payload: bytes) -> None:
        problem = _problem(payload)
        if problem is None:
            rec.ok(clock() - s.sent)
        else:
            rec.error(problem)
        idle.append(s)
        next_ping()

    def on_close(s: WsClient) -> None:
        rec.error(f"socket closed ({s.close_code})")
        if s.busy:
            next_ping()  # the slot goes on with another socket
        else:
            try:
                idle.remove(s)
            except ValueError:
                pass

    for s in sockets:
        s.on_text, s.on_close = on_text, on_close
    for _ in range(slots):
        next_ping()
    await asyncio.wait_for(done, max(1.0, stop_at - time.monotonic()) + 60)


async def open_ws(sockets: list[WsClient], cfg: dict, rec: Recorder, start: float,
                  stop_at: float) -> None:
    """Every socket pings every ``len(sockets) / rate`` s from a random phase, the next
    one when due or, if the previous answer came late, as soon as it came."""
    loop = asyncio.get_running_loop()
    interval = len(sockets) / cfg["rate"]
    rng = random.Random(1)
    remaining = [len(sockets)]
    done = loop.create_future()

    def finished() -> None:
        remaining[0] -= 1
        if remaining[0] <= 0 and not done.done():
            done.set_result(None)

    def fire(s: WsClient) -> None:
        if s.closed:
            return
        if rec.measuring:
            rec.late.append(time.monotonic() - s.due)
        s.send()

    def schedule(s: WsClient) -> None:
        if s.due >= stop_at:
            finished()
            return
        loop.call_at(s.due, fire, s)

    def on_text(s: WsClient, payload: bytes) -> None:
        problem = _problem(payload)
        if problem is None:
            rec.ok(time.monotonic() - s.due)
        else:
            rec.error(problem)
        s.due += interval
        schedule(s)

    def on_close(s: WsClient) -> None:
        rec.error(f"socket closed ({s.close_code})")
        finished()

    for s in sockets:
        s.on_text, s.on_close = on_text, on_close
        s.due = start + rng.uniform(0, interval)
        schedule(s)
    await asyncio.wait_for(done, max(1.0, stop_at - time.monotonic()) + 120)


# --- HTTP (aiohttp) -----------------------------------------------------------------------

async def http_ping(session, url: str, token: str, body: bytes, rec: Recorder,
                    since: float) -> None:
    try:
        async with session.post(url, data=body, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json",
        }) as r:
            await r.read()
            if r.status == 200:
                rec.ok(time.monotonic() - since)
            else:
                rec.error(f"HTTP {r.status}")
    except Exception as exc:  # noqa: BLE001
        rec.error(f"{type(exc).__name__}: {exc}")


async def run_http(session, cfg: dict, rec: Recorder, start: float, stop_at: float) -> None:
    urls, hosts = cfg["urls"], cfg["hosts"]
    prepared = [(urls[i % len(urls)] + "/api/agent/v1/ping", h["token"],
                 http_body(h["vm_names"])) for i, h in enumerate(hosts)]
    if not cfg["rate"]:
        turn = 0

        async def slot() -> None:
            nonlocal turn
            while time.monotonic() < stop_at:
                url, token, body = prepared[turn % len(prepared)]
                turn += 1
                await http_ping(session, url, token, body, rec, time.monotonic())

        await asyncio.gather(*(slot() for _ in range(cfg["connections"])))
        return
    interval = len(prepared) / cfg["rate"]
    rng = random.Random(1)

    async def agent(url: str, token: str, body: bytes) -> None:
        due = start + rng.uniform(0, interval)
        while due < stop_at:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await http_ping(session, url, token, body, rec, due)
            due += interval

    await asyncio.gather(*(agent(*p) for p in prepared))


# --- one run --------------------------------------------------------------------------------

async def wait_for_go(path: str | None) -> float:
    """The monotonic time at which the warm-up starts: the wall-clock ``start`` in the
    file ``path`` once it exists (now, without one)."""
    if not path:
        return time.monotonic()
    while not os.path.exists(path):
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.02)  # written whole (the parent renames it into place)
    with open(path) as f:
        start_wall = json.load(f)["start"]
    return time.monotonic() + (start_wall - time.time())


async def main_async(cfg: dict) -> dict:
    rec = Recorder()
    sockets: list[WsClient] = []
    open_s = None
    session = None
    if cfg["transport"] == "ws":
        t = time.monotonic()
        sockets = await open_sockets(cfg)
        open_s = round(time.monotonic() - t, 1)
        print(f"loadgen: {len(sockets)} sockets open in {open_s} s", flush=True)
    else:
        import aiohttp

        http_slots = cfg["connections"] * len(cfg["urls"])
        connector = aiohttp.TCPConnector(limit=http_slots, limit_per_host=cfg["connections"])
        session = aiohttp.ClientSession(connector=connector,
                                        timeout=aiohttp.ClientTimeout(total=60))
    print("loadgen: ready", flush=True)
    start = await wait_for_go(cfg.get("go"))
    measure_at = start + cfg["warmup"]
    stop_at = measure_at + cfg["seconds"]
    loop = asyncio.get_running_loop()

    def begin() -> None:
        rec.t0 = time.monotonic()
        rec.measuring = True

    def end() -> None:
        rec.measuring = False

    loop.call_at(measure_at, begin)
    loop.call_at(stop_at, end)
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    try:
        if cfg["transport"] == "ws":
            if cfg["rate"]:
                await open_ws(sockets, cfg, rec, start, stop_at)
            else:
                await closed_ws(sockets, cfg, rec, stop_at)
        else:
            await run_http(session, cfg, rec, start, stop_at)
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()) + 0.01)
    finally:
        for sock in sockets:
            sock.close()
        if session is not None:
            await session.close()
    wall = cfg["seconds"]
    n = len(rec.latencies)
    return {
        "transport": cfg["transport"],
        "path": cfg.get("path") or WS_PATH,
        "hosts": len(cfg["hosts"]),
        "connections": cfg["connections"],
        "rate_target": cfg["rate"],
        "seconds": wall,
        "pings": n,
        "buckets": {str(k): v for k, v in rec.buckets.items()},
        "latencies": [round(x, 5) for x in rec.latencies],
        "late_p99_ms": round(percentile(rec.late, 99) * 1000, 2) if rec.late else None,
        "errors": rec.errors,
        "error_samples": rec.error_samples,
        "sockets_open_s": open_s,
        "socket_open_retries": OPEN_STATS.get("retries", 0),
        "socket_open_errors": OPEN_STATS.get("errors", []),
    }


def merge(parts: list[dict]) -> dict[str, Any]:
    """One result from the results of the load generator processes of one run."""
    first = parts[0]
    wall = first["seconds"]
    latencies = [x for p in parts for x in p["latencies"]]
    buckets = [sum(p["buckets"].get(str(i), 0) for p in parts) for i in range(int(wall))]
    n = len(latencies)
    rate = sum(p["rate_target"] for p in parts)
    conns = sum(p["connections"] for p in parts)
    lates = [p["late_p99_ms"] for p in parts if p["late_p99_ms"] is not None]
    opens = [p["sockets_open_s"] for p in parts if p["sockets_open_s"] is not None]
    return {
        "transport": first["transport"],
        "path": first["path"],
        "mode": f"open loop, {rate:g}/s" if rate else f"closed loop, {conns} in flight",
        "hosts": sum(p["hosts"] for p in parts),
        "connections": conns,
        "rate_target": rate,
        "seconds": wall,
        "pings": n,
        "pings_per_s": round(n / wall, 1),
        "median_bucket_per_s": median(buckets),
        "min_bucket_per_s": min(buckets) if buckets else None,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2) if n else None,
        "p99_ms": round(percentile(latencies, 99) * 1000, 2) if n else None,
        "max_ms": round(max(latencies) * 1000, 2) if n else None,
        "send_late_p99_ms": max(lates) if lates else None,
        "errors": sum(p["errors"] for p in parts),
        "error_samples": [s for p in parts for s in p["error_samples"]][:5],
        "sockets_open_s": max(opens) if opens else None,
        "socket_open_retries": sum(p["socket_open_retries"] for p in parts),
        "socket_open_errors": [s for p in parts for s in p["socket_open_errors"]][:5],
        "loadgen_processes": len(parts),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        cfg = json.load(f)
    cfg.setdefault("rate", 0)
    cfg.setdefault("warmup", 3)
    result = asyncio.run(main_async(cfg))
    tmp = cfg["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, cfg["out"])
    print(f"loadgen: {result['pings']} pings in {result['seconds']} s "
          f"({result['pings'] / result['seconds']:.1f}/s), {result['errors']} errors",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
