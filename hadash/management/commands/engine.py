"""python manage.py engine status|start|run

status  what the engine loops and the sweeper lease look like now
start   register the schedule and enqueue engine loops for the django-q cluster now
        (instead of waiting up to a minute for the scheduler)
run     run one engine loop in the foreground (no django-q; for debugging)
"""

import json

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
        from hadash.tasks import register_schedules, spawn_loop

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
            missing = max(1, runtime.TARGET_LOOPS - st["alive_loops"])
            spawn_loop(missing)
            self.stdout.write(f"hadash: enqueued {missing} engine loop(s) for the django-q "
                              "cluster (python manage.py qcluster runs them)")
        else:
            lifetime = opts["lifetime"] or 10 ** 9
            self.stdout.write("running an engine loop in the foreground (Ctrl-C stops)")
            loop = runtime.EngineLoop(lifetime=lifetime, target=10 ** 6)
            try:
                loop.run()
            except KeyboardInterrupt:
                pass
