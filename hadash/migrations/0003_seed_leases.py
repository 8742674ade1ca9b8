"""Seed the lease rows the engine locks (the HA claim lock and the cleanup marker)."""

from django.db import migrations


def seed(apps, schema_editor):
    Lease = apps.get_model("hadash", "Lease")
    for name in ("ha.claim", "ha.cleanup"):
        Lease.objects.get_or_create(name=name)


class Migration(migrations.Migration):
    dependencies = [("hadash", "0002_seed_configuration")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
