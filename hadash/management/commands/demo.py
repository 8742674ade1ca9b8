"""python manage.py demo — the whole system on one machine.

Migrates the configured database (the embedded SQLite default unless DATABASE_URL is
set), makes an admin login, starts daphne (web + agent protocol + websockets), a
django-q cluster (the HA engine loops) and a simulated fleet, and prints the URLs and
the login. Ctrl-C stops everything: SIGTERM, a grace period, then SIGKILL.

The processes' logs go to files under var/log/ (web.log, engine.log, fleet.log), not to
the terminal, so the login banner stays in view: the terminal gets one summary line a
minute (lines, warnings and errors per process, the latest problem) and the banner
again once start-up is over (every simulated host Up). ``--log-to-terminal`` prints the
logs as before.

Secrets (R30) are the settings': the environment's, else var/secrets.env's (random,
written once by scripts/setup, kept across restarts so sessions and the simulated hosts'
enrolment stay valid). Every process the demo starts inherits them.
"""

from __future__ import annotations

import secrets
import signal
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from hadash.supervisor import Supervisor, daphne_argv, port_is_free, wait_for_port


class Command(BaseCommand):
    help = "Run the web server, the HA engine (django-q) and a simulated fleet together."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=8000, help="web port (8000)")
        parser.add_argument("--fleet-port", type=int, default=9100,
                            help="simulated fleet's agents/BMCs/control API port (9100)")
        parser.add_argument("--hosts", type=int, default=20)
        parser.add_argument("--vms", type=int, default=200)
        parser.add_argument("--ha-ratio", type=float, default=0.5)
        parser.add_argument("--clusters", type=int, default=2)
        parser.add_argument("--start-delay", type=float, default=1.0,
                            help="seconds a simulated VM start takes (1.0)")
        parser.add_argument("--no-fleet", action="store_true",
                            help="do not start the simulated fleet")
        parser.add_argument("--username", default="admin")
        parser.add_argument("--log-to-terminal", action="store_true",
                            help="print the processes' logs here instead of var/log/*.log")

    def handle(self, *args, **o):
        for port in (o["port"], o["fleet_port"]):
            if not port_is_free(port):
                raise CommandError(
                    f"port {port} is in use; is a demo already running? "
                    "Choose others with --port / --fleet-port."
                )
        db = settings.DATABASES["default"]
        self.stdout.write(f"hadash: database {db['ENGINE'].rsplit('.', 1)[-1]} {db['NAME']}")
        self.stdout.write("hadash: applying migrations…")
        call_command("migrate", verbosity=0, interactive=False)
        password, token = self.make_login(o["username"])

        base = f"http://127.0.0.1:{o['port']}"
        fleet = f"http://127.0.0.1:{o['fleet_port']}"
        # The simulator's control API takes a token (issue 8, part 5): var/secrets.env's
        # (scripts/setup) when there is one, so `simulate fault` finds it too; else one
        # for this run. The web process's Simulator page sends it.
        fleet_token = settings.HADASH_FLEET_TOKEN or secrets.token_urlsafe(32)
        fleet_env = {"HADASH_FLEET_URL": fleet, "HADASH_FLEET_TOKEN": fleet_token}
        log_dir = None if o["log_to_terminal"] else Path(settings.VAR_DIR) / "log"
        sup = Supervisor(grace=10.0, echo=True, log_dir=log_dir)
        stopping = False

        def on_signal(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            # The dashboard's simulator panel talks to the fleet's control API.
            web = sup.python("web", *daphne_argv(o["port"]),
                             env={} if o["no_fleet"] else fleet_env)
            wait_for_port(o["port"], proc=web.proc, timeout=60)
            call_command("engine", "start")
            sup.manage("engine", "qcluster")
            if not o["no_fleet"]:
                sup.manage(
                    "fleet", "simulate", "--server", base, "--listen",
                    f"127.0.0.1:{o['fleet_port']}", "--hosts", str(o["hosts"]),
                    "--vms", str(o["vms"]), "--ha-ratio", str(o["ha_ratio"]),
                    "--clusters", str(o["clusters"]), "--start-delay", str(o["start_delay"]),
                    "--api-token", token, env=fleet_env,
                )
            self.banner(base, fleet, o, password, token, fleet_token)
            if log_dir is not None:
                self.stdout.write(f"hadash: logs in {log_dir}/ (web.log, engine.log"
                                  f"{'' if o['no_fleet'] else ', fleet.log'}); a summary "
                                  "here every minute")
            started = time.monotonic()
            starting = not o["no_fleet"]
            next_check = next_summary = started
            while not stopping:
                dead = sup.first_exited()
                if dead is not None:
                    self.stderr.write(
                        f"hadash: {dead.name} exited with {dead.proc.returncode}; stopping"
                        + (f" (see {dead.log_path})" if dead.log_path else "")
                    )
                    break
                now = time.monotonic()
                if starting and now >= next_check:
                    next_check = now + 2
                    up, running = self.fleet_state()
                    if up >= o["hosts"] or now - started > 180:
                        starting = False
                        self.stdout.write(
                            f"hadash: start-up done in {now - started:.0f} s — {up} of "
                            f"{o['hosts']} hosts Up, {running} VMs Running")
                        self.banner(base, fleet, o, password, token, fleet_token)
                if log_dir is not None and now >= next_summary + 60:
                    next_summary = now
                    self.stdout.write(self.summary(sup.take_counts()))
                time.sleep(0.5)
        finally:
            self.stdout.write("hadash: stopping (SIGTERM, then SIGKILL after 10 s)…")
            codes = sup.stop()
            self.stdout.write(f"hadash: stopped {', '.join(codes)}")
        if not stopping:
            sys.exit(1)

    @staticmethod
    def fleet_state() -> tuple[int, int]:
        """Hosts Up and VMs Running now (for the end of start-up)."""
        from django.db import close_old_connections

        from hosts.choices import HostStatus
        from hosts.models import Host
        from vms.choices import VmState
        from vms.models import VMInstance

        close_old_connections()
        try:
            return (Host.objects.filter(status=HostStatus.UP).count(),
                    VMInstance.objects.filter(state=VmState.RUNNING).count())
        except Exception:  # the database is busy or away: ask again later
            return 0, 0

    @staticmethod
    def summary(counts) -> str:
        """One line for the last minute: per process, lines logged, warnings, errors,
        and the latest error (or warning), shortened."""
        parts, problem = [], ""
        for name, lines, warnings, errors, last in counts:
            extra = ", ".join(f"{n} {w}" for n, w in ((warnings, "warnings"), (errors, "errors"))
                              if n)
            parts.append(f"{name} {lines} lines" + (f" ({extra})" if extra else ""))
            if last and not problem:
                problem = f" — {name}: {last[:120]}"
        return f"hadash {time.strftime('%H:%M')}: " + " · ".join(parts) + problem

    def make_login(self, username: str) -> tuple[str, str]:
        from django.contrib.auth import get_user_model

        from hadash.models import ApiToken

        User = get_user_model()
        password = secrets.token_urlsafe(12)
        user, _ = User.objects.get_or_create(username=username)
        user.is_staff = user.is_superuser = user.is_active = True
        user.set_password(password)
        user.save()
        _, token = ApiToken.issue(user)
        return password, token

    @staticmethod
    def host_with_ha_vms(o) -> str:
        """The first simulated host running HA-enabled VMs (the same generation the
        simulator uses), so the suggested fault shows HA restarting them."""
        from fleet.simulator.state import demo_fleet

        fleet = demo_fleet(hosts=o["hosts"], vms=o["vms"], ha_ratio=o["ha_ratio"])
        homes = [spec.home for spec in fleet.vm_specs.values() if spec.ha_enabled]
        return homes[0] if homes else next(iter(fleet.hosts))

    def banner(self, base, fleet, o, password, token, fleet_token="") -> None:
        w = self.stdout.write
        w("")
        w("=" * 72)
        w(f"  hadash is running — dashboard  {base}/")
        w(f"  login  {o['username']} / {password}")
        w(f"  admin  {base}/admin/     API  {base}/api/v1/  (Bearer {token})")
        if settings.SECRETS_FILE.exists():
            w(f"  secrets (SECRET_KEY, agent join key, control token)  {settings.SECRETS_FILE}")
        if not o["no_fleet"]:
            w(f"  simulated fleet: {o['hosts']} hosts, {o['vms']} VMs — inject faults in the "
              f"dashboard's Simulator page, or:")
            victim = self.host_with_ha_vms(o)
            # `simulate fault` finds the token itself when it is var/secrets.env's.
            prefix = ("" if fleet_token == settings.HADASH_FLEET_TOKEN
                      else f"HADASH_FLEET_TOKEN={fleet_token} ")
            w(f"    {prefix}.venv/bin/python manage.py simulate fault \"host {victim} power "
              f"off\" --control {fleet}")
            w(f"  simulator control token  {fleet_token}")
        w("  Ctrl-C stops everything")
        w("=" * 72)
        w("")
