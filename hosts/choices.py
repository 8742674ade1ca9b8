"""Host enums, CloudStack's names kept verbatim (SPEC §1)."""

from django.db import models


class HostType(models.TextChoices):
    ROUTING = "Routing"
    CONSOLE_PROXY = "ConsoleProxy"
    SECONDARY_STORAGE_VM = "SecondaryStorageVM"
    SECONDARY_STORAGE_CMD_EXECUTOR = "SecondaryStorageCmdExecutor"
    SECONDARY_STORAGE = "SecondaryStorage"
    TRAFFIC_MONITOR = "TrafficMonitor"


# R2: never watched for pings (CloudStack keeps them out of its ping map).
UNWATCHED_HOST_TYPES = (HostType.TRAFFIC_MONITOR, HostType.SECONDARY_STORAGE)
# R3: disconnected without investigation when behind on ping.
NO_INVESTIGATION_HOST_TYPES = (
    HostType.CONSOLE_PROXY,
    HostType.SECONDARY_STORAGE_VM,
    HostType.SECONDARY_STORAGE_CMD_EXECUTOR,
)


class HostStatus(models.TextChoices):
    CREATING = "Creating"
    CONNECTING = "Connecting"
    UP = "Up"
    DOWN = "Down"
    DISCONNECTED = "Disconnected"
    ALERT = "Alert"
    REMOVED = "Removed"
    ERROR = "Error"
    REBALANCING = "Rebalancing"


# R2: the monitor sweep looks for behind hosts among these.
SWEPT_STATUSES = (HostStatus.UP, HostStatus.CONNECTING)
# R6: a ping or reconnect brings these back Up.
RECOVERABLE_STATUSES = (
    HostStatus.ALERT,
    HostStatus.DISCONNECTED,
    HostStatus.CONNECTING,
    HostStatus.DOWN,
)
# R14: statuses that count as failed for the mass-failure brake.
FAILED_STATUSES = (HostStatus.DOWN, HostStatus.ALERT)


class ResourceState(models.TextChoices):
    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PREPARE_FOR_MAINTENANCE = "PrepareForMaintenance"
    ERROR_IN_MAINTENANCE = "ErrorInMaintenance"
    MAINTENANCE = "Maintenance"


# R3: a behind host in one of these is disconnected without investigation.
NO_INVESTIGATION_RESOURCE_STATES = (
    ResourceState.DISABLED,
    ResourceState.MAINTENANCE,
    ResourceState.ERROR_IN_MAINTENANCE,
)


class HostEvent(models.TextChoices):
    """CloudStack's Status.Event names for host transitions."""

    AGENT_CONNECTED = "AgentConnected"
    READY = "Ready"
    PING = "Ping"
    PING_TIMEOUT = "PingTimeout"
    SHUTDOWN_REQUESTED = "ShutdownRequested"
    AGENT_DISCONNECTED = "AgentDisconnected"
    HOST_DOWN = "HostDown"
    WAIT_TIMEOUT = "WaitedTooLong"
    FENCED = "HostFenced"
    FENCE_FAILED = "FenceFailed"
    RESOURCE_STATE = "ResourceStateChanged"
    # R29: an operator allowed one join-key connect to take the host; one did.
    REENROL_ALLOWED = "ReEnrolAllowed"
    REENROLLED = "ReEnrolled"


class Verdict(models.TextChoices):
    """An investigator's answer about a host or a VM (R4, R12)."""

    ALIVE = "Alive"
    DEAD = "Dead"
    UNKNOWN = "Unknown"
