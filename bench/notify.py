"""``bench notify``: notification delay (R20) — incident declared → webhook received.

The whole system runs (:class:`bench.system.System`: daphne, a qcluster engine, the
fleet simulator, over real HTTP) with ``ping.interval`` set through the operator API.
The bench process runs a real HTTP webhook receiver on a loopback port (a threaded
``http.server``, answering 200 at once) and creates a ``webhook`` notification channel
pointing at it through the operator API (``POST /api/v1/notification-channels``).

When the fleet is ready, hosts are powered off one at a time through the simulator's
control API (each in another cluster, the next only after the previous incident's
``resolved``/``failed`` notification arrived). For each:

* **declared** — the incident's ``declared_at`` (from the payload; checked against
  ``GET /api/v1/incidents/{id}``) → the ``declared`` webhook received (the receiver's
  clock: same machine, same clock as the server's timestamps);
* **opened** — the incident's ``detected_at`` → the ``opened`` webhook received;
* for context, the power-off → ``declared`` received (detection included).

**Floor**, in the same run: "send test" round trips, ``POST
/api/v1/notification-channels/{id}/test`` → the ``test`` webhook received, before
each power-off (after a random pause of up to a second, see :func:`send_test`). A
test is queued by the web process, so the engine's sender picks it
up on its next look (every second: up to 1 s more), whereas a declared incident is
queued in the engine process itself, which wakes its sender at once: the test round
trip is what a web-queued delivery costs, not a strict lower bound of the declared
delay. So beside each test, the HTTP part alone is measured too: the test's body
POSTed from the bench process with ``httpx.post`` (a new connection, as the sender
does) → received.

``declared_at`` is the engine's clock just before the HostDown transaction (status
Down, HA work for every VM, the incident's VMs, the alert and its delivery, one
commit), so the declared delay includes that transaction.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from hadash.supervisor import free_port
from notify.sender import POLL

from .common import (
    BenchDatabase,
    BenchError,
    fmt,
    interruptible,
    machine_busy,
    machine_info,
    median,
    say,
    table,
    throwaway_database,
)
from .detect import pick_victims
from .system import System, parse_time

# --- the webhook receiver ------------------------------------------------------------------

class Receiver:
    """A real HTTP webhook receiver in this process: every POST is recorded with the
    time it was read in full (``time.time()``), then answered 200. Duplicates (the same
    ``Idempotency-Key``, e.g. a retry after a lost answer) are counted, not recorded."""

    def __init__(self) -> None:
        self.port = free_port()
        self.messages: list[dict[str, Any]] = []
        self.duplicates = 0
        self.bad = 0
        self._keys: set[str] = set()
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                t = time.time()
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = None
                receiver.record(t, self.headers.get("Idempotency-Key") or "",
                                self.headers.get("X-Hadash-Delivery") or "", payload)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="bench-webhook-receiver")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hadash-webhook"

    def record(self, t: float, key: str, delivery: str, payload: Any) -> None:
        with self._lock:
            if not isinstance(payload, dict):
                self.bad += 1
                return
            key = key or payload.get("idempotency_key") or ""
            if key in self._keys:
                self.duplicates += 1
                return
            self._keys.add(key)
            self.messages.append({"t": t, "delivery": delivery, "payload": payload})
            self._lock.notify_all()

    def wait_for(self, what: str, match, timeout: float, alive=None) -> dict[str, Any]:
        """The first message for which ``match(message)`` is true; BenchError after
        ``timeout`` s (checking ``alive`` every second)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for m in self.messages:
                    if match(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m["payload"].get("transition"),
                             (m["payload"].get("alert") or {}).get("subject_name"))
                            for m in self.messages[-10:]]
                    raise BenchError(f"no webhook for {what} within {timeout:.0f} s; the "
                                     f"last received: {seen}")
                self._lock.wait(min(1.0, left))
                if alive is not None:
                    self._lock.release()
                    try:
                        alive()
                    finally:
                        self._lock.acquire()

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _incident(m: dict[str, Any]) -> dict[str, Any]:
    return m["payload"].get("incident") or {}


