"""python manage.py scenario PATH [PATH ...] [--json]

Runs acceptance scenarios (../shared/scenarios/README.md). Each scenario runs in a
fresh temporary SQLite database of its own (copied from one migrated template), so
the configured database is never touched. Exits 0 only when every expectation of
every file holds and no VM ever ran on two hosts at once.

An operator action that hadash refuses is printed as a REFUSED line with hadash's
reason, and the scenario goes on (a refusal alone fails nothing; an `action:`
expectation can require it). An operator action that fails unexpectedly is a FAIL
line, and the scenario still runs to its end.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connections


@contextmanager
def temporary_database(path: Path):
    """Point the default connection at an SQLite file for the duration."""
    conn_settings = connections.settings["default"]
    saved = dict(conn_settings)
    connections["default"].close()
    conn_settings.update({
        "ENGINE": "django.db.backends.sqlite3", "NAME": str(path),
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20,
                    "init_command": "PRAGMA synchronous=OFF; PRAGMA journal_mode=MEMORY;"},
        "HOST": "", "PORT": "", "USER": "", "PASSWORD": "", "CONN_MAX_AGE": 0,
    })
    del connections["default"]
    try:
        yield
    finally:
        connections["default"].close()
        conn_settings.clear()
        conn_settings.update(saved)
        del connections["default"]


class Command(BaseCommand):
    help = "Run acceptance scenarios against the real engine with a virtual clock."

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", help="scenario YAML files or folders")
        parser.add_argument("--json", action="store_true", help="print a JSON report")
        parser.add_argument(
            "--every-second", action="store_true",
            help="run the engine every virtual second, without skipping idle seconds "
                 "(slower; the results must be the same)",
        )

    def handle(self, *paths, **opts):
        from fleet import scenario

        files: list[Path] = []
        for p in opts["paths"]:
            path = Path(p)
            if path.is_dir():
                files.extend(sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")))
            elif path.is_file():
                files.append(path)
            else:
                raise CommandError(f"no such scenario file or folder: {p}")
        if not files:
            raise CommandError("no scenario files found")

        results = []
        with tempfile.TemporaryDirectory(prefix="hadash-scenario-") as tmp:
            template = Path(tmp) / "template.sqlite3"
            with temporary_database(template):
                call_command("migrate", verbosity=0, interactive=False)
            for i, f in enumerate(files):
                db = Path(tmp) / f"run-{i}.sqlite3"
                shutil.copy(template, db)
                started = time.monotonic()
                with temporary_database(db):
                    try:
                        data = scenario.load(f)
                        result = scenario.Run(data, str(f)).run(
                            every_second=opts["every_second"])
                    except scenario.ScenarioError as exc:
                        result = scenario.Result(path=str(f), name=f.stem, error=str(exc))
                    except Exception as exc:  # report, and go on with the next file
                        result = scenario.Result(
                            path=str(f), name=f.stem,
                            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                        )
                result.seconds = time.monotonic() - started
                results.append(result)
                if not opts["json"]:
                    self.print_result(result)

        ok = all(r.ok for r in results)
        if opts["json"]:
            self.stdout.write(json.dumps({
                "ok": ok,
                "scenarios": [{
                    "path": r.path, "name": r.name, "ok": r.ok, "error": r.error,
                    "seconds": round(r.seconds, 3), "violations": r.violations,
                    "actions": [{"at": a.at, "do": a.do, "outcome": a.outcome,
                                 "message": a.message} for a in r.actions],
                    "expectations": [{
                        "at": c.at, "kind": c.kind, "name": c.name, "key": c.key,
                        "expected": c.expected, "found": c.found, "ok": bool(c.ok),
                    } for c in r.checks],
                } for r in results],
            }, indent=2, default=str))
        else:
            passed = sum(1 for r in results if r.ok)
            self.stdout.write(f"{passed} of {len(results)} scenario(s) passed")
        if not ok:
            sys.exit(1)

    def print_result(self, r) -> None:
        w = self.stdout.write
        w(f"== {r.path}: {r.name} ({r.seconds:.2f} s)")
        if r.error:
            w(self.style.ERROR(f"FAIL  scenario error: {r.error}"))
            return
        for a in r.actions:
            if a.outcome == "refused":
                w(self.style.WARNING(f"REFUSED  t={a.at} {a.do} — {a.message}"))
            elif a.outcome == "error":
                w(self.style.ERROR(f"FAIL  t={a.at} {a.do} — hadash failed: {a.message}"))
        for c in r.checks:
            line = (f"{'PASS' if c.ok else 'FAIL'}  {c.describe()}"
                    f"{'' if c.ok else ''} — found {c.found}")
            w(self.style.SUCCESS(line) if c.ok else self.style.ERROR(line))
        for v in r.violations:
            w(self.style.ERROR(f"FAIL  {v}"))
        if not r.violations:
            w(self.style.SUCCESS("PASS  invariant: no VM powered on on two hosts at once"))
