"""Bulk registration and adoption through the operator API (issue 12, target 4).

`POST /api/v1/vms/bulk` registers a list of VMs (each as `POST /api/v1/vms` does: state
Running and power PowerOn on its host, a `Registered` event each) and
`POST /api/v1/unmanaged-vms/adopt` adopts a list of unmanaged VMs (as
`hadash.ha.actions.adopt_vms` did one by one). Both:

* validate the list as a whole: every bad item is named in one 400 answer,
  `{"error": "...", "errors": [{"index": i, "name": ..., "error": "..."}, ...]}` — a bad
  field, a name given twice in the request or already in use, an unknown host — and
  nothing is written;
* judge admission (R23, `ha.admission` enforce) for the request as a whole: every VM of
  the request placed in its cluster's copy at once; a cluster left below
  `ha.failover.level` refuses the request (409 with the reason), nothing written;
* write everything in one transaction: the VMs, then their events (every state change
  committed with its event). The number of queries does not grow with the list on
  PostgreSQL (one INSERT for the VMs, one for the events: `insert`); on SQLite it is
  the ORM's `bulk_create`, one INSERT per ~50 rows (999 parameters per statement).

Live dashboards are not flooded: the relay (hadash.live) reads committed events in
batches of up to 2,000 and sends each batch as one websocket message, and the NOTIFY
trigger on `event` fires once per INSERT statement, not per row.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.response import Response

from hadash.choices import Severity, Subject
from hadash.models import Event
from hadash.names import is_valid_name
from hosts.models import Host
from vms.choices import PowerState, Priority, VmState, VmType
from vms.models import VMInstance

from .serializers import (
    MAX_ADOPT,
    MAX_BULK,
    MAX_VM_CPUS,
    MAX_VM_MEMORY_MB,
    AdoptEntrySerializer,
    BulkErrorSerializer,
    ErrorSerializer,
    VMBulkCreateSerializer,
    VMBulkResultSerializer,
    VMCreateSerializer,
)
from .views import E401, E403, ApiView, VMDetailView, _flatten, printable

SHOWN = 5  # bad items quoted in the summary `error` (all are in `errors`)
PRIORITIES = frozenset(Priority.values)
VM_TYPES = frozenset(VmType.values)


class Refused(Exception):
    """The request is refused as a whole; nothing was written."""

    def __init__(self, code: int, message: str, errors: list[dict] | None = None):
        super().__init__(message)
        self.code = code
        self.errors = errors

    def response(self) -> Response:
        body: dict = {"error": str(self)}
        if self.errors is not None:
            body["errors"] = self.errors
        return Response(printable(body), status=self.code)


@dataclass
class NewVm:
    """One VM to write, checked."""
    name: str
    host: Host
    cpus: int
    memory_mb: int
    ha_enabled: bool = False
    priority: str = "medium"
    type: str = "User"
    definition: tuple[str, str] | None = None
    message: str = ""
    powered_off: str = ""  # adoption: the power state it is off in (adopted Stopped)


# --- reading and checking the list ---------------------------------------------------


def read_list(data, *, limit: int, key: str = "vms", noun: str = "VM") -> list:
    """The ``key`` list of the body (``noun``: what its items are), or Refused (400)
    with why not."""
    if not isinstance(data, dict) or key not in data:
        raise Refused(400, f'the body must be {{"{key}": [ ... ]}}: a list of {noun}s under '
                           f'"{key}"')
    items = data[key]
    if not isinstance(items, list):
        raise Refused(400, f'"{key}" must be a list, not {type(items).__name__}')
    if not items:
        raise Refused(400, f'"{key}" is empty: give at least one {noun}')
    if len(items) > limit:
        raise Refused(400, f"too many {noun}s in one request: {len(items)}; at most {limit} — "
                           "send them in several requests")
    return items


def _name(item) -> str | None:
    name = item.get("name") if isinstance(item, dict) else None
    return name if isinstance(name, str) else None


def validate_items(items: list, serializer_class,
                   quick=None) -> tuple[dict[int, dict], dict[int, str]]:
    """Each item through ``serializer_class`` (one instance for all, as DRF's
    many=True does) — or ``quick(item)`` when that says it is good: (validated data by
    index, error by index)."""
    child = serializer_class()
    good: dict[int, dict] = {}
    bad: dict[int, str] = {}
    for i, item in enumerate(items):
        if quick is not None:
            data = quick(item)
            if data is not None:
                good[i] = data
                continue
        try:
            good[i] = child.run_validation(item)
        except exceptions.ValidationError as exc:
            bad[i] = "; ".join(_flatten(exc.detail)) or "invalid"
    return good, bad


def quick_vm(item) -> dict | None:
    """What VMCreateSerializer would make of ``item`` when it is plainly good (JSON
    types exactly as documented), else None: DRF then checks it and says what is wrong.
    DRF's field machinery costs about a millisecond per item; this a microsecond."""
    if type(item) is not dict:
        return None
    name, host = item.get("name"), item.get("host")
    cpus, memory = item.get("cpus"), item.get("memory_mb")
    ha = item.get("ha_enabled", False)
    priority = item.get("priority", "medium")
    vm_type = item.get("type", "User")
    if (type(cpus) is int and type(memory) is int and type(ha) is bool
            and type(name) is str and type(host) is str
            and type(priority) is str and type(vm_type) is str
            and 1 <= cpus <= MAX_VM_CPUS and 1 <= memory <= MAX_VM_MEMORY_MB
            and priority in PRIORITIES and vm_type in VM_TYPES
            and is_valid_name(name) and is_valid_name(host)):
        return {"name": name, "host": host, "cpus": cpus, "memory_mb": memory,
                "ha_enabled": ha, "priority": priority, "type": vm_type}
    return None