def _transition(m: dict[str, Any]) -> str:
    return m["payload"].get("transition") or ""


# --- the run ---------------------------------------------------------------------------------

def run(o: dict[str, Any]) -> dict[str, Any]:
    with interruptible(), throwaway_database(o) as (db, tmp):
        return _run(o, db, tmp)


def _run(o: dict[str, Any], db: BenchDatabase, tmp: Path) -> dict[str, Any]:
    config = {"ping.interval": str(o["ping_interval"])}
    info = machine_info(db)
    load_before = os.getloadavg()
    system = System(db, tmp, verbose=o["verbose"], config=config)
    failures: list[dict] = []
    tests: list[dict] = []
    with Receiver() as receiver, system:
        system.start(hosts=o["hosts"], vms=o["vms"], ha_ratio=o["ha_ratio"],
                     clusters=o["clusters"], start_delay=o["start_delay"])
        r = system.api.post("/notification-channels", json={
            "name": "bench-receiver", "kind": "webhook", "url": receiver.url,
            "min_severity": "warning"})
        if r.status_code != 201:
            raise BenchError(f"POST /notification-channels: HTTP {r.status_code} "
                             f"{r.text[:300]}")
        channel = r.json()
        say(f"webhook channel #{channel['id']} → {receiver.url}")
        cfg = {c["name"]: c["value"] for c in system.get("/config")}
        ready = system.wait_ready(o["timeout"] or 300 + 0.1 * o["vms"])
        interval = float(cfg["ping.interval"])
        settle = 2 * interval
        say(f"fleet ready in {ready:.0f} s; settling {settle:.0f} s")
        time.sleep(settle)
        with_ha = {v["host"] for v in system.get("/vms", ha_enabled="true", limit=10000)}
        victims = pick_victims(system.get("/hosts", limit=10000), o["failures"], with_ha)
        bound = interval * float(cfg["ping.timeout"]) + 60
        rng = random.Random(1)
        busy0 = machine_busy()
        for n, victim in enumerate(victims, 1):
            for _ in range(o["tests"]):
                tests.append(send_test(system, receiver, channel["id"], rng))
            failures.append(one_failure(system, receiver, victim, bound, n, len(victims)))
        busy1 = machine_busy()
        deliveries = system.get("/deliveries", channel=channel["id"], limit=1000)
        engine = system.get("/engine")
    load_after = os.getloadavg()
    declared = [f["declared_s"] for f in failures]
    opened = [f["opened_s"] for f in failures if f["opened_s"] is not None]
    since_off = [f["declared_since_poweroff_s"] for f in failures]
    floor = [t["round_trip_s"] for t in tests]
    floor_after = [t["after_answer_s"] for t in tests]
    raw = [t["raw_post_s"] for t in tests]
    return {
        "benchmark": "notify", "machine": info, "command": o["command"],
        "hosts": o["hosts"], "vms": o["vms"], "ha_ratio": o["ha_ratio"],
        "clusters": o["clusters"], "start_delay": o["start_delay"], "config": cfg,
        "ready_s": round(ready, 1),
        "load": {"before": [round(x, 2) for x in load_before],
                 "after": [round(x, 2) for x in load_after],
                 # cores busy (whole machine, all users) while the failures ran
                 "busy_cores": round((busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1e-6)
                                     * (os.cpu_count() or 1), 2)},
        "failures": failures, "tests": tests,
        "summary": {
            "declared": {"median": median(declared), "worst": max(declared)},
            "opened": {"median": median(opened), "worst": max(opened, default=None)},
            "declared_since_poweroff": {"median": median(since_off),
                                        "worst": max(since_off)},
            "floor_test_round_trip": {"median": median(floor), "worst": max(floor),
                                      "best": min(floor)},
            "floor_test_after_answer": {"median": median(floor_after),
                                        "worst": max(floor_after)},
            "floor_bare_post": {"median": median(raw), "worst": max(raw)},
        },
        "receiver": {"messages": sum(1 for m in receiver.messages
                                     if _transition(m) != "bench-raw"),
                     "duplicates": receiver.duplicates,
                     "unparsable": receiver.bad},
        "deliveries": {"total": len(deliveries),
                       "retried": sum(1 for d in deliveries if d["attempts"] > 1),
                       "not_sent": sum(1 for d in deliveries if d["state"] != "sent")},
        "engine": engine,
    }


