"""python manage.py bench ping|detect|restart — benchmarks of the running system.

    bench ping     agent ping ingestion over HTTP / websockets on PostgreSQL, beside the
                   raw PostgreSQL update rate of the same rows (the ceiling)
    bench detect   detection (host powered off → Down) and recovery (→ its HA VMs Running
                   elsewhere) latency for a simulated fleet, in real time
    bench restart  HA restart throughput of one failed host's VMs per ha.workers value
                   (--failed-hosts 10: a rack)
    bench agent-crash  a VM crash on a real host (root, libvirt) → Running again
    bench metrics  GET /metrics served time at 1,000 hosts / 10,000 VMs beside the same
                   server's 401 answer (R21)
    bench plan     failover plan recomputation at 100 / 1,000 / 10,000 hosts × 10 VMs, from
                   the database at 1,000 hosts, and an evacuation's spread (R22, R24)
    bench notify   notification delay (R20): incident declared → webhook received by a
                   receiver in the bench process, beside "send test" round trips
    bench register VM registration through the operator API: one POST /api/v1/vms each
                   vs POST /api/v1/vms/bulk in chunks and in one request (issue 12)
    bench connect  agent connects/s against one daphne: enrolment with the join key, then
                   reconnects with the hosts' tokens after a web restart (issue 12)

Each run builds a fresh database (PostgreSQL: hadash_bench_<random>, dropped at the
end), starts real processes (daphne, qcluster, the fleet simulator, a load generator)
and stops them SIGTERM → SIGKILL, even on Ctrl-C. Results are printed as tables
(``--json``: as JSON on stdout). See docs/benchmarks.md for numbers and how to read them.
"""

from __future__ import annotations

import sys

from django.core.management.base import BaseCommand, CommandError