def _chunks(values: list, size: int | None = None):
    if size is None:
        # SQLite builds may cap a statement at 999 parameters; PostgreSQL's cap is 65535.
        size = 900 if connection.vendor == "sqlite" else 30_000
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _named(queryset, names: list[str]):
    """``queryset`` filtered to these names: one query with one array parameter on
    PostgreSQL (``name = ANY(%s)``), a query per 900 names elsewhere."""
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(queryset.model._meta.db_table)
        yield from queryset.extra(where=[f"{table}.name = ANY(%s::text[])"], params=[names])
        return
    for chunk in _chunks(names):
        yield from queryset.filter(name__in=chunk)


def existing_names(names) -> set[str]:
    return set(_named(VMInstance.objects.values_list("name", flat=True), sorted(set(names))))


def hosts_named(names) -> dict[str, Host]:
    return {h.name: h for h in _named(Host.objects.only("id", "name", "cluster"),
                                      sorted(set(names)))}


def duplicates(named: dict[int, str]) -> dict[int, str]:
    """Items whose name an earlier item of the request has: index → error."""
    first: dict[str, int] = {}
    out: dict[int, str] = {}
    for i in sorted(named):
        n = named[i]
        if n in first:
            out[i] = f"{n!r} is named more than once in this request (first at index {first[n]})"
        else:
            first[n] = i
    return out


def refuse_items(bad: dict[int, str], items: list, *, what: str, key: str = "vms",
                 noun: str = "VM") -> None:
    """Refused (400) listing every bad item, if any."""
    if not bad:
        return
    errors = [{"index": i, "name": _name(items[i]), "error": bad[i]} for i in sorted(bad)]
    shown = "; ".join(
        f"{key}[{e['index']}]{' (' + e['name'] + ')' if e['name'] else ''}: {e['error']}"
        for e in errors[:SHOWN])
    more = f"; … and {len(errors) - SHOWN} more (see errors)" if len(errors) > SHOWN else ""
    raise Refused(400, f"{len(errors)} of {len(items)} {noun}s cannot be {what}, nothing was "
                       f"written: {shown}{more}", errors)


# --- admission (R23) -----------------------------------------------------------------


