"""Set-up inside a benchmark database (run as its own process with ``DATABASE_URL``
pointing at the benchmark database)::

    python -m bench.seed ping --hosts 1000 --vms-per-host 10 --out hosts.json
    python -m bench.seed history --events 300000 --incidents 2000 --ha-items 10000

``ping`` creates ``hosts`` Up hosts with agent tokens in 10 clusters, each with
``vms-per-host`` Running VMs (power state PowerOn, confirmed now; every other one
HA-enabled), and writes ``[{"id", "name", "token", "vm_ids", "vm_names"}, …]`` for the
load generator and the PostgreSQL ceiling. ``history`` adds what a fleet that has run
for a while has in its tables (issue 12: the dashboard and API measured at 10,000
hosts / 100,000 VMs with a realistic history): state-change events of every host and
VM and older events beside them, finished HA items, host and VM incidents with their
VMs, and resolved alerts.

Seeding is not what is measured: on PostgreSQL the bulk of the rows is made by the
database itself (``INSERT … SELECT`` over ``generate_series``; 100,000 VMs in a few
seconds), the columns not named taking the model's defaults; on SQLite (tiny test
sizes) the ORM's bulk_create does the same. Only the set-up goes around HTTP; what is
measured does not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


def _constants(model, obj, skip: set[str]) -> dict[str, object]:
    """Column → database value of ``obj`` (a model instance with defaults filled in)
    for every concrete column but ``skip`` and the primary key."""
    from django.db import connection

    out = {}
    for f in model._meta.concrete_fields:
        if f.primary_key or f.column in skip:
            continue
        out[f.column] = f.get_db_prep_save(f.pre_save(obj, True), connection)
    return out


def insert_select(model, template, varying: dict[str, str], source: str,
                  params: tuple = ()) -> int:
    """``INSERT INTO <model> (…) SELECT <template's values>, <varying SQL> FROM <source>``:
    one statement for many rows. ``varying``: column → SQL expression over ``source``;
    every other column takes ``template``'s value (its model defaults). ``params``: those
    of the varying expressions, then of ``source``, in the order written. Returns rows."""
    from django.db import connection

    const = _constants(model, template, set(varying))
    cols = list(const) + list(varying)
    qn = connection.ops.quote_name
    # '%' is the modulo operator here; '%s' the parameters (in the order written).
    exprs = ["%s"] * len(const) + [re.sub(r"%(?!s)", "%%", e) for e in varying.values()]
    sql = (f"INSERT INTO {qn(model._meta.db_table)} ({', '.join(qn(c) for c in cols)}) "
           f"SELECT {', '.join(exprs)} FROM {re.sub(r'%(?!s)', '%%', source)}")
    with connection.cursor() as cur:
        cur.execute(sql, (*const.values(), *params))
        return cur.rowcount


def _postgres() -> bool:
    from django.db import connection

    return connection.vendor == "postgresql"


def seed_ping(hosts: int, vms_per_host: int) -> list[dict]:
    import uuid

    from django.db import connection, transaction
    from django.utils import timezone

    from hosts.choices import HostStatus
    from hosts.models import Host
    from vms.choices import PowerState, VmState
    from vms.models import VMInstance

    now = timezone.now()
    width = max(4, len(str(hosts)))
    rows: list[Host] = []
    tokens: list[str] = []
    for i in range(hosts):
        h = Host(name=f"bench-{i + 1:0{width}d}", uuid=uuid.uuid4(), cluster=f"c{i % 10 + 1}",
                 status=HostStatus.UP, last_ping=now, cpus=64, memory_mb=262144,
                 private_ip_address=f"10.{1 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}",
                 agent_url="http://127.0.0.1:9/agent")
        token, _ = h.issue_credentials()
        rows.append(h)
        tokens.append(token)
    with transaction.atomic():
        created = Host.objects.bulk_create(rows, batch_size=1000)
        template = VMInstance(state=VmState.RUNNING, power_state=PowerState.POWER_ON,
                              power_state_update_time=now, power_state_update_count=1,
                              cpus=1, memory_mb=1024)
        if _postgres() and vms_per_host:
            insert_select(
                VMInstance, template,
                {"name": "h.name || '-vm' || lpad(j::text, 2, '0')",
                 "uuid": "gen_random_uuid()", "host_id": "h.id", "power_host": "h.id",
                 "ha_enabled": "j % 2 = 0"},
                f"{connection.ops.quote_name(Host._meta.db_table)} h "
                "CROSS JOIN generate_series(0, %s) j WHERE h.id = ANY(%s) ORDER BY h.id, j",
                (vms_per_host - 1, [h.pk for h in created]))
        else:
            vms: list[VMInstance] = []
            for h in created:
                for j in range(vms_per_host):
                    vms.append(VMInstance(
                        name=f"{h.name}-vm{j:02d}", state=VmState.RUNNING,
                        power_state=PowerState.POWER_ON, power_host=h, host=h,
                        power_state_update_time=now, power_state_update_count=1,
                        ha_enabled=j % 2 == 0, cpus=1, memory_mb=1024,
                    ))
            VMInstance.objects.bulk_create(vms, batch_size=2000)
    per_host: dict[int, list[tuple[int, str]]] = {}
    for vid, hid, name in (VMInstance.objects.filter(host__in=[h.pk for h in created])
                           .order_by("id").values_list("id", "host_id", "name").iterator()):
        per_host.setdefault(hid, []).append((vid, name))
    out: list[dict] = []
    for h, token in zip(created, tokens, strict=True):
        mine = per_host.get(h.pk, [])
        out.append({"id": h.pk, "name": h.name, "token": token,
                    "vm_ids": [v for v, _ in mine], "vm_names": [n for _, n in mine]})
    return out


def seed_history(*, events: int, incidents: int, ha_items: int, alerts: int) -> dict:
    """A fleet's history beside the seeded hosts and VMs (PostgreSQL: set-based).

    - events: every host's Connecting → Up and every VM's Starting → Running (the
      state-change events the HA status reads), then older events up to ``events``;
    - ``ha_items`` finished HA items (Done) of HA VMs, older than a day;
    - ``incidents`` incidents over the last 30 days, half host, half VM (resolved;
      the newest 10 open), host ones with 5 incident VMs each;
    - ``alerts`` resolved alerts.
    """
    import datetime as dt

    from django.db import connection, transaction
    from django.utils import timezone

    from hadash.models import Alert, Event, HaWork, Incident, IncidentVm
    from hosts.models import Host
    from vms.models import VMInstance

    now = timezone.now()
    made = {}
    if not _postgres():  # tiny test sizes on SQLite: a token history through the ORM
        with transaction.atomic():
            Event.objects.bulk_create(
                Event(time=now, subject="host", subject_id=h.pk, subject_name=h.name,
                      event="HostStatus", field="status", old="Connecting", new="Up",
                      message=f"{h.name} Up") for h in Host.objects.all()[:events])
        return {"events": Event.objects.count()}
    qn = connection.ops.quote_name
    host_t, vm_t = qn(Host._meta.db_table), qn(VMInstance._meta.db_table)
    day = dt.timedelta(days=1)
    with transaction.atomic():
        made["events"] = insert_select(
            Event, Event(time=now, subject="host"),
            {"time": "%s - (h.id % 86400) * interval '1 second'", "subject": "'host'",
             "subject_id": "h.id", "subject_name": "h.name", "event": "'HostStatus'",
             "field": "'status'", "old": "'Connecting'", "new": "'Up'",
             "message": "h.name || ' is Up'", "host_id": "h.id"},
            f"{host_t} h ORDER BY h.id", (now - day,))
        made["events"] += insert_select(
            Event, Event(time=now, subject="vm"),
            {"time": "%s - (v.id % 86400) * interval '1 second'", "subject": "'vm'",
             "subject_id": "v.id", "subject_name": "v.name", "event": "'VmState'",
             "field": "'state'", "old": "'Starting'", "new": "'Running'",
             "message": "v.name || ' is Running'", "host_id": "v.host_id", "vm_id": "v.id"},
            f"{vm_t} v ORDER BY v.id", (now - day,))
        older = max(0, events - made["events"])
        if older:  # older pings timeouts, power reports, HA steps: noise of 30 days
            made["events"] += insert_select(
                Event, Event(time=now, subject="host"),
                {"time": "%s - (i * 2592000::bigint / %s) * interval '1 second'",
                 "subject": "'host'", "subject_id": "h.id", "subject_name": "h.name",
                 "event": "(ARRAY['PingTimeout','HostPowerReport','AgentConnected'])"
                          "[1 + i % 3]",
                 "message": "'history event ' || i || ' on ' || h.name", "host_id": "h.id"},
                f"generate_series(1, %s) i JOIN {host_t} h ON h.id = "
                f"(SELECT min(id) FROM {host_t}) + i % (SELECT count(*) FROM {host_t})"
                " ORDER BY i DESC",
                (now - 2 * day, older, older))
        if ha_items:
            made["ha_items"] = insert_select(
                HaWork, HaWork(time_to_try=now, created=now, updated=now, update_count=1),
                {"instance_id": "v.id", "vm_type": "v.type", "type": "'HA'",
                 "reason": "'HostDown'", "step": "'Done'", "state": "'Done'",
                 "host_id": "v.host_id", "target_host_id": "v.host_id",
                 "time_to_try": "%s", "created": "%s", "updated": "%s"},
                f"(SELECT * FROM {vm_t} WHERE ha_enabled ORDER BY id LIMIT %s) v",
                (now - 2 * day, now - 2 * day, now - 2 * day, ha_items))
        if incidents:
            made["incidents"] = insert_select(
                Incident, Incident(detected_at=now, updated=now),
                {"kind": "CASE WHEN i % 2 = 0 THEN 'host' ELSE 'vm' END",
                 "state": "CASE WHEN i <= %s - 10 THEN 'Resolved' ELSE 'Open' END",
                 "host_name": "'bench-' || i", "title": "'bench incident ' || i",
                 "cluster": "'c' || (1 + i % 10)",
                 "started_at": "%s - ((%s - i) * 2592000::bigint / %s) * interval '1 second'",
                 "detected_at": "%s - ((%s - i) * 2592000::bigint / %s - 20 - i % 20) "
                                "* interval '1 second'",
                 "declared_at": "CASE WHEN i % 2 = 0 THEN %s - ((%s - i) * "
                                "2592000::bigint / %s - 40) * interval '1 second' END",
                 "fenced_at": "CASE WHEN i % 2 = 0 THEN %s - ((%s - i) * "
                              "2592000::bigint / %s - 45 - i % 10) * interval '1 second' END",
                 "resolved_at": "CASE WHEN i <= %s - 10 THEN %s - ((%s - i) * 2592000::bigint / %s "
                                "- 90) * interval '1 second' END"},
                "generate_series(1, %s) i ORDER BY i",
                (incidents, now, incidents, incidents, now, incidents, incidents,
                 now, incidents, incidents, now, incidents, incidents, incidents, now,
                 incidents, incidents, incidents))
            inc_t = qn(Incident._meta.db_table)
            made["incident_vms"] = insert_select(
                IncidentVm, IncidentVm(),
                {"incident_id": "n.id", "vm_name": "'vm-' || n.id || '-' || j",
                 "ha": "true", "outcome": "'restarted'", "down_since": "n.started_at",
                 "running_at": "n.started_at + (30 + (n.id * 7 + j * 13) % 210) "
                               "* interval '1 second'"},
                f"{inc_t} n CROSS JOIN generate_series(0, 4) j "
                "WHERE j = 0 OR n.kind = 'host' ORDER BY n.id, j")
        if alerts:
            made["alerts"] = insert_select(
                Alert, Alert(opened_at=now, updated_at=now),
                {"kind": "'host-down'", "subject": "'host'",
                 "subject_name": "'bench-' || i", "key": "'bench-alert-' || i",
                 "severity": "'critical'", "state": "'resolved'",
                 "title": "'bench alert ' || i",
                 "opened_at": "%s - (i * 3600) * interval '1 second'",
                 "updated_at": "%s - (i * 3600 - 60) * interval '1 second'",
                 "resolved_at": "%s - (i * 3600 - 60) * interval '1 second'"},
                "generate_series(1, %s) i", (now, now, now, alerts))
    with connection.cursor() as cur:
        cur.execute("ANALYZE")
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seed")
    parser.add_argument("what", choices=["ping", "history"])
    parser.add_argument("--hosts", type=int)
    parser.add_argument("--vms-per-host", type=int, default=10)
    parser.add_argument("--out")
    parser.add_argument("--events", type=int, default=0,
                        help="history: events in all (at least one per host and VM)")
    parser.add_argument("--incidents", type=int, default=0)
    parser.add_argument("--ha-items", type=int, default=0, help="history: finished HA items")
    parser.add_argument("--alerts", type=int, default=0, help="history: resolved alerts")
    args = parser.parse_args(argv)
    if args.what == "ping" and (args.hosts is None or not args.out):
        parser.error("ping needs --hosts and --out")

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hadash.settings")
    import django

    django.setup()
    t0 = time.monotonic()
    if args.what == "history":
        made = seed_history(events=args.events, incidents=args.incidents,
                            ha_items=args.ha_items, alerts=args.alerts)
        print(f"seeded history {json.dumps(made)} in {time.monotonic() - t0:.1f} s")
        return 0
    data = seed_ping(args.hosts, args.vms_per_host)
    with open(args.out, "w") as f:
        json.dump(data, f)
    print(f"seeded {len(data)} hosts, {sum(len(d['vm_ids']) for d in data)} VMs in "
          f"{time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
