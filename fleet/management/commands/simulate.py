"""python manage.py simulate [run] [options]      — run a simulated fleet
python manage.py simulate fault "DO" [--control URL] [--token T] — inject a fault into one
python manage.py simulate status [--control URL] [--token T]     — show a running one's health

The simulator is a separate process speaking only HTTP (and the websocket upgrade) to
the hadash server; it never touches the database (docs/simulator.md). Its control API
takes a token (--token, else $HADASH_FLEET_TOKEN or the settings' HADASH_FLEET_TOKEN).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import signal
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

log = logging.getLogger("fleet.simulator")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise CommandError(f"--listen {value!r}: expected HOST:PORT") from None
    if not 0 <= number <= 65535:
        raise CommandError(f"--listen {value!r}: no such port")
    return host, number


def parse_fault_option(value: str) -> tuple[float, str]:
    from fleet.simulator.state import FaultError, parse_fault

    at, sep, do = value.partition(":")
    try:
        seconds = float(at)
    except ValueError:
        seconds = -1.0
    if not sep or seconds < 0:
        raise CommandError(
            f"--fault {value!r}: expected SECONDS:FAULT, e.g. '30:host kvm-003 power off'"
        )
    try:
        parse_fault(do)
    except FaultError as exc:
        raise CommandError(f"--fault {value!r}: {exc}") from None
    return seconds, do.strip()


class Command(BaseCommand):
    help = (
        "Run a simulated fleet (hosts with agents and Redfish BMCs) against a hadash "
        "server, or send a fault to a running simulator: simulate fault \"host kvm-003 "
        "power off\"."
    )
    requires_system_checks: list = []

    def add_arguments(self, parser):
        parser.add_argument(
            "action", nargs="?", default="run", choices=["run", "fault", "status"],
            help="run (default): run a simulator; fault DO: send a fault to a running one; "
            "status: print a running one's health",
        )
        parser.add_argument("fault_text", nargs="*", metavar="DO",
                            help='with "fault": e.g. "host kvm-003 power off"')
        parser.add_argument("--control", default="http://127.0.0.1:9100",
                            help="with fault/status: the running simulator's URL "
                            "(default http://127.0.0.1:9100)")
        parser.add_argument("--token", default=None,
                            help="the control API's token (default: $HADASH_FLEET_TOKEN, "
                            "else the settings' HADASH_FLEET_TOKEN, e.g. from "
                            "var/secrets.env; run: a random one, logged, when there is "
                            "none)")
        g = parser.add_argument_group("run")
        g.add_argument("--server", default="http://127.0.0.1:8000",
                       help="the hadash server's base URL (default http://127.0.0.1:8000)")
        g.add_argument("--listen", default="127.0.0.1:9100",
                       help="where agents, BMCs and the control API listen (default "
                       "127.0.0.1:9100; port 0: any free port)")
        g.add_argument("--advertise", default="",
                       help="base URL the server reaches the simulator at (default: "
                       "http://LISTEN)")
        g.add_argument("--hosts", type=int, default=20, help="simulated hosts (default 20)")
        g.add_argument("--vms", type=int, default=200, help="demo VMs (default 200)")
        g.add_argument("--ha-ratio", type=float, default=0.5,
                       help="fraction of VMs with HA enabled (default 0.5)")
        g.add_argument("--clusters", type=int, default=1, help="clusters c1…cK (default 1)")
        g.add_argument("--host-cpus", type=int, default=32, help="CPUs per host (default 32)")
        g.add_argument("--host-memory-mb", type=int, default=131072,
                       help="memory per host in MB (default 131072)")
        g.add_argument("--start-delay", type=float, default=1.0,
                       help="seconds a VM start or migration takes (default 1.0; 0 allowed)")
        g.add_argument("--transport", choices=["ws", "http"], default="ws",
                       help="pings over one websocket per host (ws, default) or POST /ping")
        g.add_argument("--agent-key", default=None,
                       help="join key (default: $HADASH_AGENT_KEY, else the settings' key)")
        g.add_argument("--api-token", default=None,
                       help="operator API token to register VMs and BMC settings "
                       "(default: $HADASH_API_TOKEN; none: no registration)")
        g.add_argument("--fault", action="append", default=[], metavar="AT:DO",
                       help="apply a fault AT seconds after start, e.g. "
                       "'30:host kvm-003 power off' (repeatable)")
        g.add_argument("--bmc-username", default="admin", help="BMC user (default admin)")
        g.add_argument("--bmc-password", default="hadash-sim",
                       help="BMC password (default hadash-sim)")
        g.add_argument("--connect-concurrency", type=int, default=20,
                       help="agent connects in flight at once, and as many websocket "
                       "upgrades (default 20 each)")
        g.add_argument("--api-concurrency", type=int, default=20,
                       help="operator API calls in flight at once when registering "
                       "(default 20)")
        g.add_argument("--status-interval", type=float, default=10.0,
                       help="seconds between status lines (default 10; 0: none)")
        g.add_argument("--goodbye", action="store_true",
                       help="on shutdown, send disconnect for every connected host (default: "
                       "just stop; the hosts then fall behind on ping)")
        g.add_argument("--seed", type=int, default=None,
                       help="random seed (VM sizes, ping phases)")
        g.add_argument("--processes", default=os.environ.get("HADASH_SIM_PROCESSES", "auto"),
                       help="ping processes running the hosts' agents, apart from the "
                       "process serving the agent/BMC endpoints, the control API and "
                       "registration (default auto: one per 2,500 hosts, at most one "
                       "per CPU, at least one; 0: the agents run in the main process; "
                       "default from $HADASH_SIM_PROCESSES)")
        g.add_argument("--ping-nice", type=int, default=-10,
                       help="nice value of the ping processes (default -10: ahead of the "
                       "server and the database on a shared machine, where allowed; 0: "
                       "leave it)")

    def handle(self, *args, **opts):
        action = opts["action"]
        if action == "fault":
            return self.send_fault(opts)
        if action == "status":
            return self.show_status(opts)
        if opts["fault_text"]:
            raise CommandError(f"unexpected arguments: {' '.join(opts['fault_text'])}")
        return self.run(opts)

    @staticmethod
    def token(opts) -> str:
        """The control API's token: --token, $HADASH_FLEET_TOKEN, the settings' one."""
        return (opts["token"] or os.environ.get("HADASH_FLEET_TOKEN")
                or getattr(settings, "HADASH_FLEET_TOKEN", "") or "").strip()

    # --- fault / status -----------------------------------------------------------
    def send_fault(self, opts) -> None:
        from fleet.simulator import control

        text = " ".join(opts["fault_text"]).strip()
        if not text:
            raise CommandError('say which fault, e.g. simulate fault "host kvm-003 power off"')
        try:
            answer = control.fault(text, opts["control"], token=self.token(opts))
        except control.ControlError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"applied: {answer.get('do')}")
        for h in answer.get("hosts", []):
            running = sum(1 for v in h["vms"] if v["power_state"] == "PowerOn")
            self.stdout.write(
                f"  {h['name']}: powered={'on' if h['powered'] else 'off'} "
                f"agent={'running' if h['agent'] else 'stopped'} "
                f"network={'on' if h['network'] else 'off'} bmc={'ok' if h['bmc'] else 'fail'} "
                f"start_fail={h['start_fail']} vms={running} running/{len(h['vms'])}"
            )

    def show_status(self, opts) -> None:
        from fleet.simulator import control

        try:
            answer = control.health(opts["control"], token=self.token(opts))
        except control.ControlError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(json.dumps(answer, indent=2))

    # --- run ----------------------------------------------------------------------
    def configure_logging(self, verbosity: int) -> None:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.handlers[:] = [handler]
        log.propagate = False
        log.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG))

    def run(self, opts) -> None:
        from fleet.simulator import Options, Simulator
        from fleet.simulator.state import FaultError

        host, port = parse_listen(opts["listen"])
        faults = [parse_fault_option(f) for f in opts["fault"]]
        for name in ("hosts", "clusters", "connect_concurrency", "api_concurrency"):
            if opts[name] < 1:
                raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
        if opts["vms"] < 0 or opts["start_delay"] < 0:
            raise CommandError("--vms and --start-delay must not be negative")
        if not opts["server"].startswith(("http://", "https://")):
            raise CommandError(f"--server {opts['server']!r}: expected http://HOST:PORT")
        if not 0 <= opts["ha_ratio"] <= 1:
            raise CommandError("--ha-ratio must be between 0 and 1")
        processes = self.processes(opts["processes"], opts["hosts"])
        agent_key = opts["agent_key"] or os.environ.get("HADASH_AGENT_KEY") or getattr(
            settings, "HADASH_AGENT_KEY", "")
        options = Options(
            server=opts["server"], listen_host=host, listen_port=port,
            advertise=opts["advertise"], hosts=opts["hosts"], vms=opts["vms"],
            ha_ratio=opts["ha_ratio"], clusters=opts["clusters"], host_cpus=opts["host_cpus"],
            host_memory_mb=opts["host_memory_mb"], start_delay=opts["start_delay"],
            transport=opts["transport"], agent_key=agent_key,
            api_token=opts["api_token"] or os.environ.get("HADASH_API_TOKEN", ""),
            faults=faults, bmc_username=opts["bmc_username"],
            bmc_password=opts["bmc_password"],
            connect_concurrency=opts["connect_concurrency"],
            api_concurrency=opts["api_concurrency"],
            status_interval=opts["status_interval"], goodbye=opts["goodbye"], seed=opts["seed"],
            processes=processes, ping_nice=opts["ping_nice"],
            log_level={0: logging.WARNING, 1: logging.INFO}.get(opts["verbosity"],
                                                                logging.DEBUG),
        )
        self.configure_logging(opts["verbosity"])
        try:
            sim = Simulator(options)
        except (FaultError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        # The control API's token (fleet.simulator.server.control_token: none → random).
        sim.control_token = self.token(opts)
        try:
            asyncio.run(self.main(sim))
        except OSError as exc:
            raise CommandError(f"cannot serve on {opts['listen']}: {exc}") from None

    @staticmethod
    def processes(value: str, hosts: int) -> int:
        """``--processes``: a number, or auto (one per 2,500 hosts, at most one per CPU,
        at least one)."""
        if value.strip().lower() == "auto":
            return max(1, min(os.cpu_count() or 1, math.ceil(hosts / 2500)))
        try:
            n = int(value)
        except ValueError:
            n = -1
        if n < 0:
            raise CommandError(f"--processes {value!r}: expected auto or a number ≥ 0")
        return n

    async def main(self, sim) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        first_signal = 0.0

        def on_signal(name: str) -> None:
            nonlocal first_signal
            if stop.is_set():
                # A supervisor may deliver one signal twice (to the process and to its
                # group); only a second Ctrl-C a moment later means "now".
                if loop.time() - first_signal > 1.0:
                    log.warning("%s again: exiting at once", name)
                    os._exit(130)
                return
            first_signal = loop.time()
            log.info("%s: shutting down", name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        try:
            await sim.start()
            # Everything built so far (Django, the fleet, the server) lives as long as
            # the process: keep it out of the collector's full passes, which would
            # otherwise pause the loop (and every host's pings) for tens of ms.
            gc.collect()
            gc.freeze()
            await stop.wait()
        finally:
            await sim.stop()
