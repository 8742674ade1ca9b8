"""HA work enums (SPEC §1), CloudStack's names kept verbatim."""

from django.db import models


class WorkType(models.TextChoices):
    HA = "HA"
    MIGRATION = "Migration"
    STOP = "Stop"
    CHECK_STOP = "CheckStop"
    FORCE_STOP = "ForceStop"
    DESTROY = "Destroy"


class Step(models.TextChoices):
    SCHEDULED = "Scheduled"
    INVESTIGATING = "Investigating"
    FENCING = "Fencing"
    STOPPING = "Stopping"
    RESTARTING = "Restarting"
    MIGRATING = "Migrating"
    CANCELLED = "Cancelled"
    DONE = "Done"
    ERROR = "Error"


# Terminal steps: an item in one of these is finished and never processed again.
FINAL_STEPS = (Step.CANCELLED, Step.DONE, Step.ERROR)
# R16: finished items that cleanup purges (Error items stay for operators).
PURGEABLE_STEPS = (Step.DONE, Step.CANCELLED)


class Reason(models.TextChoices):
    HOST_DOWN = "HostDown"
    HOST_DEGRADED = "HostDegraded"
    HOST_MAINTENANCE = "HostMaintenance"
    VM_POWER_OFF = "VmPowerOff"
    VM_REPORT_MISSING = "VmReportMissing"
    OPERATOR = "Operator"


class Subject(models.TextChoices):
    """What an event is about."""

    HOST = "host"
    VM = "vm"
    WORK = "work"
    CONFIG = "config"
    CLUSTER = "cluster"
    ENGINE = "engine"


class Severity(models.TextChoices):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"