def send_test(system: System, receiver: Receiver, channel_id: int,
              rng: random.Random) -> dict[str, Any]:
    """One "send test": POST …/test → the test webhook received. It is sent after a
    random pause of up to one sender poll: the sender last looked when the previous
    webhook went out, just before, so without the pause every test would wait the
    poll's full second."""
    time.sleep(rng.uniform(0, POLL))
    t0 = time.time()
    r = system.api.post(f"/notification-channels/{channel_id}/test", json={})
    t1 = time.time()
    if r.status_code != 202:
        raise BenchError(f"POST /notification-channels/{channel_id}/test: HTTP "
                         f"{r.status_code} {r.text[:300]}")
    delivery = str(r.json()["id"])
    m = receiver.wait_for(f"test delivery {delivery}",
                          lambda m: m["delivery"] == delivery and _transition(m) == "test",
                          30, alive=system.alive)
    out = {"delivery": int(delivery), "round_trip_s": round(m["t"] - t0, 3),
           "after_answer_s": round(m["t"] - t1, 3), "post_s": round(t1 - t0, 3),
           "raw_post_s": raw_post(receiver, m["payload"])}
    say(f"  send test: received {out['round_trip_s']} s after the POST (a bare POST of "
        f"its body from here: {out['raw_post_s'] * 1000:.1f} ms)")
    return out


def raw_post(receiver: Receiver, payload: dict[str, Any]) -> float:
    """The HTTP part alone: the same body POSTed from this process the way the sender
    does it (``httpx.post``: a new connection) → received, in seconds."""
    key = f"bench-raw-{uuid.uuid4().hex}"
    body = json.dumps({**payload, "transition": "bench-raw", "idempotency_key": key})
    t0 = time.time()
    r = httpx.post(receiver.url, content=body.encode(), trust_env=False, timeout=10,
                   headers={"Content-Type": "application/json", "Idempotency-Key": key})
    r.raise_for_status()
    m = receiver.wait_for("a bare POST", lambda m: m["payload"].get("idempotency_key")
                          == key, 10)
    return round(m["t"] - t0, 4)


def one_failure(system: System, receiver: Receiver, victim: str, bound: float, n: int,
                total: int) -> dict[str, Any]:
    system.wait_caught_up(120)
    say(f"failure {n}/{total}: power off {victim} …")
    t_off = system.fault(f"host {victim} power off")

    def about(transition: str):
        def match(m: dict[str, Any]) -> bool:
            inc = _incident(m)
            return (_transition(m) == transition and inc.get("kind") == "host"
                    and inc.get("host") == victim and m["t"] >= t_off - 1)
        return match

    declared = receiver.wait_for(f"{victim} declared", about("declared"), bound,
                                 alive=system.alive)
    inc = _incident(declared)
    opened = next((m for m in receiver.messages if about("opened")(m)
                   and _incident(m).get("id") == inc["id"]), None)
    # The incident's end (resolved, or failed) before the next power-off, so failures
    # do not overlap.
    ended = receiver.wait_for(
        f"{victim}'s incident #{inc['id']} ended",
        lambda m: _transition(m) in ("resolved", "failed") and _incident(m).get("id")
        == inc["id"], 120, alive=system.alive)
    api = system.get(f"/incidents/{inc['id']}")
    if abs(parse_time(api.get("declared_at") or "1970-01-01T00:00:00Z")
           - parse_time(inc["declared_at"])) > 0.001:
        raise BenchError(f"incident #{inc['id']}: declared_at {inc['declared_at']} in the "
                         f"webhook, {api['declared_at']} in the API")
    t_declared = parse_time(inc["declared_at"])
    t_detected = parse_time(inc["detected_at"]) if inc.get("detected_at") else None
    result = {
        "host": victim, "incident": inc["id"], "vms_affected": inc.get("vms_affected"),
        "declared_s": round(declared["t"] - t_declared, 3),
        "opened_s": round(opened["t"] - t_detected, 3) if opened and t_detected else None,
        "declared_since_poweroff_s": round(declared["t"] - t_off, 2),
        "detected_since_poweroff_s": round(t_detected - t_off, 2) if t_detected else None,
        "ended": _transition(ended),
    }
    say(f"  {victim}: incident #{inc['id']} declared webhook {result['declared_s']} s after "
        f"declared_at; opened webhook {fmt(result['opened_s'], 3)} s after detected_at; "
        f"{result['ended']} notified")
    return result


