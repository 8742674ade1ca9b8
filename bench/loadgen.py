"""The ping load generator: its own process, asyncio + aiohttp, speaking PROTOCOL.md.

    python -m bench.loadgen CONFIG.json

CONFIG (written by :mod:`bench.ping`)::

    {"urls": ["http://127.0.0.1:PORT", …], "transport": "ws" | "http",
     "hosts": [{"token": …, "vm_names": […]}, …], "connections": 50,
     "rate": 0, "warmup": 3, "seconds": 20, "cpu_groups": {"web": [pgid, …]},
     "out": "result.json"}

Every ping is a steady 10-VM report (``PowerOn`` for each VM the host runs), the
common case of a healthy fleet.

* Closed loop (``rate`` 0): ``connections`` pings in flight at all times, each sent as
  soon as the previous one on that slot was answered — the most the server answers.
  ``ws``: one socket per host (host *i* on ``urls[i % len(urls)]``), and the slots take
  the idle sockets in turn, so the pings rotate over all hosts and no socket has two
  pings in flight. ``http``: ``connections`` keep-alive connections, POST /ping with the
  next host's token each time.
* Open loop (``rate`` R > 0): every host pings on its own fixed schedule, every
  ``hosts / R`` seconds with a random phase, as agents do; latency is measured from the
  scheduled time, so a server that falls behind shows it (no coordinated omission).

Nothing is recorded during the warm-up. The result has the pings answered in the
measured window, per-second buckets, latency percentiles, errors, and the CPU used by
the process groups in ``cpu_groups``, by PostgreSQL and by this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from typing import Any

import aiohttp

from bench.common import CpuMeter, median, percentile

OPEN_SOCKETS_AT_ONCE = 50
OPEN_ATTEMPTS = 5
OPEN_STATS: dict[str, Any] = {}


class Recorder:
    def __init__(self) -> None:
        self.measuring = False
        self.t0 = 0.0
        self.buckets: dict[int, int] = {}
        self.latencies: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.sent = 0

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


class Socket:
    """One host's websocket. A reader task takes every frame as it arrives, so the
    server's websocket pings are answered at once (aiohttp answers them only while
    someone reads) even when the host is idle between its own pings."""

    def __init__(self, ws, message: str):
        self.ws = ws
        self.message = message
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                self.inbox.put_nowait(msg)
        finally:
            self.inbox.put_nowait(None)  # closed

    async def ping(self) -> str | None:
        """Send the ping and wait for the answer; an error text, or None when a pong
        came back."""
        await self.ws.send_str(self.message)
        answer = await self.inbox.get()
        if answer is None:
            self.inbox.put_nowait(None)
            return f"socket closed ({self.ws.close_code})"
        if answer.type == aiohttp.WSMsgType.TEXT and '"pong"' in answer.data:
            return None
        return f"{answer.type.name}: {str(answer.data)[:200]}"

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


async def open_sockets(session: aiohttp.ClientSession, cfg: dict) -> list[Socket]:
    urls, hosts = cfg["urls"], cfg["hosts"]
    slots = asyncio.Semaphore(OPEN_SOCKETS_AT_ONCE)
    opened = retries = 0
    open_errors: list[str] = []
    shown = time.monotonic()

    async def one(i: int, h: dict):
        nonlocal opened, shown, retries
        url = urls[i % len(urls)].replace("http://", "ws://") + "/api/agent/v1/ws"
        for attempt in range(OPEN_ATTEMPTS):
            async with slots:
                try:
                    ws = await session.ws_connect(
                        url, headers={"Authorization": f"Bearer {h['token']}"},
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
                        autoping=True, heartbeat=None)
                    break
                except (aiohttp.ClientError, OSError) as exc:
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
        return Socket(ws, ws_message(h["vm_names"]))

    sockets = list(await asyncio.gather(*(one(i, h) for i, h in enumerate(hosts))))
    if retries:
        print(f"loadgen: {retries} socket opens retried, e.g. {open_errors}", flush=True)
    OPEN_STATS.update(retries=retries, errors=open_errors)
    return sockets


async def closed_ws(sockets, cfg: dict, rec: Recorder, stop_at: float) -> None:
    idle: asyncio.Queue = asyncio.Queue()
    for s in sockets:
        idle.put_nowait(s)

    async def slot() -> None:
        while time.monotonic() < stop_at:
            try:
                sock = await asyncio.wait_for(
                    idle.get(), timeout=max(0.01, stop_at - time.monotonic()))
            except TimeoutError:
                return
            t = time.perf_counter()
            try:
                problem = await sock.ping()
            except Exception as exc:  # noqa: BLE001
                rec.error(f"{type(exc).__name__}: {exc}")
                continue  # the socket is dropped from the rotation
            if problem is None:
                rec.ok(time.perf_counter() - t)
                idle.put_nowait(sock)
            else:
                rec.error(problem)
                if not sock.ws.closed:
                    idle.put_nowait(sock)

    await asyncio.gather(*(slot() for _ in range(min(cfg["connections"], len(sockets)))))


async def open_ws(sockets, cfg: dict, rec: Recorder, start: float, stop_at: float) -> None:
    interval = len(sockets) / cfg["rate"]
    rng = random.Random(1)

    async def agent(sock: Socket) -> None:
        due = start + rng.uniform(0, interval)
        while due < stop_at:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                problem = await sock.ping()
            except Exception as exc:  # noqa: BLE001
                rec.error(f"{type(exc).__name__}: {exc}")
                return
            if problem is None:
                rec.ok(time.monotonic() - due)
            else:
                rec.error(problem)
                if sock.ws.closed:
                    return
            due += interval

    await asyncio.gather(*(agent(sock) for sock in sockets))


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


async def main_async(cfg: dict) -> dict:
    rec = Recorder()
    http_slots = cfg["connections"] * len(cfg["urls"]) if cfg["transport"] == "http" else 0
    connector = aiohttp.TCPConnector(limit=http_slots or 0, limit_per_host=cfg["connections"]
                                     if http_slots else 0, force_close=False)
    meter = CpuMeter(groups={**{k: list(v) for k, v in cfg.get("cpu_groups", {}).items()},
                             "loadgen": [os.getpgrp()]},
                     pg_database=cfg.get("pg_database", ""))
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        sockets: list = []
        open_s = None
        if cfg["transport"] == "ws":
            t = time.monotonic()
            sockets = await open_sockets(session, cfg)
            open_s = round(time.monotonic() - t, 1)
            print(f"loadgen: {len(sockets)} sockets open in {open_s} s", flush=True)
        start = time.monotonic()
        measure_at = start + cfg["warmup"]
        stop_at = measure_at + cfg["seconds"]

        async def switch() -> None:
            await asyncio.sleep(max(0.0, measure_at - time.monotonic()))
            rec.t0 = time.monotonic()
            rec.measuring = True
            meter.start()
            print("loadgen: measuring", flush=True)
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
            rec.measuring = False
            meter.stop()

        switcher = asyncio.create_task(switch())
        if cfg["transport"] == "ws":
            if cfg["rate"]:
                await open_ws(sockets, cfg, rec, start, stop_at)
            else:
                await closed_ws(sockets, cfg, rec, stop_at)
        else:
            await run_http(session, cfg, rec, start, stop_at)
        await switcher
        for sock in sockets:
            await sock.close()
    wall = cfg["seconds"]
    full = [rec.buckets.get(i, 0) for i in range(int(wall))]
    n = len(rec.latencies)
    return {
        "transport": cfg["transport"],
        "mode": f"open loop, {cfg['rate']}/s" if cfg["rate"] else
                f"closed loop, {cfg['connections']} in flight",
        "hosts": len(cfg["hosts"]),
        "web_processes": len(cfg["urls"]),
        "connections": cfg["connections"],
        "rate_target": cfg["rate"],
        "seconds": wall,
        "pings": n,
        "pings_per_s": round(n / wall, 1),
        "median_bucket_per_s": median(full),
        "min_bucket_per_s": min(full) if full else None,
        "p50_ms": round(percentile(rec.latencies, 50) * 1000, 2) if n else None,
        "p99_ms": round(percentile(rec.latencies, 99) * 1000, 2) if n else None,
        "max_ms": round(max(rec.latencies) * 1000, 2) if n else None,
        "errors": rec.errors,
        "error_samples": rec.error_samples,
        "sockets_open_s": open_s,
        "socket_open_retries": OPEN_STATS.get("retries", 0),
        "socket_open_errors": OPEN_STATS.get("errors", []),
        "cpu": meter.result,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        cfg = json.load(f)
    cfg.setdefault("rate", 0)
    cfg.setdefault("warmup", 3)
    result = asyncio.run(main_async(cfg))
    with open(cfg["out"], "w") as f:
        json.dump(result, f)
    print(f"loadgen: {result['pings']} pings in {result['seconds']} s "
          f"({result['pings_per_s']}/s), {result['errors']} errors", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
