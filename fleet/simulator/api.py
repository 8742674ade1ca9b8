"""The simulator's use of hadash's operator API (``/api/v1/``, Bearer API token).

* :func:`adopt`, before the agents connect: what the server already knows wins. A VM
  the server has Running (or Starting, Stopping, Migrating) on one of our hosts runs
  there; one of our demo VMs the server has in any other state runs nowhere. So a
  restarted simulator reports what the database expects instead of its initial
  placement (which would look like VMs vanishing and appearing).
* :func:`register`, once the hosts have connected: every host's BMC settings with
  ``POST /api/v1/hosts/bulk``, ``HOST_CHUNK`` hosts per request, then the demo VMs the
  server does not know yet with ``POST /api/v1/vms/bulk``, ``BULK_CHUNK`` VMs per
  request; one request after the other, a progress line per request. A VM the server
  refuses as "already exists" counts as known; the other items of a refused request are
  sent again without the refused ones (the server writes nothing of a refused request).
  A server without ``hosts/bulk`` (it answers 404 or 405) gets one
  ``PATCH /api/v1/hosts/{name}`` per host instead (``api_concurrency`` requests at a
  time, a progress line every couple of seconds).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from .runner import Simulator

log = logging.getLogger("fleet.simulator")

TIMEOUT = aiohttp.ClientTimeout(total=60)
PAGE = 10_000  # hadash.api.filters.MAX_LIMIT
ON_HOST = ("Running", "Starting", "Stopping", "Migrating")
PROGRESS_EVERY = 2.0  # seconds
BULK_CHUNK = 2000  # VMs per POST /api/v1/vms/bulk (the server takes up to 20,000)
HOST_CHUNK = 2000  # hosts per POST /api/v1/hosts/bulk (the server takes up to 20,000)
BULK_TIMEOUT = aiohttp.ClientTimeout(total=300)


class ApiError(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _headers(sim: Simulator) -> dict[str, str]:
    return {"Authorization": f"Bearer {sim.opts.api_token}", "Accept": "application/json"}


async def call(sim: Simulator, method: str, path: str, body: Any = None,
               params: dict | None = None,
               timeout: aiohttp.ClientTimeout = TIMEOUT) -> tuple[int, Any]:
    """One operator API call: (status, decoded JSON or None)."""
    assert sim.session is not None
    async with sim.session.request(
        method, f"{sim.server_url}{path}", json=body, params=params, headers=_headers(sim),
        timeout=timeout,
    ) as response:
        try:
            data = await response.json(content_type=None)
        except ValueError:
            data = None
        if response.status in (401, 403):
            error = data.get("error") if isinstance(data, dict) else None
            raise ApiError(
                f"the operator API refused the token ({response.status}: "
                f"{error or 'no reason given'}); check --api-token / HADASH_API_TOKEN "
                "(a staff user's token)", response.status,
            )
        return response.status, data


def _error(data: Any, status: int) -> str:
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    return f"HTTP {status}"


async def server_vms(sim: Simulator) -> list[dict]:
    rows: list[dict] = []
    offset = 0
    while True:
        status, data = await call(sim, "GET", "/api/v1/vms",
                                  params={"limit": PAGE, "offset": offset})
        if status != 200 or not isinstance(data, list):
            raise ApiError(f"listing VMs failed: {_error(data, status)}", status)
        rows.extend(d for d in data if isinstance(d, dict))
        if len(data) < PAGE:
            return rows
        offset += PAGE


async def adopt(sim: Simulator) -> None:
    """Place VMs where the server's database says they run (see the module doc)."""
    fleet = sim.fleet
    try:
        rows = await server_vms(sim)
    except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as exc:
        log.warning("could not read the server's VMs (%s): starting with the demo placement",
                    exc or type(exc).__name__)
        return
    moved = stopped = adopted = 0
    for row in rows:
        name, host, state = row.get("name"), row.get("host"), row.get("state")
        if not isinstance(name, str):
            continue
        ours = name in fleet.vm_specs
        runs_here = host in fleet.hosts and state in ON_HOST
        if not ours and not runs_here:
            continue
        placed = [h for h in fleet.hosts.values() if name in h.vms]
        if runs_here:
            if [h.name for h in placed] == [host]:
                continue
            for h in placed:
                del h.vms[name]
            fleet.hosts[host].vms[name] = "PowerOn"
            if ours:
                moved += 1
            else:
                adopted += 1
        elif placed:
            for h in placed:
                del h.vms[name]
            stopped += 1
    if moved or stopped or adopted:
        log.info(
            "adopted the server's placement: %d demo VMs moved to the host the server has "
            "them on, %d not running (not Running there), %d other VMs on our hosts",
            moved, stopped, adopted,
        )
    sim.registration["known_to_server"] = sum(
        1 for row in rows if row.get("name") in fleet.vm_specs
    )
    sim.server_known_vms = {row["name"] for row in rows if isinstance(row.get("name"), str)}


