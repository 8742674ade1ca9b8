from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _register_schedules(sender, **kwargs):
    from hadash.tasks import register_schedules

    register_schedules()


class HadashConfig(AppConfig):
    name = "hadash"
    verbose_name = "HA manager"

    def ready(self):
        # `migrate` leaves the engine's django-q schedule in place (idempotent).
        post_migrate.connect(_register_schedules, sender=self)
