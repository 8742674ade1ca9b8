"""Seed every SPEC §2 key with its default (existing values are kept)."""

from django.db import migrations


def seed(apps, schema_editor):
    from hadash.config import KEYS

    Configuration = apps.get_model("hadash", "Configuration")
    for k in KEYS.values():
        Configuration.objects.update_or_create(
            name=k.name,
            defaults={
                "default_value": k.default,
                "category": k.category,
                "description": k.description,
            },
            create_defaults={
                "value": k.default,
                "default_value": k.default,
                "category": k.category,
                "description": k.description,
            },
        )


class Migration(migrations.Migration):
    dependencies = [("hadash", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