def _number_list(value: str, kind, what: str, minimum, bound: str) -> list:
    try:
        items = [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise CommandError(f"expected comma-separated {what}, not {value!r}") from None
    if not items or min(items) < minimum:
        raise CommandError(f"expected {bound}, not {value!r}")
    return items


def int_list(value: str) -> list[int]:
    return _number_list(value, int, "integers", 1, "positive integers")


def float_list(value: str) -> list[float]:
    return _number_list(value, float, "numbers", 0, "numbers ≥ 0")


class Command(BaseCommand):
    help = "Benchmarks: ping ingestion, failure detection/recovery, HA restart throughput."

    def add_arguments(self, parser):
        from bench.common import DEFAULT_PG

        sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

        def common(p):
            p.add_argument("--database", default=DEFAULT_PG,
                           help="PostgreSQL server to create the throw-away database on "
                           f"(default {DEFAULT_PG}, or $HADASH_BENCH_PG)")
            p.add_argument("--allow-sqlite", action="store_true",
                           help="allow --database sqlite:// (a temporary file)")
            p.add_argument("--json", action="store_true", help="print the results as JSON")
            p.add_argument("--verbose", action="store_true",
                           help="echo the output of the processes started")

        p = sub.add_parser("ping", help="ping ingestion over HTTP/websockets vs PostgreSQL")
        common(p)
        p.add_argument("--transport", default="ws,http",
                       help="ws, http or both (default ws,http)")
        p.add_argument("--hosts", type=int, default=1000)
        p.add_argument("--seconds", type=float, default=20.0, help="measured seconds (20)")
        p.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds (3)")
        p.add_argument("--web-processes", default="1",
                       help="daphne processes, e.g. 1 or 1,2 to measure both (default 1)")
        p.add_argument("--connections", type=int, default=50,
                       help="pings in flight (closed loop; default 50)")
        p.add_argument("--rate", type=float, default=0.0,
                       help="open loop instead: every host pings every hosts/RATE s "
                       "(e.g. --hosts 10000 --rate 1000 is ping.interval 10)")
        p.add_argument("--ceiling-seconds", type=float, default=5.0,
                       help="seconds per PostgreSQL ceiling measurement (0: skip)")
        p.add_argument("--ceiling-warmup", type=float, default=2.0,
                       help="unmeasured seconds of the same writes before each ceiling "
                       "measurement (2)")
        p.add_argument("--batch", type=int, default=200,
                       help="pings per transaction in the batched ceiling (200)")
        p.add_argument("--conn-max-age", type=int, default=None,
                       help="experiment: run daphne with CONN_MAX_AGE=N "
                       "(bench.settings_override) instead of the settings' 0; under ASGI "
                       "every request runs in a new thread, so expect 'too many clients'")
        p.add_argument("--fillfactor", type=int, default=None, choices=range(10, 101),
                       metavar="PERCENT",
                       help="experiment: ALTER TABLE host, vm_instance SET (fillfactor = "
                       "PERCENT) before measuring (HOT updates for pings)")
        p.add_argument("--experiment", default="",
                       help="experiment: run daphne with proposed ingestion changes applied "
                       "(bench.asgi_experiment): any of any,dispatch,nolayer")
        p.add_argument("--db-pool", type=int, default=None,
                       help="experiment: run daphne with Django's psycopg pool of at most N "
                       "connections (needs psycopg-pool importable, e.g. via PYTHONPATH)")
        p.add_argument("--agents", default="",
                       help="closed loop with these many agents each, one ping in flight per "
                       "agent (e.g. 200,1000; the first N hosts); default: all hosts, "
                       "--connections in flight")
        p.add_argument("--loadgen-processes", type=int, default=1,
                       help="load generator processes sharing the hosts (1)")
        p.add_argument("--no-bare", action="store_true",
                       help="skip the bare Channels consumer measured before and after each "
                       "websocket run")

        p = sub.add_parser("detect", help="detection and recovery latency of a simulated fleet")
        common(p)
        p.add_argument("--hosts", type=int, default=1000)
        p.add_argument("--vms", type=int, default=10000)
        p.add_argument("--ha-ratio", type=float, default=0.5)
        p.add_argument("--clusters", type=int, default=10)
        p.add_argument("--failures", type=int, default=5)
        p.add_argument("--ping-interval", type=int, default=2)
        p.add_argument("--ping-timeout", type=float, default=None,
                       help="set ping.timeout too (default: leave the configured 2.5)")
        p.add_argument("--start-delay", type=float, default=1.0,
                       help="seconds a simulated VM start takes (1.0)")
        p.add_argument("--ha-workers", type=int, default=None,
                       help="set ha.workers (default: leave the configured 5)")
        p.add_argument("--settle", type=float, default=None,
                       help="seconds to wait after the fleet is ready (default 2 × ping "
                       "interval)")
        p.add_argument("--engine-processes", type=int, default=1,
                       help="engine processes (qclusters, one engine loop each; default 1)")
        p.add_argument("--timeout", type=float, default=None,
                       help="bound on the fleet set-up wait (default 300 s + 0.1 s per VM)")

        p = sub.add_parser("dashboard", help="overview served time and smoothness under events")
        common(p)
        p.add_argument("--hosts", type=int, default=1000, help="hosts (1000)")
        p.add_argument("--vms-per-host", type=int, default=10, help="VMs per host (10)")
        p.add_argument("--rate", type=float, default=100, help="events per second (100)")
        p.add_argument("--seconds", type=float, default=20, help="seconds of events (20)")
        p.add_argument("--requests", type=int, default=20, help="timed GET / (20)")

        p = sub.add_parser("metrics", help="GET /metrics served time (R21)")
        common(p)
        p.add_argument("--hosts", type=int, default=1000, help="hosts (1000)")
        p.add_argument("--vms-per-host", type=int, default=10, help="VMs per host (10)")
        p.add_argument("--incidents", type=int, default=2000,
                       help="incidents in the history (2000; half host, half VM)")
        p.add_argument("--requests", type=int, default=20, help="timed GET /metrics (20)")

        p = sub.add_parser("plan", help="failover plan recomputation, evacuation spread "
                           "(R22, R24)")
        common(p)
        p.add_argument("--sizes", default="100,1000,10000",
                       help="hosts per cluster, in memory (100,1000,10000)")
        p.add_argument("--vms-per-host", type=int, default=10, help="VMs per host (10)")
        p.add_argument("--db-hosts", type=int, default=1000,
                       help="hosts seeded in a fresh database (1000; 0: skip)")
        p.add_argument("--evacuation", type=int, default=100,
                       help="VMs of the evacuated host (100)")

        p = sub.add_parser("notify", help="notification delay: incident declared → webhook "
                           "received (R20)")
        common(p)
        p.add_argument("--hosts", type=int, default=20, help="hosts (20)")
        p.add_argument("--vms", type=int, default=100, help="VMs (100)")
        p.add_argument("--ha-ratio", type=float, default=0.5)
        p.add_argument("--clusters", type=int, default=5, help="clusters (5)")
        p.add_argument("--failures", type=int, default=5,
                       help="hosts powered off, one at a time (5)")
        p.add_argument("--tests", type=int, default=1,
                       help="\"send test\" round trips before each power-off (1)")
        p.add_argument("--ping-interval", type=int, default=2)
        p.add_argument("--start-delay", type=float, default=0.5,
                       help="seconds a simulated VM start takes (0.5)")
        p.add_argument("--timeout", type=float, default=None,
                       help="bound on the fleet set-up wait (default 300 s + 0.1 s per VM)")

        p = sub.add_parser("agent-crash", help="a VM crash on a real host (kill -9 of its "
                           "qemu) → Running again (root, libvirt: the real fleet)")
        common(p)
        p.add_argument("--kills", type=int, default=5, help="crashes, guests in turn (5)")
        p.add_argument("--hosts", type=int, default=3,
                       help="real hosts, one HA guest each (3; at most 9)")
        p.add_argument("--settle", type=float, default=3.0,
                       help="seconds before each crash (3)")

        p = sub.add_parser("register", help="VM registration through the operator API: "
                           "one POST each vs POST /api/v1/vms/bulk (issue 12)")
        common(p)
        p.add_argument("--hosts", type=int, default=1000, help="hosts (1000)")
        p.add_argument("--vms", type=int, default=10000,
                       help="VMs registered in chunks, then in one request (10000)")
        p.add_argument("--chunk", type=int, default=2000,
                       help="VMs per bulk request in the chunked run (2000; 0: skip it)")
        p.add_argument("--single", type=int, default=200,
                       help="VMs registered one POST /api/v1/vms each first (200; 0: skip)")
        p.add_argument("--no-one-request", action="store_true",
                       help="skip registering all --vms in one request")

        p = sub.add_parser("connect", help="agent connects/s: enrol, then reconnect after a "
                           "web restart (issue 12)")
        common(p)
        p.add_argument("--hosts", type=int, default=1000, help="hosts (1000)")
        p.add_argument("--clients", type=int, default=20,
                       help="connects in flight (20, as the simulator)")
        p.add_argument("--vms-per-host", type=int, default=10,
                       help="VMs each connect reports (10; unknown at enrolment, "
                       "registered before the reconnects)")
        p.add_argument("--no-restart", action="store_true",
                       help="reconnect without restarting the web process first")

        p = sub.add_parser("restart", help="HA restart throughput per ha.workers")
        common(p)
        p.add_argument("--workers", default="1,5,20", help="ha.workers values (1,5,20)")
        p.add_argument("--vms", type=int, default=100, help="HA VMs on the failed host (100)")
        p.add_argument("--start-delay", default="0",
                       help="seconds a simulated VM start takes; a list runs each "
                       "(e.g. 0,1.0; default 0: instant starts)")
        p.add_argument("--spare-hosts", type=int, default=4,
                       help="hosts that only receive restarted VMs (4)")
        p.add_argument("--failed-hosts", type=int, default=1,
                       help="hosts that fail together per ha.workers value (1; 10 with "
                       "--vms 100 --start-delay 1: a rack, issue 12 target 3)")
        p.add_argument("--engine-processes", type=int, default=1,
                       help="engine processes (qclusters); ha.workers stays the cap across "
                       "all of them (R11; default 1)")
        p.add_argument("--timeout", type=float, default=None,
                       help="bound on each recovery (default 120 s + 2 × VMs × start delay "
                       "÷ workers)")

    def handle(self, *args, **o):
        from bench.common import BenchError, dump_json

        o["command"] = "python manage.py " + " ".join(sys.argv[1:]) \
            if sys.argv and sys.argv[0].endswith("manage.py") else f"bench {o['benchmark']}"
        name = o["benchmark"]
        try:
            if name == "ping":
                from bench import ping as mod

                o["transports"] = [t.strip() for t in o["transport"].split(",") if t.strip()]
                if not o["transports"] or set(o["transports"]) - {"ws", "http"}:
                    raise CommandError("--transport: ws, http or ws,http")
                o["web_processes"] = int_list(o["web_processes"])
                o["agents"] = int_list(o["agents"]) if o["agents"] else []
                if any(a > o["hosts"] for a in o["agents"]) or o["loadgen_processes"] < 1:
                    raise CommandError("--agents must be ≤ --hosts, --loadgen-processes ≥ 1")
                o["bare"] = not o["no_bare"]
                if o["hosts"] < 1 or o["connections"] < 1 or o["seconds"] <= 0:
                    raise CommandError("--hosts, --connections and --seconds must be positive")
                o["experiment"] = [e.strip() for e in o["experiment"].split(",") if e.strip()]
                if set(o["experiment"]) - {"any", "dispatch", "nolayer"}:
                    raise CommandError("--experiment: any of any,dispatch,nolayer")
                if o["db_pool"] is not None:
                    import importlib.util

                    if importlib.util.find_spec("psycopg_pool") is None:
                        raise CommandError("--db-pool needs the psycopg-pool package "
                                           "(pip install psycopg-pool, or PYTHONPATH)")
            elif name == "dashboard":
                from bench import dashboard as mod

                if o["json"]:
                    result = mod.run(o)
                    self.stdout.write(mod.as_json(result))
                else:
                    self.stdout.write(mod.report(mod.run(o)))
                return
            elif name == "metrics":
                from bench import metrics as mod

                if min(o["hosts"], o["vms_per_host"], o["requests"]) < 1 or o["incidents"] < 0:
                    raise CommandError("--hosts, --vms-per-host and --requests must be "
                                       "positive, --incidents ≥ 0")
            elif name == "plan":
                from bench import plan as mod

                o["sizes"] = int_list(o["sizes"])
                if o["vms_per_host"] < 1 or o["evacuation"] < 1 or o["db_hosts"] < 0:
                    raise CommandError("--vms-per-host and --evacuation must be positive, "
                                       "--db-hosts ≥ 0")
            elif name == "notify":
                from bench import notify as mod

                if o["hosts"] < 2 or o["failures"] < 1 or o["failures"] >= o["hosts"] \
                        or o["tests"] < 1 or o["vms"] < 1:
                    raise CommandError("need --hosts ≥ 2, 1 ≤ --failures < --hosts, "
                                       "--tests ≥ 1 and --vms ≥ 1")
            elif name == "agent-crash":
                from bench import agentcrash as mod

                if o["kills"] < 1 or not 1 <= o["hosts"] <= 9 or o["settle"] < 0:
                    raise CommandError("need --kills ≥ 1, 1 ≤ --hosts ≤ 9, --settle ≥ 0")
            elif name == "register":
                from bench import register as mod

                if o["hosts"] < 1 or min(o["vms"], o["chunk"], o["single"]) < 0:
                    raise CommandError("--hosts must be positive; --vms, --chunk and "
                                       "--single ≥ 0")
            elif name == "connect":
                from bench import connect as mod

                if min(o["hosts"], o["clients"]) < 1 or o["vms_per_host"] < 0:
                    raise CommandError("--hosts and --clients must be positive, "
                                       "--vms-per-host ≥ 0")
            elif name == "detect":
                from bench import detect as mod

                if o["hosts"] < 2 or o["failures"] < 1 or o["failures"] >= o["hosts"]:
                    raise CommandError("need --hosts ≥ 2 and 1 ≤ --failures < --hosts")
            else:
                from bench import restart as mod

                o["workers"] = int_list(o["workers"])
                o["start_delays"] = float_list(o["start_delay"])
                if o["vms"] < 1 or o["failed_hosts"] < 1:
                    raise CommandError("--vms and --failed-hosts must be at least 1")
            result = mod.run(o)
        except BenchError as exc:
            raise CommandError(str(exc)) from None
        except KeyboardInterrupt:
            raise CommandError("interrupted; processes stopped, database dropped") from None
        if o["json"]:
            self.stdout.write(dump_json(result))
        else:
            from bench.common import machine_line

            self.stdout.write("")
            self.stdout.write(f"machine: {machine_line(result['machine'])}")
            self.stdout.write(f"command: {result['command']}")
            self.stdout.write("")
            self.stdout.write(mod.report(result))
