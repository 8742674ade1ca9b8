"""VM enums, CloudStack's names kept verbatim (SPEC §1)."""

from django.db import models


class VmType(models.TextChoices):
    USER = "User"
    DOMAIN_ROUTER = "DomainRouter"
    CONSOLE_PROXY = "ConsoleProxy"
    SECONDARY_STORAGE_VM = "SecondaryStorageVm"


SYSTEM_VM_TYPES = (VmType.DOMAIN_ROUTER, VmType.CONSOLE_PROXY, VmType.SECONDARY_STORAGE_VM)


class VmState(models.TextChoices):
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    MIGRATING = "Migrating"
    ERROR = "Error"
    DESTROYED = "Destroyed"
    EXPUNGING = "Expunging"


# States in which a VM occupies capacity on its host (R13).
ACTIVE_STATES = (VmState.STARTING, VmState.RUNNING, VmState.STOPPING, VmState.MIGRATING)
# R8: a VM in one of these that its host's report leaves out becomes PowerReportMissing.
REPORTED_STATES = (VmState.RUNNING, VmState.STARTING, VmState.STOPPING)
# R10: the VMs of a failed host that get an HA item.
ON_HOST_STATES = ACTIVE_STATES


class PowerState(models.TextChoices):
    POWER_ON = "PowerOn"
    POWER_OFF = "PowerOff"
    POWER_UNKNOWN = "PowerUnknown"
    POWER_REPORT_MISSING = "PowerReportMissing"


# The only values an agent may report (PROTOCOL.md).
REPORTABLE_POWER_STATES = (PowerState.POWER_ON, PowerState.POWER_OFF)
# R9: power states that mean "not running".
POWERED_OFF_STATES = (PowerState.POWER_OFF, PowerState.POWER_REPORT_MISSING)


class Priority(models.TextChoices):
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


PRIORITY_RANK = {Priority.HIGH: 0, Priority.MEDIUM: 1, Priority.LOW: 2}


class GroupKind(models.TextChoices):
    """R25: a VM group's rule."""
    ANTI_AFFINITY = "anti-affinity"
    AFFINITY = "affinity"