def admission_refusal(new: list[NewVm], cfg) -> str:
    """R23 enforce for the request as a whole: every VM of it (that will run) placed in
    a copy of its cluster at once; why a cluster would fall below ``ha.failover.level``
    ("" when none would, or admission is not `enforce`)."""
    from clusters import admission as r23
    from vms import failover

    if r23._cfg(cfg, "ha.admission", "warn") != "enforce":
        return ""
    level = int(r23._cfg(cfg, "ha.failover.level", 1))
    if level <= 0:
        return ""
    running = [v for v in new if not v.powered_off and v.host.cluster]
    clusters = sorted({v.host.cluster for v in running if r23.ha_wanted(v.ha_enabled, cfg)})
    if not clusters:
        return ""
    states = failover.load(clusters, cfg=cfg)
    added: dict[str, int] = {}
    for i, v in enumerate(running):
        st = states.get(v.host.cluster)
        if st is None:
            continue
        st.vms.append(failover.VmCopy(-1 - i, v.name, v.host.pk, v.cpus, v.memory_mb,
                                      r23.ha_wanted(v.ha_enabled, cfg),
                                      failover.vm_rank(v.type, v.priority)))
        added[st.name] = added.get(st.name, 0) + 1
    reasons = []
    for cluster in clusters:
        st = states.get(cluster)
        if st is None:
            continue
        plan = failover.compute(st)
        if plan.capacity < level:
            n = added.get(cluster, 0)
            who = f"the {n} VMs of this request" if n != 1 else "the VM of this request"
            reasons.append(r23.words(plan, name=who, level=level))
    return "; ".join(reasons)


# --- writing -------------------------------------------------------------------------


