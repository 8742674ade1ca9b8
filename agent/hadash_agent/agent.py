"""The agent: enrol or connect, then report libvirt's domains for as long as it runs.

Never gives up and never crash-loops: a server that cannot be reached is retried with
exponential back-off and jitter (1 s doubling up to ``backoff_max``); a server that
refuses us (a token or join key it does not accept: an operator has to act) is retried
every ``refused_retry`` seconds, with one clear log line each time. libvirt lifecycle
events make it report at once, so a domain that stops is known to the server well
within a second.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import AGENT_NAME, __version__
from .config import NAME_RE, Config
from .hypervisor import POWER_OFF, Domain, Hypervisor, Unavailable
from .link import ReportRejected, ServerLink, TokenRejected, Unreachable, error_text
from .report import Definitions, entries
from .state import Credentials, StateStore

log = logging.getLogger("hadash_agent")

EVENT_DEBOUNCE = 0.05  # a burst of libvirt events (destroy + undefine) makes one report
# A domain libvirt said stopped (not migrated away) that no longer exists — a transient
# domain, as HA restarts are — is reported PowerOff this long: the server learns of the
# crash from the report it triggers, instead of finding the VM missing two ping
# intervals later (R8).
GONE_REPORTED = 30.0


class Refused(Exception):
    """The server refused us; an operator has to act. The message says what to do."""


class BodyRefused(Refused):
    """The server refused what a connect said (400, 413…), not who sent it."""


class Backoff:
    def __init__(self, cap: float, base: float = 1.0):
        self.cap, self.base, self.attempt = cap, base, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2 ** self.attempt)
        self.attempt += 1
        return delay / 2 + random.uniform(0, delay / 2)  # "equal jitter"

    def reset(self) -> None:
        self.attempt = 0


class Agent:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.store = StateStore(cfg.state_path)
        self.creds = Credentials()
        self.hv = Hypervisor(cfg.libvirt_uri, on_event=self._libvirt_event)
        self.defs = Definitions()
        self.link = ServerLink(cfg.server_url)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="libvirt")
        self.interval = cfg.ping_interval
        self.connected = False
        self.need_connect = True
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake: asyncio.Event | None = None
        self.stopping: asyncio.Event | None = None
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._next_definition_check = 0.0
        self._vm_locks: dict[str, asyncio.Lock] = {}
        self._unreachable_since: float | None = None
        self._libvirt_down = False
        self._connecting = False
        self._event_at: float | None = None  # the first libvirt event not reported yet
        self._stopped: dict[str, float] = {}  # domain → when libvirt said it stopped

    # --- helpers ---------------------------------------------------------------------
    async def call(self, fn, *args, **kwargs):
        """Run blocking (libvirt) code in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(fn, *args, **kwargs))

    def vm_lock(self, name: str) -> asyncio.Lock:
        return self._vm_locks.setdefault(name, asyncio.Lock())

    def poke(self) -> None:
        """Report at once (something changed)."""
        if self.wake is not None:
            self.wake.set()

    def _libvirt_event(self, name: str, text: str) -> None:
        # libvirt's event thread
        log.info("libvirt: %s %s", name, text)
        with self._dirty_lock:
            self._dirty.add(name)
            if self._event_at is None:
                self._event_at = time.monotonic()
            if text.startswith("stopped") and "migrated" not in text \
                    and NAME_RE.fullmatch(name):
                self._stopped[name] = time.monotonic()
            elif text == "started":
                self._stopped.pop(name, None)
        if self.loop is not None and self.wake is not None:
            self.loop.call_soon_threadsafe(self.wake.set)

    def request_stop(self) -> None:
        if self.stopping is not None and not self.stopping.is_set():
            log.info("stopping")
            self.stopping.set()

    async def pause(self, seconds: float, wake_on_event: bool = False) -> None:
        """Sleep, cut short by a stop (and, if asked, by a libvirt event)."""
        assert self.stopping is not None and self.wake is not None
        waits = [asyncio.ensure_future(self.stopping.wait())]
        if wake_on_event:
            waits.append(asyncio.ensure_future(self.wake.wait()))
        _done, pending = await asyncio.wait(waits, timeout=seconds,
                                            return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()

    # --- the run -------------------------------------------------------------------------
    async def run(self, *, serve: bool = True) -> None:
        from .api import start_api

        self.loop = asyncio.get_running_loop()
        self.wake, self.stopping = asyncio.Event(), asyncio.Event()
        self.creds = await self.call(self._load_credentials)
        await self.link.start()
        runner = await start_api(self) if serve else None
        log.info(
            "%s %s: host %s (cluster %s), libvirt %s, serving %s, server %s%s",
            AGENT_NAME, __version__, self.cfg.name, self.cfg.cluster, self.cfg.libvirt_uri,
            self.cfg.agent_url, self.cfg.server_url,
            "" if self.creds.enrolled else " (not enrolled yet)",
        )
        if self.cfg.test_hooks:
            log.warning("test hooks are enabled (POST /test/…): never do this in production")
        main = asyncio.create_task(self._loop())
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait([main, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._connecting and not main.done():
                # Let a connect finish: its answer carries credentials to save.
                await asyncio.wait([main], timeout=20)
            for task in (main, stop):
                task.cancel()
            await asyncio.gather(main, stop, return_exceptions=True)
            if self.cfg.goodbye_on_stop and self.connected and self.creds.token:
                try:
                    await asyncio.wait_for(
                        self.link.disconnect(self.creds.token, "agent stopped"), 5)
                    log.info("said goodbye to the server (disconnect)")
                except (TimeoutError, Unreachable) as exc:
                    log.warning("could not say goodbye to the server: %s", exc)
            await self.link.close()
            if runner is not None:
                await runner.cleanup()
            await self.call(self.hv.close)
            self.executor.shutdown(wait=False, cancel_futures=True)

    def _load_credentials(self) -> Credentials:
        creds = self.store.load()
        if creds.enrolled and (creds.name != self.cfg.name
                               or creds.server_url != self.cfg.server_url):
            log.warning(
                "the state file %s holds credentials of host %s at %s, not of %s at %s: "
                "enrolling anew", self.store.path, creds.name, creds.server_url,
                self.cfg.name, self.cfg.server_url)
            return Credentials()
        return creds

    async def _loop(self) -> None:
        assert self.stopping is not None and self.wake is not None
        backoff = Backoff(self.cfg.backoff_max)
        while not self.stopping.is_set():
            try:
                if self.need_connect:
                    self._connecting = True
                    try:
                        await self._connect()
                    finally:
                        self._connecting = False
                    self.need_connect = False
                else:
                    await self._report()
                self._reachable()
                self._libvirt_ok()
                backoff.reset()
            except Refused as exc:
                self.connected = False
                log.error("%s; retrying in %.0f s", exc, self.cfg.refused_retry)
                await self.pause(self.cfg.refused_retry)
                continue
            except TokenRejected as exc:
                log.warning("server refused our token on ping (%s): connecting again", exc)
                self.need_connect = True
                await self.link.drop_ws()
                continue
            except Unreachable as exc:
                delay = backoff.next()
                self._unreachable(exc, delay)
                await self.pause(delay)
                continue
            except Unavailable as exc:
                delay = backoff.next()
                if not self._libvirt_down:
                    log.error("%s: not reporting (a report without domains would make "
                              "hadash think they vanished)", exc.message)
                self._libvirt_down = True
                await self.pause(delay)
                continue
            except ReportRejected as exc:
                log.error("server refused our report: %s", exc)
            except Exception as exc:  # a bug or something unforeseen: log it, go on
                delay = backoff.next()
                log.exception("unexpected error (%r): retrying in %.1f s", exc, delay)
                await self.pause(delay)
                continue
            self.wake.clear()
            await self.pause(self.interval, wake_on_event=True)
            if self.wake.is_set():
                await asyncio.sleep(EVENT_DEBOUNCE)
                self.wake.clear()

    def _unreachable(self, exc: Exception, delay: float) -> None:
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        log.warning("server %s unreachable (%s): retrying in %.1f s", self.cfg.server_url,
                    exc, delay)

    def _reachable(self) -> None:
        if self._unreachable_since is not None:
            log.info("server reachable again after %.0f s", time.monotonic()
                     - self._unreachable_since)
            self._unreachable_since = None

    def _libvirt_ok(self) -> None:
        if self._libvirt_down:
            log.info("libvirt is back: reporting again")
            self._libvirt_down = False

    # --- reading libvirt -----------------------------------------------------------------
    def _collect(self, all_definitions: bool):
        """The domains, and their definitions re-read where they may have changed
        (new domains, domains libvirt sent an event about, all of them when asked)."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        try:
            domains = self.hv.domains()
            names = {d.name for d in domains}
            domains += self._gone(names)
            wanted = names - self.defs.known()
            wanted |= names if all_definitions else (dirty & names)
            if wanted:
                for name in self.defs.update(self.hv.definitions(sorted(wanted))):
                    log.info("libvirt: definition of %s changed", name)
            self.defs.retain(names)
            return domains
        except BaseException:
            with self._dirty_lock:
                self._dirty |= dirty
            raise

    def _gone(self, names: set[str]) -> list[Domain]:
        """Domains that stopped lately and no longer exist (transient ones): PowerOff."""
        now = time.monotonic()
        with self._dirty_lock:
            for name, at in list(self._stopped.items()):
                if name in names or now - at > GONE_REPORTED:
                    del self._stopped[name]
            return [Domain(name, POWER_OFF) for name in sorted(self._stopped)]

    # --- connect ---------------------------------------------------------------------------
    async def _connect(self) -> None:
        domains = await self.call(self._collect, True)
        self._next_definition_check = time.monotonic() + self.cfg.definition_check_interval
        cpus, memory_mb = await self.call(self.hv.node)
        self.defs.resend_all()
        sent = self.defs.pending()
        body = {
            "name": self.cfg.name, "type": "Routing", "hypervisor": self.cfg.hypervisor,
            "cluster": self.cfg.cluster, "cpus": cpus, "memory_mb": memory_mb,
            "address": self.cfg.address, "agent_url": self.cfg.agent_url,
            "vms": entries(domains, sent),
            "agent": {"name": AGENT_NAME, "version": __version__,
                      "hypervisor_uri": self.cfg.libvirt_uri},
        }
        try:
            answer, how = await self._connect_with(body)
        except BodyRefused:
            if not sent:
                raise
            answer = None
        if answer is None:
            # Refused with the definitions: maybe because of them. Once without.
            log.warning("server refused a connect carrying %d definition(s): connecting "
                        "without them", len(sent))
            self.defs.mark_refused(sent)
            body["vms"], sent = entries(domains), {}
            answer, how = await self._connect_with(body)
        await self._accept(answer, how, len(domains), len(sent))
        self.defs.mark_delivered(sent)

    async def _connect_with(self, body: dict) -> tuple[dict, str]:
        name = self.cfg.name
        if self.creds.token:
            status, data = await self.link.post("/connect", body, self.creds.token)
            if status == 200:
                return data, "token"
            if status not in (401, 403):
                self._connect_failed(status, data)
            if not self.cfg.join_key:
                raise Refused(f"token refused: ask an operator to re-enrol this host "
                              f"(then give the agent the join key) — server said: "
                              f"{error_text(data, status)}")
            log.info("token refused (%s): trying the join key, which works if an "
                     "operator re-enrolled host %s", error_text(data, status), name)
            token_refused = True
        else:
            token_refused = False
            if not self.cfg.join_key:
                raise Refused("not enrolled: give the agent the server's join key "
                              "(join_key, HADASH_AGENT_JOIN_KEY) for its first connect")
        status, data = await self.link.post("/connect", body, self.cfg.join_key)
        if status == 200:
            return data, "join key"
        if status == 409:
            first = "token refused" if token_refused else f"enrolment of {name} refused"
            raise Refused(f"{first}: ask an operator to re-enrol this host — host {name} is "
                          f"already enrolled and the join key may not take it over (409: "
                          f"{error_text(data, status)})")
        if status in (401, 403):
            raise Refused(f"join key refused ({status}: {error_text(data, status)}): check "
                          "join_key against the server's HADASH_AGENT_KEY")
        self._connect_failed(status, data)
        raise AssertionError("unreachable")

    @staticmethod
    def _connect_failed(status: int, data) -> None:
        if status >= 500 or status in (404, 408, 429):
            raise Unreachable(f"connect: server answered HTTP {status}: "
                              f"{error_text(data, status)}")
        raise BodyRefused(f"server refused our connect (HTTP {status}): "
                          f"{error_text(data, status)}")

    async def _accept(self, answer, how: str, domains: int, definitions: int) -> None:
        if not isinstance(answer, dict) or not isinstance(answer.get("token"), str) \
                or not answer["token"]:
            raise Unreachable("connect: the server's answer carries no token")
        server_token = answer.get("server_token")
        if not isinstance(server_token, str) or not server_token:
            # Protocol v1: the server presented the host token on its calls.
            log.warning("server sent no server_token (protocol v1): accepting the host "
                        "token on its calls")
            server_token = answer["token"]
        host_id = answer.get("host_id") if isinstance(answer.get("host_id"), int) else None
        creds = Credentials(name=self.cfg.name, server_url=self.cfg.server_url,
                            token=answer["token"], server_token=server_token, host_id=host_id)
        try:
            await self.call(self.store.save, creds)
        except OSError as exc:
            log.error("cannot save the credentials to %s (%s): keeping them in memory only; "
                      "fix this before the agent restarts, or it must be re-enrolled",
                      self.store.path, exc)
        self.creds = creds
        self.connected = True
        await self.link.drop_ws()  # the socket carried the old token
        self._set_interval(answer.get("ping_interval"), quiet=True)
        verb = "enrolled with the join key" if how == "join key" else "connected"
        log.info("%s as host %s (id %s): %d domain(s), %d definition(s) sent; reporting "
                 "every %g s", verb, self.cfg.name, host_id, domains, definitions,
                 self.interval)

    def _set_interval(self, value, quiet: bool = False) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            value = float(min(max(value, 1), 600))
            if value != self.interval and not quiet:
                log.info("reporting every %g s (server's ping.interval)", value)
            self.interval = value

    # --- report ----------------------------------------------------------------------------
    async def _report(self) -> None:
        full = time.monotonic() >= self._next_definition_check
        with self._dirty_lock:
            event_at, self._event_at = self._event_at, None
        t0 = time.monotonic()
        domains = await self.call(self._collect, full)
        t1 = time.monotonic()
        if full:
            self._next_definition_check = time.monotonic() + self.cfg.definition_check_interval
        sent = self.defs.pending()
        transport = self.link.transport
        try:
            interval = await self.link.ping(entries(domains, sent), self.creds.token)
        except ReportRejected as exc:
            if not sent:
                raise
            log.warning("server refused a report carrying the definition(s) of %s (%s): "
                        "reporting without them", ", ".join(sorted(sent)), exc)
            self.defs.mark_refused(sent)
            interval = await self.link.ping(entries(domains), self.creds.token)
        else:
            self.defs.mark_delivered(sent)
            if sent:
                log.info("sent the definition(s) of %s", ", ".join(sorted(sent)))
        if self.link.transport != transport:
            log.info("reporting over %s", self.link.transport)
        self._set_interval(interval)
        if event_at is not None:
            # How fast a change reaches the server (issue 12: a crash → running again).
            now = time.monotonic()
            log.info("reported %d domain(s) %.3f s after libvirt's event (waited %.3f s, "
                     "read libvirt %.3f s, server answered in %.3f s)", len(domains),
                     now - event_at, t0 - event_at, t1 - t0, now - t1)

    def identity(self) -> dict:
        return {"name": self.cfg.name, "agent": AGENT_NAME, "version": __version__,
                "hypervisor_uri": self.cfg.libvirt_uri}

