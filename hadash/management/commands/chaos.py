"""python manage.py chaos — the whole system under random faults, checked against SPEC §6.

Real processes on a fresh PostgreSQL database with Redis as the channel layer: two
daphne web processes behind a small load balancer, two django-q clusters running the
engine, the fleet simulator and a live dashboard client. For ``--duration`` seconds a
seeded plan injects machine faults through the simulator, kill -9 of a web process and
of an engine process group (each restarted), cuts of every connection to the run's
database (``pg_terminate_backend``), and with ``--long`` PostgreSQL restarts
(``pg_ctlcluster … restart``: it restarts the machine's shared server — never in the
test suite). With ``--pg-failovers N`` the run has a PostgreSQL of its own instead — a
primary and a synchronous standby in a temporary directory, reached by a multi-host URL
— and N times the primary is killed and the standby promoted (bench/pgha.py): nothing
acknowledged may be lost, and hadash must write again on the promoted server. Then
every fault is healed and the fleet settles.

Printed at the end (``--json``: as JSON on stdout; progress goes to stderr): double
runs, HA items lost or processed twice, events the dashboard missed and their delivery
latency, the longest sweeper gap, and the settle. Exit status 0 when SPEC §6 held, 1
when an invariant was violated (the figures are printed either way), 2 when the run
could not be carried out. See docs/reliability.md.
"""

from __future__ import annotations

import os
import sys

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Chaos run: the whole system under random faults and kills, checked against SPEC §6."

    def add_arguments(self, parser):
        from bench.common import DEFAULT_PG

        parser.add_argument("--duration", type=float, default=300.0,
                            help="seconds of faults (300)")
        parser.add_argument("--seed", type=int, default=None,
                            help="seed of the fault plan (default: random, printed)")
        parser.add_argument("--hosts", type=int, default=30, help="simulated hosts (30)")
        parser.add_argument("--vms", type=int, default=300,
                            help="simulated VMs, half of them HA (300)")
        parser.add_argument("--clusters", type=int, default=2, help="clusters (2)")
        parser.add_argument("--long", action="store_true",
                            help="also restart PostgreSQL (pg_ctlcluster), about every "
                            "200 s: affects everything else using this machine's server")
        parser.add_argument("--pg-failovers", type=int, default=0,
                            help="run on a PostgreSQL pair of its own (primary + "
                            "synchronous standby, initdb'd in a temporary directory with "
                            "the machine's binaries, reached by a multi-host URL with "
                            "target_session_attrs=read-write) and this many times kill "
                            "the primary, promote the standby and make a new standby "
                            "(0: the run's database on --database, no failover)")
        parser.add_argument("--pg-strict", action="store_true",
                            help="with --pg-failovers: commits wait for a standby even "
                            "right after a promotion (Patroni's synchronous_mode_strict); "
                            "default: the new primary commits alone until its new standby "
                            "is in sync (synchronous_mode)")
        parser.add_argument("--json", action="store_true", help="print the results as JSON")
        parser.add_argument("--fault-every", type=float, default=6.0,
                            help="mean seconds between machine faults (6)")
        parser.add_argument("--kill-every", type=float, default=60.0,
                            help="about every this many seconds kill -9 a web process, and "
                            "as often an engine process group (60; 0: no kills)")
        parser.add_argument("--db-cut-every", type=float, default=90.0,
                            help="about every this many seconds terminate every connection "
                            "to the run's database, as a PostgreSQL restart would, without "
                            "touching the server (90; 0: never)")
        parser.add_argument("--start-delay", type=float, default=0.5,
                            help="seconds a simulated VM start takes (0.5)")
        parser.add_argument("--settle", type=float, default=420.0,
                            help="longest wait for the fleet to settle after the chaos "
                            "(420: more than the 5-minute lease of an HA item whose "
                            "worker was killed)")
        parser.add_argument("--settle-stable", type=float, default=10.0,
                            help="seconds the settled state must hold (10)")
        parser.add_argument("--max-sweep-gap", type=float, default=60.0,
                            help="a longer sweeper gap is a violation (60 s)")
        parser.add_argument("--progress-every", type=float, default=10.0,
                            help="seconds between progress lines (10)")
        parser.add_argument("--database", default=DEFAULT_PG,
                            help="PostgreSQL server for the throw-away database "
                            f"(default {DEFAULT_PG}, or $HADASH_BENCH_PG)")
        parser.add_argument("--redis", default=os.environ.get("REDIS_URL")
                            or "redis://127.0.0.1:6379/0",
                            help="Redis for the channel layer (default $REDIS_URL, else "
                            "redis://127.0.0.1:6379/0)")
        parser.add_argument("--log-dir", default=None,
                            help="write each process's output to DIR/<name>.log")
        parser.add_argument("--verbose", action="store_true",
                            help="echo the output of the processes started")

    def handle(self, *args, **o):
        from bench import chaos
        from bench.common import BenchError, machine_line

        o["command"] = "python manage.py " + " ".join(sys.argv[1:]) \
            if sys.argv and sys.argv[0].endswith("manage.py") else "chaos"
        if o["hosts"] < 4 or o["vms"] < 2 or o["clusters"] < 1 or o["clusters"] > o["hosts"]:
            raise CommandError("need --hosts ≥ 4, --vms ≥ 2 and 1 ≤ --clusters ≤ --hosts",
                               returncode=2)
        if o["duration"] <= 0 or o["fault_every"] <= 0 or o["kill_every"] < 0 \
                or o["db_cut_every"] < 0 or o["pg_failovers"] < 0:
            raise CommandError("--duration and --fault-every must be positive, "
                               "--kill-every, --db-cut-every and --pg-failovers ≥ 0",
                               returncode=2)
        if o["pg_failovers"] and o["long"]:
            raise CommandError("--pg-failovers runs on a PostgreSQL pair of its own: "
                               "--long (restarting this machine's server) does not apply",
                               returncode=2)
        if o["pg_failovers"] and o["duration"] < 20 * o["pg_failovers"]:
            raise CommandError("--pg-failovers N needs --duration ≥ 20·N s (each failover "
                               "makes a new standby before the next)", returncode=2)
        try:
            result = chaos.run(o)
        except BenchError as exc:
            raise CommandError(str(exc), returncode=2) from None
        except KeyboardInterrupt:
            raise CommandError("interrupted; processes stopped, database dropped",
                               returncode=2) from None
        if o["json"]:
            self.stdout.write(chaos.as_json(result))
        else:
            self.stdout.write("")
            self.stdout.write(f"machine: {machine_line(result['machine'])}")
            self.stdout.write(f"command: {result['command']}")
            self.stdout.write("")
            self.stdout.write(chaos.report(result))
        if result["violations"]:
            raise CommandError(f"{len(result['violations'])} invariant violation(s)",
                               returncode=1)