def report(r: dict[str, Any]) -> str:
    cfg = r["config"]
    s = r["summary"]
    lb, la = r["load"]["before"], r["load"]["after"]
    lines = [
        f"notification delay (webhook, loopback receiver): {r['hosts']} hosts, {r['vms']} "
        f"VMs (HA ratio {r['ha_ratio']}), {r['clusters']} clusters; ping.interval "
        f"{cfg['ping.interval']}, ping.timeout {cfg['ping.timeout']}; fleet ready after "
        f"{r['ready_s']} s; load average before {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}, "
        f"after {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; the machine (all its users) was "
        f"busy {r['load']['busy_cores']:.2f} of {r['machine']['nproc']} cores while "
        f"hosts failed",
    ]
    rows = [[f["host"], f["incident"], f["vms_affected"], fmt(f["detected_since_poweroff_s"], 2),
             fmt(f["opened_s"], 3), fmt(f["declared_s"], 3),
             fmt(f["declared_since_poweroff_s"], 2), f["ended"]] for f in r["failures"]]
    lines.append(table(["host", "incident", "VMs", "detected since power-off s",
                        "opened: detected_at → received s",
                        "declared: declared_at → received s",
                        "declared received since power-off s", "ended"], rows))
    lines.append("")
    fl = s["floor_test_round_trip"]
    lines.append(table(
        ["", "median s", "worst s", "floor: send test, median s", "floor worst s"],
        [["declared (declared_at → webhook received)", fmt(s["declared"]["median"], 3),
          fmt(s["declared"]["worst"], 3), fmt(fl["median"], 3), fmt(fl["worst"], 3)],
         ["opened (detected_at → webhook received)", fmt(s["opened"]["median"], 3),
          fmt(s["opened"]["worst"], 3), "", ""],
         ["power-off → declared received (detection included)",
          fmt(s["declared_since_poweroff"]["median"], 2),
          fmt(s["declared_since_poweroff"]["worst"], 2), "", ""],
         ["floor: bare POST of the same body from the bench process",
          fmt(s["floor_bare_post"]["median"], 4), fmt(s["floor_bare_post"]["worst"], 4),
          "", ""]]))
    lines.append(f"floor: {len(r['tests'])} \"send test\" round trips (POST …/test → "
                 f"received), best {fmt(fl['best'], 3)} s; queued by the web process, so "
                 f"they include the sender's next look (≤ {POLL:g} s; each test sent "
                 f"after a random pause), which an incident queued by the engine does not "
                 f"wait for")
    d = r["deliveries"]
    lines.append(f"receiver: {r['receiver']['messages']} webhooks, "
                 f"{r['receiver']['duplicates']} duplicates; deliveries: {d['total']}, "
                 f"{d['retried']} retried, {d['not_sent']} not sent at the end")
    return "\n".join(lines)
