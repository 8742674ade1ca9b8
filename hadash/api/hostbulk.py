"""Many hosts' operator-set fields in one request (issue 12: ten times the fleet).

`POST /api/v1/hosts/bulk` with ``{"hosts": [{"name": "kvm-01", "oobm_enabled": true,
"oobm_address": ..., ...}, ...]}``: each item is what ``PATCH /api/v1/hosts/{name}``
takes for that host (tags and the BMC settings, hadash.api.serializers.HOST_SETTINGS),
plus its name. As `POST /api/v1/vms/bulk` (hadash.api.bulk, whose list reading and
error answer this shares):

* the list is validated as a whole — each item's fields by the single PATCH's own
  serializer (HostSettingsSerializer, with that host as its instance), the name known
  and given once — and every bad item is named in one 400 answer
  ``{"error": ..., "errors": [{"index", "name", "error"}, ...]}``; nothing is written;
* each host whose settings change gets the `SettingsChanged` event the single PATCH
  writes (hadash.api.serializers.settings_change, the same message; a secret's value is
  never in it), in the one transaction that writes the changes (SPEC §1, §6: every state
  change committed with its event);
* the number of queries does not grow with the list on PostgreSQL: one SELECT of the
  hosts (an array parameter), one ``UPDATE … FROM unnest(…)`` that writes, per host,
  only the columns that change for it (as the single PATCH writes only those), one
  INSERT of the events (hadash.api.bulk.insert). On SQLite: the ORM's bulk_update per
  set of changed columns, batched by Django.

POST, not PATCH: as with `vms/bulk`, GET and PATCH on ``/api/v1/hosts/bulk`` still read
and change a host that is literally named "bulk".
"""

from __future__ import annotations

from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions
from rest_framework.response import Response

from hadash.choices import Subject
from hadash.config import text_problem
from hadash.events import event_values
from hadash.models import Event
from hosts.models import Host

from .bulk import Refused, _named, duplicates, insert, read_list, refuse_items
from .serializers import (
    HOST_SETTINGS,
    MAX_HOST_BULK,
    BulkErrorSerializer,
    HostBulkResultSerializer,
    HostBulkSettingsSerializer,
    HostSettingsSerializer,
    settings_change,
)
from .views import E401, E403, ApiView, HostDetailView, _flatten

KEY, NOUN = "hosts", "host"


def hosts_named(names: list[str]) -> dict[str, Host]:
    """The hosts of these names, with their settings (one query on PostgreSQL)."""
    names = sorted({n for n in names if not text_problem(n)})  # others cannot be stored
    return {h.name: h for h in _named(Host.objects.only("id", "name", *HOST_SETTINGS), names)}


def check(items: list) -> tuple[list[tuple[Host, dict]], dict[int, str]]:
    """Each item's host and its validated fields, in order; the bad items' errors."""
    names: dict[int, str] = {}
    bad: dict[int, str] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            bad[i] = f"each item must be an object (a dictionary), not {type(item).__name__}"
        elif "name" not in item:
            bad[i] = "give the host's name"
        elif not isinstance(item["name"], str):
            bad[i] = f"name must be a string, not {type(item['name']).__name__}"
        else:
            names[i] = item["name"]
    bad.update(duplicates(names))
    hosts = hosts_named(list(names.values()))
    # One serializer for every item, given each host as its instance in turn — what
    # DRF's ListSerializer does with its child; the single PATCH's validation exactly.
    child = HostSettingsSerializer(partial=True)
    good: list[tuple[Host, dict]] = []
    for i, name in names.items():
        if i in bad:
            continue
        host = hosts.get(name)
        if host is None:
            bad[i] = f"no host named {name!r}"
            continue
        fields = {k: v for k, v in items[i].items() if k != "name"}
        child.instance, child.initial_data = host, fields
        try:
            good.append((host, child.run_validation(fields)))
        except exceptions.ValidationError as exc:
            bad[i] = "; ".join(_flatten(exc.detail)) or "invalid"
    return good, bad


def change(data, *, by: str = "", now) -> tuple[int, list[str]]:
    """`POST /api/v1/hosts/bulk` (see the module doc): (how many hosts the request
    named, the names of those that changed, in order). Refused: nothing written."""
    items = read_list(data, limit=MAX_HOST_BULK, key=KEY, noun=NOUN)
    good, bad = check(items)
    refuse_items(bad, items, what="changed", key=KEY, noun=NOUN)
    changes: list[tuple[Host, dict]] = []
    events: list[dict] = []
    for host, validated in good:
        changed, event = settings_change(host, validated, by=by)
        if changed:
            changes.append((host, changed))
            events.append(_row(event_values(Subject.HOST, host, now=now, **event)))
    try:
        with transaction.atomic():
            written = update(changes)
            if written != len(changes):
                raise Refused(409, f"{len(changes) - written} hosts of this request were "
                                   "removed meanwhile; nothing was written — try again")
            insert(Event, events)
    except IntegrityError:
        raise Refused(409, "a host of this request was removed meanwhile; nothing was "
                           "written — try again") from None
    for host, changed in changes:
        for f, v in changed.items():
            setattr(host, f, v)
    return len(items), [host.name for host, _ in changes]