async def _wait_for_hosts(sim: Simulator, idle: float) -> None:
    """Until every reachable host has connected. While none has (the server is not up
    yet) this waits as long as it takes; from the first connect on, until ``idle``
    seconds pass without another host connecting. (A fixed limit cut a 1,000-host
    fleet short on a loaded machine, where agents enrol at ≈ 9/s: the bulk settings
    call then refused the 60 hosts not yet known.)"""
    loop = asyncio.get_running_loop()
    deadline = None
    shown = (0.0, -1)
    total = len(sim.fleet.hosts)
    last = total
    while True:
        waiting = sum(1 for h in sim.fleet.hosts.values() if h.reachable and h.host_id is None)
        if not waiting:
            return
        if waiting < last:  # progress: wait another ``idle`` seconds from now
            deadline, last = loop.time() + idle, waiting
        if deadline is not None and loop.time() > deadline:
            log.warning("%d hosts have not connected, none for %.0f s; registering anyway "
                        "(their BMC settings and VMs may fail)", waiting, idle)
            return
        now = loop.time()
        if now - shown[0] >= PROGRESS_EVERY * 2 and waiting != shown[1]:
            shown = (now, waiting)
            log.info("waiting for hosts to connect before registering: %d/%d",
                     total - waiting, total)
        await asyncio.sleep(0.2)


async def _run_all(sim: Simulator, what: str, items: list, one) -> dict[str, int]:
    """Run ``one(item) -> outcome`` over ``items``, ``api_concurrency`` at a time, with
    progress lines; returns a count per outcome."""
    loop = asyncio.get_running_loop()
    counts: dict[str, int] = {}
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    done = 0
    started = loop.time()

    async def worker() -> None:
        nonlocal done
        while not queue.empty():
            item = queue.get_nowait()
            outcome = await one(item)
            counts[outcome] = counts.get(outcome, 0) + 1
            done += 1
            sim.registration[what] = {"done": done, "of": len(items), **counts}

    async def progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            rate = done / max(loop.time() - started, 1e-6)
            log.info("registering %s: %d/%d (%s), %.0f/s", what, done, len(items),
                     ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none yet",
                     rate)

    reporter = loop.create_task(progress())
    workers = [loop.create_task(worker())
               for _ in range(max(1, min(sim.opts.api_concurrency, len(items))))]
    try:
        await asyncio.gather(*workers)
    finally:
        reporter.cancel()
        for w in workers:
            w.cancel()
    return counts


