"""python manage.py engine status|start|run

status  what the engine loops and the sweeper lease look like now
start   register the engine's django-q schedule (`migrate` does it too); the engine
        loops themselves start with each engine process (`manage.py qcluster`)
run     run one engine loop in the foreground (no django-q; for debugging)
"""

import json
import math

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Inspect or start the HA engine loops."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["status", "start", "run"])
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--lifetime", type=float, default=None,
                            help="run: seconds before the loop ends (default: forever)")

    def handle(self, *args, action, **opts):
        from hadash.ha import runtime
        from hadash.tasks import register_schedules

        if action == "status":
            st = runtime.status()
            if opts["json"]:
                self.stdout.write(json.dumps(st, default=str, indent=2))
                return
            sw = st["sweeper"]
            self.stdout.write(
                f"sweeper: {'healthy' if sw['healthy'] else 'NOT HEALTHY'} "
                f"(holder {sw['holder'] or '-'}, lease until {sw['expires']})"
            )
            self.stdout.write(f"loops: {st['alive_loops']} alive of {st['target_loops']} wanted")
            for p in st["loops"]:
                self.stdout.write(
                    f"  {p['id']}  {'alive' if p['alive'] else 'STALE'}  "
                    f"{'sweeper ' if p['sweeper'] else ''}workers={p['workers']} "
                    f"busy={p['busy']} heartbeat={p['heartbeat']:%H:%M:%S}"
                )
        elif action == "start":
            register_schedules()
            st = runtime.status()
            self.stdout.write(f"hadash: engine schedule registered; {st['alive_loops']} "
                              "engine loop(s) alive — each engine process "
                              "(python manage.py qcluster) runs one")
        else:
            lifetime = opts["lifetime"] or math.inf
            self.stdout.write("running an engine loop in the foreground (Ctrl-C stops)")
            loop = runtime.EngineLoop(lifetime=lifetime)
            try:
                loop.run()
            except KeyboardInterrupt:
                pass