def _row(values: dict) -> dict:
    """Event fields (relations as objects) as insert's rows take them (attnames)."""
    row = {}
    for key, value in values.items():
        if key in ("host", "vm", "incident"):
            row[f"{key}_id"] = value.pk if value is not None else None
        else:
            row[key] = value
    return row


def update(changes: list[tuple[Host, dict]]) -> int:
    """Write each host's changed fields, only those (a concurrent change of another
    column is never overwritten); how many hosts were found to write."""
    if not changes:
        return 0
    if connection.vendor == "postgresql":
        return _update_unnest(changes)
    written = 0
    groups: dict[tuple[str, ...], list[Host]] = {}
    for host, changed in changes:
        copy = Host(pk=host.pk, **changed)
        groups.setdefault(tuple(sorted(changed)), []).append(copy)
    for fields, objs in groups.items():
        written += Host.objects.bulk_update(objs, list(fields))
    return written


def _update_unnest(changes: list[tuple[Host, dict]]) -> int:
    """One ``UPDATE host SET col = CASE WHEN u.set_col THEN u.col ELSE host.col END …
    FROM unnest(<one array per column>) u WHERE host.id = u.id``: a column no host
    changes is not named, one every host changes needs no CASE."""
    qn = connection.ops.quote_name
    table = qn(Host._meta.db_table)
    pk = Host._meta.pk
    columns = [f for f in HOST_SETTINGS if any(f in c for _, c in changes)]
    arrays: list[list] = [[h.pk for h, _ in changes]]
    types = [f"{pk.rel_db_type(connection)}[]"]
    aliases = ["id"]
    sets = []
    for n, name in enumerate(columns):
        field = Host._meta.get_field(name)
        values = [field.get_db_prep_save(c[name], connection) if name in c else None
                  for _, c in changes]
        column = qn(field.column)
        arrays.append(values)
        types.append(f"{field.db_type(connection)}[]")
        aliases.append(f"c{n}")
        if all(name in c for _, c in changes):
            sets.append(f"{column} = u.c{n}")
            continue
        arrays.append([name in c for _, c in changes])
        types.append("boolean[]")
        aliases.append(f"s{n}")
        sets.append(f"{column} = CASE WHEN u.s{n} THEN u.c{n} ELSE {table}.{column} END")
    statement = (f"UPDATE {table} SET {', '.join(sets)} "
                 f"FROM unnest({', '.join(f'%s::{t}' for t in types)}) "
                 f"AS u({', '.join(aliases)}) WHERE {table}.{qn(pk.column)} = u.id")
    with connection.cursor() as cur:
        cur.execute(statement, arrays)
        return cur.rowcount


# --- the view ------------------------------------------------------------------------

E400_HOSTS = OpenApiResponse(
    BulkErrorSerializer,
    description="Bad request; nothing was written. `errors` lists every bad item "
                "(index in `hosts`, name, reason).")
E409_HOSTS = OpenApiResponse(
    BulkErrorSerializer,
    description="A host of the request was removed meanwhile; nothing was written.")


class HostBulkView(ApiView):
    serializer_class = HostBulkSettingsSerializer

    # A host may be named "bulk": reading and changing it still work here.
    @extend_schema(exclude=True)
    def get(self, request):
        return HostDetailView().get(request, name="bulk")

    @extend_schema(exclude=True)
    def patch(self, request):
        view = HostDetailView()
        view.request, view.args, view.kwargs, view.format_kwarg = request, (), {}, None
        return view.patch(request, name="bulk")

    @extend_schema(
        summary="Change many hosts' operator-set fields at once",
        description="`{\"hosts\": [{\"name\": \"kvm-01\", \"oobm_enabled\": true, ...}, "
        "...]}`: each item names a host and gives the fields `PATCH /api/v1/hosts/{name}` "
        f"takes ({', '.join(HOST_SETTINGS)}), validated as there; at most "
        f"{MAX_HOST_BULK} hosts and 16 MiB per request. Each host whose settings change "
        "gets the `SettingsChanged` event the single PATCH writes (the BMC password "
        "never in it), all in one transaction. The list is validated as a whole: any "
        "bad item (a bad field, an unknown host, a host named twice) refuses the request "
        "with a 400 whose `errors` lists every bad item, and nothing is written. "
        "GET and PATCH on this path read and change a host named \"bulk\". Admins only.",
        request=HostBulkSettingsSerializer,
        responses={200: HostBulkResultSerializer, 400: E400_HOSTS, 401: E401, 403: E403,
                   409: E409_HOSTS},
    )
    def post(self, request):
        try:
            count, changed = change(request.data, by=self.by(), now=timezone.now())
        except Refused as exc:
            return exc.response()
        return Response({"count": count, "changed": changed})
