"""Seed the configuration keys added for issue 11 (ha.mode, ha.failover.level,
ha.admission, ha.restart.order, ha.restart.order.timeout, oob.check.interval) on
installations migrated before they existed; existing values are kept."""

from django.db import migrations

NEW_KEYS = ("ha.mode", "ha.failover.level", "ha.admission", "ha.restart.order",
            "ha.restart.order.timeout", "oob.check.interval")


def seed(apps, schema_editor):
    from hadash.config import KEYS

    Configuration = apps.get_model("hadash", "Configuration")
    for name in NEW_KEYS:
        k = KEYS[name]
        Configuration.objects.get_or_create(
            name=k.name,
            defaults={
                "value": k.default,
                "default_value": k.default,
                "category": k.category,
                "description": k.description,
            },
        )


class Migration(migrations.Migration):
    dependencies = [("hadash", "0006_incidents_alerts")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
