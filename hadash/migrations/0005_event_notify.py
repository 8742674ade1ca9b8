"""PostgreSQL: NOTIFY hadash_events when events commit, so every web process's relay
(hadash.live) wakes at once whichever process wrote them. A no-op on SQLite."""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION hadash_event_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('hadash_events', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS event_notify ON event;
CREATE TRIGGER event_notify AFTER INSERT ON event
    FOR EACH STATEMENT EXECUTE FUNCTION hadash_event_notify();
"""
DROP = """
DROP TRIGGER IF EXISTS event_notify ON event;
DROP FUNCTION IF EXISTS hadash_event_notify();
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("hadash", "0004_engine_process")]
    operations = [migrations.RunPython(forwards, backwards)]