async def register(sim: Simulator) -> None:
    """BMC settings for every host, then the demo VMs (see the module doc)."""
    fleet = sim.fleet
    reg = sim.registration
    reg["state"] = "waiting for hosts"
    await _wait_for_hosts(sim, idle=30.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reg["state"] = "running"
    failures: list[str] = []

    def bmc_body(name: str) -> dict:
        return {
            "oobm_enabled": True,
            "oobm_address": sim.bmc_url(name),
            "oobm_system_id": name,
            "oobm_username": sim.opts.bmc_username,
            "oobm_password": sim.opts.bmc_password,
        }

    async def patch_host(name: str) -> str:
        try:
            status, data = await call(sim, "PATCH", f"/api/v1/hosts/{name}", bmc_body(name))
        except ApiError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            failures.append(f"host {name}: {exc or type(exc).__name__}")
            return "failed"
        if status == 200:
            return "set"
        failures.append(f"host {name}: {_error(data, status)}")
        return "failed"

    known = sim.server_known_vms

    def vm_body(name: str) -> dict:
        spec = fleet.vm_specs[name]
        where = [h.name for h in fleet.hosts.values() if name in h.vms]
        return {
            "name": name,
            "host": where[0] if where else spec.home,
            "cpus": spec.cpus,
            "memory_mb": spec.memory_mb,
            "ha_enabled": spec.ha_enabled,
            "priority": spec.priority,
        }

    async def post_chunk(what: str, names: list[str], counts: dict[str, int]) -> bool:
        """One POST of ``names`` to ``what``'s bulk call (``vms``: register them,
        ``hosts``: their BMC settings); a refused request is sent again without its
        refused items (once). False: the server has no such call (404, 405)."""
        path, noun = f"/api/v1/{what}/bulk", "VM" if what == "vms" else "host"
        body_of = vm_body if what == "vms" else (lambda n: {"name": n, **bmc_body(n)})
        outcome = "registered" if what == "vms" else "set"
        for attempt in (1, 2):
            if not names:
                return True
            try:
                status, data = await call(sim, "POST", path,
                                          {what: [body_of(n) for n in names]},
                                          timeout=BULK_TIMEOUT)
            except ApiError:
                raise
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                failures.append(f"{len(names)} {noun}s ({names[0]} …): "
                                f"{exc or type(exc).__name__}")
                counts["failed"] = counts.get("failed", 0) + len(names)
                return True
            if what == "hosts" and status in (404, 405) and attempt == 1:
                return False  # an older server: no hosts/bulk
            if 200 <= status < 300:  # 201 registered, 200 set
                counts[outcome] = counts.get(outcome, 0) + len(names)
                return True
            errors = data.get("errors") if isinstance(data, dict) else None
            if status != 400 or not isinstance(errors, list) or attempt == 2:
                failures.append(f"{len(names)} {noun}s ({names[0]} …): "
                                f"{_error(data, status)}")
                counts["failed"] = counts.get("failed", 0) + len(names)
                return True
            refused = set()
            for e in errors:
                i = e.get("index") if isinstance(e, dict) else None
                if not isinstance(i, int) or not 0 <= i < len(names):
                    continue
                refused.add(i)
                if what == "vms" and "already exists" in str(e.get("error", "")):
                    counts["already known"] = counts.get("already known", 0) + 1
                else:
                    failures.append(f"{noun} {names[i]}: {e.get('error')}")
                    counts["failed"] = counts.get("failed", 0) + 1
            if not refused:  # nothing to leave out: it would be refused again
                failures.append(f"{len(names)} {noun}s ({names[0]} …): "
                                f"{_error(data, status)}")
                counts["failed"] = counts.get("failed", 0) + len(names)
                return True
            names = [n for i, n in enumerate(names) if i not in refused]
        return True

    async def set_hosts() -> dict[str, int]:
        names = list(fleet.hosts)
        counts: dict[str, int] = {}
        began = loop.time()
        done = 0
        via = {"via": "POST /api/v1/hosts/bulk"}
        reg["hosts"] = {"done": 0, "of": len(names), **via}
        for start in range(0, len(names), HOST_CHUNK):
            chunk = names[start:start + HOST_CHUNK]
            if not await post_chunk("hosts", chunk, counts):
                log.info("the server has no POST /api/v1/hosts/bulk (an older hadash): "
                         "one PATCH /api/v1/hosts/{name} per host")
                rest = await _run_all(sim, "hosts", names[start:], patch_host)
                for k, v in rest.items():
                    counts[k] = counts.get(k, 0) + v
                reg["hosts"] = {"done": len(names), "of": len(names), **counts,
                                "via": "PATCH /api/v1/hosts/{name}"}
                return counts
            done += len(chunk)
            reg["hosts"] = {"done": done, "of": len(names), **counts, **via}
            log.info("registering hosts: %d/%d (%s), %.0f/s", done, len(names),
                     ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
                     done / max(loop.time() - began, 1e-6))
        return counts

    async def register_vms() -> dict[str, int]:
        todo = [n for n in fleet.vm_specs if n not in known]
        counts: dict[str, int] = {}
        if len(todo) < len(fleet.vm_specs):
            counts["already known"] = len(fleet.vm_specs) - len(todo)
        began = loop.time()
        total = len(fleet.vm_specs)
        done = total - len(todo)
        reg["vms"] = {"done": done, "of": total, **counts}
        for start in range(0, len(todo), BULK_CHUNK):
            chunk = todo[start:start + BULK_CHUNK]
            await post_chunk("vms", chunk, counts)
            done += len(chunk)
            reg["vms"] = {"done": done, "of": total, **counts}
            log.info("registering vms: %d/%d (%s), %.0f/s", done, total,
                     ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
                     (start + len(chunk)) / max(loop.time() - began, 1e-6))
        return counts

    try:
        hosts = await set_hosts()
        vms = await register_vms()
    except ApiError as exc:
        reg["state"] = "failed"
        reg["error"] = str(exc)
        log.error("registration stopped: %s", exc)
        return
    for line in failures[:10]:
        log.warning("registration: %s", line)
    if len(failures) > 10:
        log.warning("registration: … and %d more failures", len(failures) - 10)
    reg["state"] = "done" if not failures else "done with failures"
    reg["seconds"] = round(loop.time() - started, 1)
    log.info(
        "registration done in %.1f s: BMC settings for %d hosts (%d failed); VMs: %d "
        "registered, %d already known to the server, %d failed",
        reg["seconds"], hosts.get("set", 0), hosts.get("failed", 0),
        vms.get("registered", 0), vms.get("already known", 0), vms.get("failed", 0),
    )
