"""The dashboard's two roles as Django groups: ``operators`` (read-only) and
``admins`` (act on hosts and VMs, acknowledge alerts, inject simulator faults)."""

from django.db import migrations

GROUPS = ("operators", "admins")


def create(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    for name in GROUPS:
        Group.objects.get_or_create(name=name)


def remove(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Group.objects.filter(name__in=GROUPS, user__isnull=True).delete()


class Migration(migrations.Migration):
    dependencies = [("auth", "0012_alter_user_first_name_max_length")]
    operations = [migrations.RunPython(create, remove)]
