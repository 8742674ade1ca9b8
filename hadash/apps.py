from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _register_schedules(sender, **kwargs):
    from hadash.tasks import register_schedules

    register_schedules()


def _host_engine_loop(sender, proc_name=None, **kwargs):
    """Every engine process (`manage.py qcluster`) runs one engine loop of its own,
    started in one of its worker processes as django-q spawns it (hadash.ha.runtime).
    Connected in ready(), which runs wherever Django is set up, so every process
    qcluster forks has the receiver."""
    from hadash.ha.runtime import host_resident_loop

    host_resident_loop()


def _connect_engine_loop() -> None:
    import logging

    from django_q.signals import post_spawn

    from hadash.outage import OneLine

    post_spawn.connect(_host_engine_loop, dispatch_uid="hadash.engine_loop")
    # A database outage: one line per error from django-q too, not a traceback.
    django_q_log = logging.getLogger("django-q")
    if not any(isinstance(f, OneLine) for f in django_q_log.filters):
        django_q_log.addFilter(OneLine())


class HadashConfig(AppConfig):
    name = "hadash"
    verbose_name = "HA manager"

    def ready(self):
        # `migrate` leaves the engine's django-q schedule in place (idempotent).
        post_migrate.connect(_register_schedules, sender=self)
        _connect_engine_loop()