def _batch_size(model) -> int | None:
    """Rows per INSERT: PostgreSQL takes at most 65535 parameters per statement (Django
    splits for SQLite by itself)."""
    if connection.vendor == "postgresql":
        return max(1, 60_000 // len(model._meta.concrete_fields))
    return None


def insert(model, rows: list[dict], *, returning: str = "", sql: dict | None = None) -> list:
    """Insert ``rows`` (attname → database-ready value; the fields not given take the
    model's defaults) into ``model``'s table; with ``returning``, that column of each
    row, in order (the model must have a unique ``name``). PostgreSQL: one
    ``INSERT … SELECT FROM unnest(<one array per column>)`` however many rows —
    building 10,000 model instances and 200,000 query parameters costs more than the
    database's work. ``sql``: attname → an SQL
    expression for each row there (e.g. ``gen_random_uuid()``); elsewhere the model's
    default. Elsewhere: the ORM's bulk_create."""
    if not rows:
        return []
    sql = sql or {}
    if connection.vendor != "postgresql":
        objs = [model(**r) for r in rows]
        model.objects.bulk_create(objs, batch_size=_batch_size(model))
        return [getattr(o, returning) for o in objs] if returning else []
    fields = [f for f in model._meta.concrete_fields if not f.primary_key]
    template = model()
    given = rows[0].keys()
    const: dict = {}
    vary: dict = {}
    for f in fields:
        if f.attname in sql:
            continue
        if f.attname not in given:
            const[f] = f.get_db_prep_save(f.pre_save(template, True), connection)
            continue
        values = [r[f.attname] for r in rows]
        if any(isinstance(v, enum.Enum) for v in values):  # choices: their value
            values = [v.value if isinstance(v, enum.Enum) else v for v in values]
        first = values[0]
        if all(v == first for v in values):
            const[f] = first
        else:
            vary[f] = values
    qn = connection.ops.quote_name
    by_name = {f.attname: f for f in fields}
    cols = [*const, *vary, *(by_name[a] for a in sql)]
    exprs = [f"%s::{f.db_type(connection)}" for f in const]
    exprs += [f"u.c{i}" for i in range(len(vary))]
    exprs += list(sql.values())
    source = (f"unnest({', '.join(f'%s::{f.db_type(connection)}[]' for f in vary)}) "
              f"WITH ORDINALITY AS u({', '.join(f'c{i}' for i in range(len(vary)))}, o) "
              "ORDER BY u.o") if vary else "generate_series(1, %s) AS u(o)"
    statement = (f"INSERT INTO {qn(model._meta.db_table)} "
                 f"({', '.join(qn(f.column) for f in cols)}) "
                 f"SELECT {', '.join(exprs)} FROM {source}")
    params = [*const.values(), *(vary.values() if vary else [len(rows)])]
    with connection.cursor() as cur:
        if not returning:
            cur.execute(statement, params)
            return []
        # Matched by name (unique): RETURNING promises no order.
        key = model._meta.get_field("name")
        cur.execute(statement + f" RETURNING {qn(key.column)}, {qn(returning)}", params)
        got = dict(cur.fetchall())
    return [got[r["name"]] for r in rows]


def write(new: list[NewVm], *, now) -> list[int]:
    """The VMs and their events, in one transaction (two INSERTs on PostgreSQL);
    their ids, in order. Refused (409) when a name was taken or a host removed
    meanwhile."""
    rows = []
    for v in new:
        hid = v.host.pk
        row = dict(
            name=v.name, host_id=hid, last_host_id=hid,
            state=VmState.RUNNING, power_state=PowerState.POWER_ON, power_host_id=hid,
            power_state_update_time=now, power_state_update_count=1,
            ha_enabled=bool(v.ha_enabled), priority=v.priority, type=v.type, cpus=v.cpus,
            memory_mb=v.memory_mb, update_count=0, created=now, definition_format="",
            definition_xml="", definition_time=None, definition_host_id=None,
        )
        if v.definition:
            row.update(definition_format=v.definition[0], definition_xml=v.definition[1],
                       definition_time=now, definition_host_id=hid)
        if v.powered_off:
            # Adopted Stopped (last on that host): as if registered, then moved (one
            # state change more, hence update_count 1).
            row.update(state=VmState.STOPPED, host_id=None, power_state=v.powered_off,
                       update_count=1)
        rows.append(row)
    try:
        with transaction.atomic():
            ids = insert(VMInstance, rows, returning="id",
                         sql={"uuid": "gen_random_uuid()"})
            events = []
            for v, vm_id in zip(new, ids, strict=True):
                events.append(_event(vm_id, v, "Registered", "", VmState.RUNNING, now,
                                     v.message or f"VM {v.name} registered, Running on "
                                                  f"{v.host.name}"))
                if v.powered_off:
                    events.append(_event(vm_id, v, "Adopted", VmState.RUNNING,
                                         VmState.STOPPED, now,
                                         f"VM {v.name} adopted Stopped: it is powered off "
                                         f"on {v.host.name}"))
            insert(Event, events)
    except IntegrityError:
        raise Refused(409, "a VM of this request was registered, or its host removed, "
                           "meanwhile by someone else; nothing was written — try again") \
            from None
    return ids


def _event(vm_id: int, v: NewVm, name, old, new, now, message) -> dict:
    # What hadash.events.record_event writes for a VM's state change.
    return dict(time=now, subject=Subject.VM, subject_id=vm_id, subject_name=v.name[:255],
                event=name, field="state", old=old, new=new, reason="",
                message=message[:2000], alert=False, severity=Severity.INFO,
                acknowledged_at=None, acknowledged_by="", host_id=v.host.pk, vm_id=vm_id,
                incident_id=None)


# --- registration --------------------------------------------------------------------


def register(data, *, now, cfg=None) -> list[str]:
    """`POST /api/v1/vms/bulk` (see the module doc): the names registered, in order.
    Refused: nothing written."""
    from hadash import config
    from hadash.ha import actions

    items = read_list(data, limit=MAX_BULK)
    good, bad = validate_items(items, VMCreateSerializer, quick=quick_vm)
    bad.update(duplicates({i: d["name"] for i, d in good.items()}))
    taken = existing_names(d["name"] for d in good.values())
    hosts = hosts_named(d["host"] for d in good.values())
    for i, d in good.items():
        if i in bad:
            continue
        if d["name"] in taken:
            bad[i] = f"a VM named {d['name']!r} already exists"
        elif d["host"] not in hosts:
            bad[i] = f"unknown host {d['host']!r}"
    refuse_items(bad, items, what="registered")
    new = [NewVm(name=d["name"], host=hosts[d["host"]], cpus=d["cpus"],
                 memory_mb=d["memory_mb"], ha_enabled=d["ha_enabled"],
                 priority=d["priority"], type=d["type"])
           for _, d in sorted(good.items())]
    try:
        actions.admit(admission_refusal(new, cfg if cfg is not None else config.snapshot()))
    except actions.AdmissionRefused as exc:
        raise Refused(409, str(exc)) from None
    write(new, now=now)
    return [v.name for v in new]


# --- adoption ------------------------------------------------------------------------


def adopt(data, *, now, by: str = "", cfg=None) -> list[int]:
    """`POST /api/v1/unmanaged-vms/adopt`: each entry ``{"name", "host", "ha_enabled",
    "priority", "cpus"?, "memory_mb"?}`` is registered Running on the host that reports
    it (Stopped, last on that host, if it is powered off there), with the definition
    that host sent; its size comes from the definition when it says, else from the
    entry. All or none (see the module doc). The ids of the VMs, in order."""
    from hadash import config
    from hadash.ha import actions
    from vms import definitions, discovery
    from vms.models import UnmanagedVm

    items = read_list(data, limit=MAX_ADOPT)
    good, bad = validate_items(items, AdoptEntrySerializer)
    bad.update(duplicates({i: d["name"] for i, d in good.items()}))
    names = sorted({d["name"] for d in good.values()})
    reported: dict[tuple[str, str], dict] = {}
    for chunk in _chunks(names):
        for row in discovery.listed(now=now).filter(name__in=chunk).values(
                "name", "host_id", "host__name", "power_state", "definition_format",
                "definition_xml"):
            reported[(row["name"], row["host__name"])] = row
    hosts = hosts_named(host for _, host in reported)
    new: list[NewVm] = []
    for i, e in sorted(good.items()):
        if i in bad:
            continue
        row = reported.get((e["name"], e["host"]))
        if row is None:
            bad[i] = ("no such unmanaged VM (not reported by that host lately, or already "
                      "managed)")
            continue
        fmt, xml = row["definition_format"], row["definition_xml"]
        cpus, memory_mb = definitions.size_of(xml) if fmt else (None, None)
        cpus = cpus or e.get("cpus")
        memory_mb = memory_mb or e.get("memory_mb")
        if not cpus or not memory_mb:
            bad[i] = "give cpus and memory_mb (no definition says them)"
            continue
        ha = e.get("ha_enabled", False)
        new.append(NewVm(
            name=e["name"], host=hosts[e["host"]], cpus=cpus, memory_mb=memory_mb,
            ha_enabled=ha, priority=e.get("priority", "medium"),
            definition=(fmt, xml) if fmt else None,
            message=(f"VM {e['name']} adopted{' by ' + by if by else ''}, Running on "
                     f"{e['host']} (HA {'on' if ha else 'off'})"),
            powered_off="" if row["power_state"] == PowerState.POWER_ON
            else row["power_state"],
        ))
    refuse_items(bad, items, what="adopted")
    try:
        actions.admit(admission_refusal(new, cfg if cfg is not None else config.snapshot()))
    except actions.AdmissionRefused as exc:
        raise Refused(409, str(exc)) from None
    with transaction.atomic():
        ids = write(new, now=now)
        for chunk in _chunks([v.name for v in new]):
            UnmanagedVm.objects.filter(name__in=chunk).delete()
    return ids


# --- the view ------------------------------------------------------------------------

E400_BULK = OpenApiResponse(
    BulkErrorSerializer,
    description="Bad request; nothing was written. `errors` lists every bad item "
                "(index in `vms`, name, reason).")
E409_BULK = OpenApiResponse(
    ErrorSerializer,
    description="Refused by admission control (R23, `ha.admission` enforce) for the "
                "request as a whole, or a conflicting change meanwhile; nothing was written.")


class VMBulkView(ApiView):
    serializer_class = VMBulkCreateSerializer

    # A VM may be named "bulk": reading and changing it still work here.
    @extend_schema(exclude=True)
    def get(self, request):
        return VMDetailView().get(request, name="bulk")

    @extend_schema(exclude=True)
    def patch(self, request):
        view = VMDetailView()
        view.request, view.args, view.kwargs, view.format_kwarg = request, (), {}, None
        return view.patch(request, name="bulk")

    @extend_schema(
        summary="Register many VMs at once",
        description="`{\"vms\": [ ... ]}`: each item as for `POST /api/v1/vms` (name, host, "
        f"cpus, memory_mb, ha_enabled, priority, type), at most {MAX_BULK} per request. "
        "Each VM is registered Running (power PowerOn) on its host with a `Registered` "
        "event, all in one transaction. The list is validated as a whole: any bad item "
        "(a bad field, a name given twice or already in use, an unknown host) refuses "
        "the request with a 400 whose `errors` lists every bad item, and nothing is "
        "written. Under `ha.admission` enforce (R23) the request is judged as a whole: "
        "if its HA VMs, all placed, would push a cluster below `ha.failover.level`, it is "
        "refused (409 with the reason) and nothing is written. Admins only.",
        request=VMBulkCreateSerializer,
        responses={201: VMBulkResultSerializer, 400: E400_BULK, 401: E401, 403: E403,
                   409: E409_BULK},
    )
    def post(self, request):
        try:
            names = register(request.data, now=timezone.now())
        except Refused as exc:
            return exc.response()
        return Response({"count": len(names), "names": names},
                        status=status.HTTP_201_CREATED)
