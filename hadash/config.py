"""Configuration keys (SPEC §2): their types, defaults and ranges, and one typed
accessor. Values live in the `configuration` table and are read on every use, so an
edit (admin, API, scenario) takes effect without a restart."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A value that a key does not accept; the message says why."""


# The `configuration.value` column (hadash.models.Configuration) holds this many
# characters; a longer value is refused, never cut or left to the database to refuse.
MAX_VALUE_LENGTH = 4096


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as text at all, or None: PostgreSQL refuses NUL
    characters and no database can store a lone UTF-16 surrogate (issue 8). The
    message never repeats the offending character itself."""
    for i, ch in enumerate(text):
        if ch == "\x00":
            return f"contains a NUL character (at position {i}), which cannot be stored"
        if "\ud800" <= ch <= "\udfff":
            return (f"contains a lone surrogate U+{ord(ch):04X} (at position {i}), which is "
                    "not a character and cannot be stored")
    return None


def _cut(text: str, limit: int = 60) -> str:
    """``text`` for an error message, cut when it is long."""
    return text if len(text) <= limit else text[:limit] + "…"


def _shown(text: str) -> str:
    return repr(_cut(text))


@dataclass(frozen=True)
class Key:
    name: str
    type: str  # "int", "float", "bool", "str", "list"
    default: str
    category: str
    description: str
    min: float | None = None
    max: float | None = None
    check: Callable[[Any], None] | None = None

    def parse(self, raw: Any) -> Any:
        """Turn a raw value (text from admin/API, or a YAML scalar) into the typed
        value, or raise ConfigError with a message an operator can act on."""
        try:
            text = raw if isinstance(raw, str) else ("" if raw is None else str(raw))
        except ValueError:  # an int too long to print (over 4,300 digits)
            raise ConfigError(f"{self.name}: the value is too long") from None
        if len(text) > MAX_VALUE_LENGTH:
            raise ConfigError(
                f"{self.name}: the value is too long ({len(text)} characters, at most "
                f"{MAX_VALUE_LENGTH})"
            )
        problem = text_problem(text)
        if problem:
            raise ConfigError(f"{self.name}: the value {problem}")
        text = text.strip()
        if isinstance(raw, bool):
            text = "true" if raw else "false"
        if self.type == "int":
            try:
                value = int(text)
            except ValueError:
                raise ConfigError(
                    f"{self.name} must be a whole number, not {_shown(text)}"
                ) from None
        elif self.type == "float":
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{self.name} must be a number, not {_shown(text)}") from None
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{self.name} must be a finite number")
        elif self.type == "bool":
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                value = True
            elif low in ("false", "0", "no", "off"):
                value = False
            else:
                raise ConfigError(f"{self.name} must be true or false, not {_shown(text)}")
        elif self.type == "list":
            value = [part.strip() for part in text.split(",") if part.strip()]
        else:
            value = text
        if self.min is not None and value < self.min:
            raise ConfigError(
                f"{self.name} must be at least {_fmt(self.min)}, not {_cut(text)}"
            )
        if self.max is not None and value > self.max:
            raise ConfigError(
                f"{self.name} must be at most {_fmt(self.max)}, not {_cut(text)}"
            )
        if self.check:
            self.check(value)
        return value

    def normalise(self, raw: Any) -> str:
        """The canonical text stored for a valid value."""
        value = self.parse(raw)
        if self.type == "bool":
            text = "true" if value else "false"
        elif self.type == "list":
            text = ",".join(value)
        elif self.type == "float":
            text = repr(float(value)) if value != int(value) else f"{int(value)}"
        else:
            text = str(value)
        if len(text) > MAX_VALUE_LENGTH:
            raise ConfigError(
                f"{self.name}: the value is too long ({len(text)} characters, at most "
                f"{MAX_VALUE_LENGTH})"
            )
        return text


def _fmt(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else str(n)


INVESTIGATORS = ("CheckOnAgent", "Neighbour", "OutOfBand")


def _check_investigators(value: list[str]) -> None:
    if not value:
        raise ConfigError("ha.investigators.order must name at least one investigator")
    unknown = [v for v in value if v not in INVESTIGATORS]
    if unknown:
        raise ConfigError(
            f"ha.investigators.order: unknown investigator(s) {', '.join(unknown)}; "
            f"choose from {', '.join(INVESTIGATORS)}"
        )
    if len(set(value)) != len(value):
        raise ConfigError("ha.investigators.order names an investigator twice")


def tag_problem(tag: str) -> str | None:
    """Why ``tag`` is not a host tag (hosts store their tags comma-separated, and a
    tag is shown in pages and logs), or None."""
    if "," in tag:
        return "a host tag cannot contain a comma"
    problem = text_problem(tag)
    if problem:
        return problem
    for ch in tag:
        if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            return f"a host tag cannot contain control characters (U+{ord(ch):04X})"
    return None


def _check_tag(value: str) -> None:
    problem = tag_problem(value)
    if problem:
        raise ConfigError(f"ha.tag is a single host tag: {problem}")


def _one_of(name: str, choices: tuple[str, ...]) -> Callable[[Any], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ConfigError(
                f"{name} must be one of {', '.join(choices)}, not {_shown(str(value))}"
            )
    return check


HA_MODES = ("armed", "observe", "disarmed")
ADMISSION_MODES = ("off", "warn", "enforce")
RESTART_ORDERS = ("priority", "strict")


DAY = 86400
KEYS: dict[str, Key] = {
    k.name: k
    for k in [
        Key("ping.interval", "int", "10", "Agent", "Agents ping this often (seconds).", 1, 3600),
        Key("ping.timeout", "float", "2.5", "Agent",
            "A host is behind on ping when now − last_ping > ping.interval × ping.timeout.",
            1, 100),
        Key("alert.wait", "int", "1800", "Agent",
            "An undeterminable host waits this long (seconds) before Alert.", 0, 30 * DAY),
        Key("ha.workers", "int", "5", "HA",
            "HA work items processed at once across the installation; edits apply at once.",
            1, 1000),
        Key("investigate.retry.interval", "int", "60", "HA",
            "Retry delay (seconds) while a VM's fate is unknown.", 1, DAY),
        Key("restart.retry.interval", "int", "600", "HA",
            "Base retry delay (seconds) after a failed restart.", 1, DAY),
        Key("migrate.retry.interval", "int", "120", "HA",
            "Retry delay (seconds) for Migration work.", 1, DAY),
        Key("stop.retry.interval", "int", "600", "HA",
            "Retry delay (seconds) for Stop/CheckStop/ForceStop/Destroy work.", 1, DAY),
        Key("vm.ha.migration.max.retries", "int", "5", "HA",
            "Attempts before a work item ends in Error (with an alert).", 1, 1000),
        Key("time.between.failures", "int", "3600", "HA",
            "Window (seconds) in which a new HA item for the same VM inherits its tries.",
            0, 30 * DAY),
        Key("time.between.cleanup", "int", "86400", "HA",
            "How often (seconds) finished HA items older than time.between.failures are purged.",
            1, 30 * DAY),
        Key("force.ha", "bool", "false", "HA", "Treat every VM as HA-enabled."),
        Key("vm.ha.enabled", "bool", "true", "HA", "Master switch for VM HA."),
        Key("ha.vm.restart.hostup", "bool", "true", "HA",
            "Restart an HA VM that powered off while its host is Up."),
        Key("ha.tag", "str", "", "HA",
            "When set, HA restarts only land on hosts with this tag; ordinary placement "
            "avoids them.", check=_check_tag),
        Key("ha.investigators.order", "list", "CheckOnAgent,Neighbour,OutOfBand", "HA",
            "Investigators asked, in order.", check=_check_investigators),
        Key("ha.max.hosts.down.ratio", "float", "0.5", "HA",
            "Mass-failure brake: above this share of a cluster's hosts Down or Alert, "
            "automatic restarts in that cluster pause.", 0, 1),
        Key("ha.mode", "str", "armed", "HA",
            "armed, observe or disarmed (R26): observe records what HA would do without "
            "doing it; disarmed schedules no new HA work. A cluster may override it.",
            check=_one_of("ha.mode", HA_MODES)),
        Key("ha.failover.level", "int", "1", "HA",
            "Host failures each cluster should survive (R22–R23).", 0, 3),
        Key("ha.admission", "str", "warn", "HA",
            "off, warn or enforce (R23): what happens when a start would break the "
            "failover level.", check=_one_of("ha.admission", ADMISSION_MODES)),
        Key("ha.restart.order", "str", "priority", "HA",
            "priority, or strict: lower restart priorities wait for higher ones (R25).",
            check=_one_of("ha.restart.order", RESTART_ORDERS)),
        Key("ha.restart.order.timeout", "int", "120", "HA",
            "Longest wait (seconds) of a lower priority under strict restart order (R25).",
            0, DAY),
        Key("oob.check.interval", "int", "300", "HA",
            "How often (seconds) every host's BMC is checked: reachable, credentials "
            "accepted, power On (R28).", 10, DAY),
    ]
}


def key(name: str) -> Key:
    try:
        return KEYS[name]
    except KeyError:
        raise ConfigError(f"unknown configuration key {name!r}") from None


def get(name: str) -> Any:
    """The typed value in force for ``name`` (database first, then the default)."""
    from .models import Configuration

    k = key(name)
    raw = Configuration.objects.filter(name=name).values_list("value", flat=True).first()
    if raw is None:
        return k.parse(k.default)
    try:
        return k.parse(raw)
    except ConfigError:
        # A value written around the validation (raw SQL) never stops the engine.
        return k.parse(k.default)


class Snapshot:
    """All values in force, read in one query; use one per engine step."""

    def __init__(self) -> None:
        from .models import Configuration

        stored = dict(Configuration.objects.values_list("name", "value"))
        self._values: dict[str, Any] = {}
        for name, k in KEYS.items():
            raw = stored.get(name, k.default)
            try:
                self._values[name] = k.parse(raw)
            except ConfigError:
                self._values[name] = k.parse(k.default)

    def __getitem__(self, name: str) -> Any:
        return self._values[key(name).name]

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


def snapshot() -> Snapshot:
    return Snapshot()


def set_value(name: str, raw: Any, *, now=None, by: str = "") -> str:
    """Validate and store a value, writing a `ConfigChanged` event in the same
    transaction. Raises ConfigError (and changes nothing) on a bad value. Returns
    the canonical stored text."""
    from django.db import transaction
    from django.utils import timezone

    from .choices import Subject
    from .events import record_event
    from .models import Configuration

    k = key(name)
    value = k.normalise(raw)
    now = now or timezone.now()
    with transaction.atomic():
        row, _ = Configuration.objects.select_for_update().get_or_create(
            name=name,
            defaults={
                "value": k.default,
                "default_value": k.default,
                "category": k.category,
                "description": k.description,
            },
        )
        old = row.value
        if old == value:
            return value
        row.value = value
        row.updated = now
        row.save(update_fields=["value", "updated"])
        who = f" by {by}" if by else ""
        record_event(
            Subject.CONFIG,
            None,
            name=name,
            event="ConfigChanged",
            field="value",
            old=old,
            new=value,
            reason=by,
            message=f"Configuration {name}: {old} → {value}{who}",
            now=now,
        )
    return value
