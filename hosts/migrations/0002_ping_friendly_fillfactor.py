"""Every ping updates its host's row (last_ping). Room left in each heap page
(fillfactor 70) lets PostgreSQL keep the new row version on the same page
(docs/benchmarks.md, P3). host_sweep_idx indexes last_ping, so these updates are not
HOT; the index stays because the sweeper queries it several times a second.

Existing installations: `VACUUM FULL host` rewrites old pages with the new fillfactor.
"""

from django.db import migrations

FILLFACTOR = 70


def set_fillfactor(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE host SET (fillfactor = {FILLFACTOR})")


def reset_fillfactor(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE host RESET (fillfactor)")


class Migration(migrations.Migration):

    dependencies = [
        ("hosts", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(set_fillfactor, reset_fillfactor, elidable=False),
    ]
