"""Batched ping ingestion (hosts.agent.ingest): a batch of steady pings is a couple of
UPDATEs, and any ping that may change state takes the full path (R1, R8, R9) — so a
batch ends in exactly the state one-by-one pings would have left."""

import datetime as dt

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.testing import world
from hadash.models import Alert, Event, HaWork
from hosts.agent import ingest
from hosts.models import Host
from vms.models import VMInstance

pytestmark = pytest.mark.django_db


def fleet_world(n_hosts=20, vms_per_host=10):
    hosts = {f"h{i:02}": {"cpus": 64} for i in range(n_hosts)}
    vms = {f"h{i:02}-vm{j}": {"host": f"h{i:02}", "ha": j % 2 == 0}
           for i in range(n_hosts) for j in range(vms_per_host)}
    return world({"hosts": hosts, "vms": vms})


def tokens():
    # The scenario world connected the hosts in process; give each the token an
    # agent would hold.
    out = {}
    for h in Host.objects.all():
        tok, _ = h.issue_credentials()
        h.save(update_fields=["token_hash", "server_token"])
        out[h.name] = tok
    return out


@pytest.mark.django_db(transaction=True)  # autocommit, as in the batcher's thread
def test_steady_batch_is_a_few_statements_and_refreshes_every_host():
    w = fleet_world()
    toks = tokens()
    before = timezone.now() - dt.timedelta(seconds=1)
    Host.objects.update(last_ping=before)
    items = [(toks[h.name], h.report()) for h in w.fleet.hosts.values()]
    events = Event.objects.count()
    with CaptureQueriesContext(connection) as q:
        results = ingest.apply_batch(items)
    assert results == [10] * 20
    # Not ~8 per ping; one of them counts the batch's pings (R21 pings_ingested).
    assert len(q.captured_queries) <= 9
    assert not Host.objects.filter(last_ping=before).exists()
    assert Event.objects.count() == events  # nothing changed state
    assert all(v.power_state_update_time > before for v in VMInstance.objects.all())


def test_mixed_batch_takes_the_full_path_where_state_changes():
    """R9 via a batch: a crashed HA VM gets its HA item and event; a revoked token is
    refused; the steady pings around them are applied."""
    w = fleet_world(n_hosts=3, vms_per_host=2)
    toks = tokens()
    w.fleet.vm_crash("h01-vm0")
    items = [(toks[h.name], h.report()) for h in w.fleet.hosts.values()]
    items.append(("not-a-token", []))
    results = ingest.apply_batch(items)
    assert results[:3] == [10, 10, 10]
    assert isinstance(results[3], ingest.TokenRevoked)
    vm = VMInstance.objects.get(name="h01-vm0")
    assert vm.power_state == "PowerOff"
    assert HaWork.objects.filter(instance=vm, reason="VmPowerOff").count() == 1
    assert Event.objects.filter(vm=vm, event="PowerStateChanged").exists()


def test_missing_vm_goes_the_full_path():
    """R8 via a batch: a VM left out of its host's report is judged, not confirmed."""
    w = fleet_world(n_hosts=2, vms_per_host=2)
    toks = tokens()
    w.fleet.vm_vanish("h00-vm1")
    VMInstance.objects.update(power_state_update_time=timezone.now() - dt.timedelta(minutes=5))
    ingest.apply_batch([(toks[h.name], h.report()) for h in w.fleet.hosts.values()])
    assert VMInstance.objects.get(name="h00-vm1").power_state == "PowerReportMissing"
    assert VMInstance.objects.get(name="h00-vm0").power_state == "PowerOn"


def test_a_host_coming_back_from_alert_is_brought_up_by_a_batched_ping():
    """R6 via a batch: a ping from an Alert host brings it Up, with its event."""
    w = fleet_world(n_hosts=2, vms_per_host=1)
    toks = tokens()
    Host.objects.filter(name="h00").update(status="Alert")
    ingest.apply_batch([(toks["h00"], w.fleet.host("h00").report())])
    assert Host.objects.get(name="h00").status == "Up"
    assert Event.objects.filter(host__name="h00", event="Ping", new="Up").exists()


# --- arrival times (R1, R2; docs/benchmarks.md P5) ---------------------------------

# The steady path in SQL with array parameters (PostgreSQL, P1) and through the ORM
# (SQLite, and PostgreSQL when asked): every test below runs both where it can.
PATHS = [pytest.param(True, marks=pytest.mark.postgres_only, id="pg-arrays"),
         pytest.param(False, id="orm")]


def ago(seconds: float) -> dt.datetime:
    return timezone.now() - dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("arrays", PATHS)
def test_each_ping_is_stamped_with_its_own_arrival_time(arrays):
    """R1/R2: last_ping and power_state_update_time are the time each ping came in,
    host by host, not the time its batch was applied."""
    w = fleet_world(n_hosts=3, vms_per_host=2)
    toks = tokens()
    Host.objects.update(last_ping=ago(600))
    VMInstance.objects.update(power_state_update_time=ago(600), power_state_update_count=1)
    arrival = {"h00": ago(30), "h01": ago(20), "h02": ago(20)}  # two share a time
    items = [(toks[n], w.fleet.host(n).report(), arrival[n]) for n in sorted(arrival)]
    assert ingest.apply_batch(items, arrays=arrays) == [10, 10, 10]
    for name, at in arrival.items():
        assert Host.objects.get(name=name).last_ping == at
        assert set(VMInstance.objects.filter(host__name=name).values_list(
            "power_state_update_time", "power_state_update_count")) == {(at, 2)}


@pytest.mark.parametrize("arrays", PATHS)
def test_last_ping_never_moves_backwards(arrays):
    """R2: a ping that arrived before the host's last_ping (set meanwhile by a later
    ping or a successful health check, hosts.liveness.check_host) leaves it where it
    is, on the steady path and on the full path (an Alert host still comes back Up,
    R6). Nor does the power_state_update_time of a VM confirmed by a steady ping (on
    the full path vms.powersync stamps it)."""
    w = fleet_world(n_hosts=2, vms_per_host=2)
    toks = tokens()
    later, earlier = ago(5), ago(15)
    Host.objects.update(last_ping=later)
    VMInstance.objects.update(power_state_update_time=later)
    Host.objects.filter(name="h01").update(status="Alert")
    items = [(toks[n], w.fleet.host(n).report(), earlier) for n in ("h00", "h01")]
    assert ingest.apply_batch(items, arrays=arrays) == [10, 10]
    assert set(Host.objects.values_list("name", "last_ping", "status")) == {
        ("h00", later, "Up"), ("h01", later, "Up")}
    assert set(VMInstance.objects.filter(host__name="h00").values_list(
        "power_state_update_time", flat=True)) == {later}
    # A NULL last_ping (never pinged) takes the arrival time.
    Host.objects.filter(name="h00").update(last_ping=None)
    ingest.apply_batch(items[:1], arrays=arrays)
    assert Host.objects.get(name="h00").last_ping == earlier


@pytest.mark.postgres_only
def test_array_path_writes_what_the_orm_path_writes():
    """P1: on PostgreSQL the array-parameter statements and the ORM path leave the same
    rows, events and HA work, from the same starting point, for a mixed batch: steady
    pings, a crashed HA VM (R9), a VM missing from its report (R8), an Alert host
    coming back (R6), a revoked token and a second ping of one host in the batch."""
    from django.db import transaction

    w = fleet_world(n_hosts=6, vms_per_host=3)
    toks = tokens()
    Host.objects.update(last_ping=ago(600))
    VMInstance.objects.update(power_state_update_time=ago(600))
    w.fleet.vm_crash("h01-vm0")
    w.fleet.vm_vanish("h02-vm1")
    Host.objects.filter(name="h03").update(status="Alert")
    arrival = {n: ago(30 - i) for i, n in enumerate(sorted(w.fleet.hosts))}
    items = [(toks[n], w.fleet.host(n).report(), at) for n, at in arrival.items()]
    arrival["h00"] = ago(5)  # its second ping, later in the same batch, takes the full path
    items += [("not-a-token", [], ago(10)), (toks["h00"], w.fleet.host("h00").report(),
                                              arrival["h00"])]

    def run(arrays):
        with transaction.atomic():
            results = ingest.apply_batch(items, arrays=arrays)
            state = (
                list(Host.objects.order_by("pk").values("name", "status", "last_ping")),
                list(VMInstance.objects.order_by("pk").values(
                    "pk", "state", "power_state", "power_host_id", "power_state_update_time",
                    "power_state_update_count")),
                sorted(Event.objects.values_list("time", "event", "subject_name", "old", "new")),
                sorted(HaWork.objects.values_list("instance__name", "reason")),
            )
            transaction.set_rollback(True)
        return [type(r).__name__ if isinstance(r, Exception) else r for r in results], state

    arrays_run, orm_run = run(True), run(False)
    assert arrays_run == orm_run
    results, (hosts, vms, events, work) = arrays_run
    assert results == [10] * 6 + ["TokenRevoked", 10]
    assert ("h01-vm0", "VmPowerOff") in work
    assert any(e[1] == "Ping" and e[2] == "h03" and e[4] == "Up" for e in events)
    assert next(v for v in vms if v["power_state"] == "PowerReportMissing")
    assert {h["name"]: h["last_ping"] for h in hosts} == arrival



@pytest.mark.postgres_only
def test_host_summary_path_decides_as_the_vm_by_vm_check():
    """Issue 12: on PostgreSQL a report equal to its host's summary (_read_pg) is
    confirmed without its VM rows; every other report is checked VM by VM. Each case
    below leaves the same rows and events as the ORM path (R8: unknown names ignored,
    a VM the host should report and does not is judged; a VM inconsistent with the
    report goes through service.ping), and the plain reports take the summary."""
    from django.db import transaction

    fleet_world(n_hosts=8, vms_per_host=3)
    toks = tokens()
    Host.objects.update(last_ping=ago(600))
    VMInstance.objects.update(power_state_update_time=ago(600))
    # h01: a Stopped VM it reports PowerOff (consistent, outside R8's states);
    # h02: the same VM left out of its report (nothing to judge: steady);
    for name in ("h01-vm2", "h02-vm2"):
        VMInstance.objects.filter(name=name).update(state="Stopped", power_state="PowerOff")
    # h03: a Running VM whose power host is another host (inconsistent);
    VMInstance.objects.filter(name="h03-vm1").update(
        power_host=Host.objects.get(name="h04"))
    # h05: a Running VM whose report went missing, reported PowerOn again.
    VMInstance.objects.filter(name="h05-vm0").update(power_state="PowerReportMissing")

    def report(host, drop=(), off=(), extra=()):
        out = [(f"{host}-vm{j}", "PowerOff" if f"{host}-vm{j}" in off else "PowerOn")
               for j in range(3) if f"{host}-vm{j}" not in drop]
        return list(reversed(out + [(n, "PowerOn") for n in extra]))  # any order

    reports = {
        "h00": report("h00"),
        "h01": report("h01", off={"h01-vm2"}),
        "h02": report("h02", drop={"h02-vm2"}),
        "h03": report("h03"),
        "h04": report("h04"),
        "h05": report("h05"),
        "h06": report("h06", extra=["not-managed-here"]),  # R8: ignored
        "h07": report("h07", drop={"h07-vm0"}),  # a Running VM missing: judged (R8)
    }
    items = [(toks[n], r, ago(20 - i)) for i, (n, r) in enumerate(reports.items())]

    def run(arrays):
        steady = ingest.STATS.steady
        with transaction.atomic():
            results = ingest.apply_batch(items, arrays=arrays)
            state = (
                list(Host.objects.order_by("pk").values("name", "status", "last_ping")),
                list(VMInstance.objects.order_by("pk").values(
                    "pk", "state", "power_state", "power_host_id", "power_state_update_time",
                    "power_state_update_count")),
                sorted(Event.objects.values_list("time", "event", "subject_name", "old", "new")),
                sorted(HaWork.objects.values_list("instance__name", "reason")),
            )
            transaction.set_rollback(True)
        return results, state, ingest.STATS.steady - steady

    with CaptureQueriesContext(connection) as q:
        summary_run = run(True)
    assert summary_run == run(False)
    results, (hosts, vms, events, work), steady = summary_run
    assert results == [10] * 8
    # h00, h01, h04 by their summary, h02 and h06 by their rows; h03, h05 and h07
    # go through service.ping.
    assert steady == 5
    assert next(v for v in vms if v["power_state"] == "PowerReportMissing")
    assert any("vm_unmanaged" in x["sql"] for x in q.captured_queries)  # discovery saw h06

    # A batch of plain reports reads no VM rows: one read, one write.
    plain = [(toks[n], reports[n]) for n in ("h00", "h01", "h04")]
    with CaptureQueriesContext(connection) as q:
        assert ingest.apply_batch(plain) == [10] * 3
    assert not any('FROM "vm_instance" WHERE' in x["sql"] for x in q.captured_queries)

# --- the batcher: coalescing and backlog (P5) ---------------------------------------


class Gate:
    """A stand-in for the database work: records each batch; the first one waits
    until ``open()``, so pings queue up behind it."""

    def __init__(self, result=10):
        import asyncio

        self.batches: list[list[tuple]] = []
        self.events: list[str] = []  # backlog events, when record=gate.record
        self.result = result
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def record(self, event, message, *, now):
        self.events.append(event)

    async def apply(self, items):
        self.batches.append(items)
        self.started.set()
        if len(self.batches) == 1:
            await self.gate.wait()
        return [self.result] * len(items)


def test_queued_pings_of_one_host_coalesce_and_all_get_the_answer():
    """P5: while a batch is applied, a second and third ping of the same host replace
    the queued report (only the newest, with its own arrival time, is applied); every
    ping waiting on it gets the same answer. A backlog so holds one report per host."""
    from asgiref.sync import async_to_sync

    async def run():
        import asyncio

        gate = Gate(result=7)
        # One batch at a time: tok-b waits behind tok-a's batch too.
        b = ingest.Batcher(apply=gate.apply, record=gate.record, depth=1)
        t0, t1, t2, t3 = ago(4), ago(3), ago(2), ago(1)
        first = asyncio.ensure_future(b.submit("tok-a", [("vm", "PowerOn")], t0))
        await gate.started.wait()  # the first batch is being applied
        waiting = [asyncio.ensure_future(b.submit(tok, vms, at)) for tok, vms, at in [
            ("tok-a", [("vm", "PowerOff")], t1),
            ("tok-b", [], t2),
            ("tok-a", [("vm", "PowerOn"), ("vm2", "PowerOn")], t3),
        ]]
        await asyncio.sleep(0)
        coalesced = ingest.STATS.coalesced
        queued = b.stats()["queued"]
        gate.gate.set()
        answers = await asyncio.gather(first, *waiting)
        b.task.cancel()
        return gate.batches, answers, queued, coalesced, (t0, t1, t2, t3)

    before = ingest.STATS.coalesced
    batches, answers, queued, coalesced, (t0, t1, t2, t3) = async_to_sync(run)()
    assert answers == [7, 7, 7, 7]
    assert queued == 2  # tok-a once, tok-b
    assert coalesced - before == 1
    assert batches == [
        [("tok-a", [("vm", "PowerOn")], t0)],
        [("tok-a", [("vm", "PowerOn"), ("vm2", "PowerOn")], t3), ("tok-b", [], t2)],
    ]


def test_coalesced_pings_are_answered_by_the_applied_report_over_the_database():
    """P5 with the real database work: two queued pings of one host → one report
    applied (the newer, with its arrival time in last_ping), both answered with the
    pong's interval; a revoked token answers every ping waiting on it."""
    from asgiref.sync import async_to_sync, sync_to_async

    w = fleet_world(n_hosts=2, vms_per_host=1)
    toks = tokens()
    Host.objects.update(last_ping=ago(600))
    report = w.fleet.host("h00").report()

    async def run():
        import asyncio

        gate = Gate()
        applied = []

        async def apply(items):
            applied.append(items)
            if len(applied) == 1:
                await gate.gate.wait()
            return await sync_to_async(ingest.apply_batch)(items)

        b = ingest.Batcher(apply=apply, record=gate.record, depth=1)
        t0, t1, t2 = ago(3), ago(2), ago(1)
        first = asyncio.ensure_future(b.submit(toks["h01"], [], t0))
        while not applied:
            await asyncio.sleep(0.001)
        pings = [asyncio.ensure_future(b.submit(tok, report, at))
                 for tok, at in [(toks["h00"], t1), (toks["h00"], t2),
                                 ("revoked", t1), ("revoked", t2)]]
        await asyncio.sleep(0)
        gate.gate.set()
        out = await asyncio.gather(first, *pings, return_exceptions=True)
        b.task.cancel()
        return applied, out, t2

    applied, out, t2 = async_to_sync(run)()
    assert [len(batch) for batch in applied] == [1, 2]  # h00 once, "revoked" once
    assert out[:3] == [10, 10, 10]
    assert all(isinstance(o, ingest.TokenRevoked) for o in out[3:])
    assert Host.objects.get(name="h00").last_ping == t2


def test_two_batches_in_flight_never_hold_one_host_twice():
    """Issue 12: while a batch waits for the database, the next one is gathered and
    applied (DEPTH workers); a host whose report is in flight waits for that batch,
    its newer pings coalescing meanwhile, so its reports are applied in order."""
    import asyncio

    from asgiref.sync import async_to_sync

    async def run():
        gate = Gate(result=7)
        b = ingest.Batcher(apply=gate.apply, record=gate.record, depth=2)
        t0, t1, t2, t3 = ago(4), ago(3), ago(2), ago(1)
        first = asyncio.ensure_future(b.submit("tok-a", [("vm", "PowerOn")], t0))
        await gate.started.wait()  # tok-a's batch is held in the database
        others = [asyncio.ensure_future(b.submit(tok, vms, at)) for tok, vms, at in [
            ("tok-a", [("vm", "PowerOff")], t1),
            ("tok-b", [], t2),
            ("tok-a", [("vm", "PowerOn"), ("vm2", "PowerOn")], t3),
        ]]
        b_answer = await others[1]  # applied beside the held batch
        during = list(gate.batches)
        gate.gate.set()
        answers = await asyncio.gather(first, *others)
        b.task.cancel()
        return gate.batches, during, b_answer, answers, (t0, t1, t2, t3)

    batches, during, b_answer, answers, (t0, t1, t2, t3) = async_to_sync(run)()
    assert b_answer == 7 and answers == [7, 7, 7, 7]
    assert during == [[("tok-a", [("vm", "PowerOn")], t0)], [("tok-b", [], t2)]]
    assert batches[2:] == [[("tok-a", [("vm", "PowerOn"), ("vm2", "PowerOn")], t3)]]

async def caught_up(b: ingest.Batcher, timeout: float = 10) -> None:
    import asyncio

    for _ in range(int(timeout / 0.01)):
        if not b.backlog:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the batcher never caught up")


@pytest.mark.django_db(transaction=True)
def test_backlog_raises_one_alert_per_episode_and_an_event_when_caught_up():
    """P5: when the oldest waiting ping is older than a second, one IngestionBacklog
    alert (warning, with queue length, age and pid) for the whole episode, however
    many batches it lasts; one IngestionCaughtUp event when it clears; the next episode
    alerts again. The backlog shows in ingest.snapshot() (GET /api/v1/engine)."""
    import asyncio
    import os

    from asgiref.sync import async_to_sync

    async def run():
        gate = Gate()
        # Events through the real worker thread; one batch at a time.
        b = ingest.Batcher(apply=gate.apply, depth=1)
        # One batch of three, the oldest 3 s old: the alert.
        first = [asyncio.ensure_future(b.submit(tok, [], ago(s)))
                 for tok, s in [("tok-a", 2), ("tok-b", 3), ("tok-x", 0)]]
        await gate.started.wait()
        later = [asyncio.ensure_future(b.submit(tok, [], ago(s)))
                 for tok, s in [("tok-c", 1.5), ("tok-d", 1.2)]]
        await asyncio.sleep(0)
        during = ingest.snapshot()
        gate.gate.set()
        await asyncio.gather(*first, *later)  # a second batch, still behind: no new alert
        await caught_up(b)  # the drained queue's all-clear
        after = ingest.snapshot()
        await b.submit("tok-d", [], ago(5))  # a new episode
        await caught_up(b)
        b.task.cancel()
        return during, after, [len(batch) for batch in gate.batches]

    during, after, gate_batches = async_to_sync(run)()
    events = list(Event.objects.filter(subject="engine", event__startswith="Ingestion")
                  .order_by("pk"))
    assert [e.event for e in events] == [
        "IngestionBacklog", "IngestionCaughtUp", "IngestionBacklog", "IngestionCaughtUp"]
    # R19: one alert per episode, resolved by the all-clear.
    assert list(Alert.objects.filter(kind="IngestionBacklog").order_by("id")
                .values_list("state", "count")) == [("resolved", 1), ("resolved", 1)]
    alert = events[0]
    assert alert.severity == "warning"
    assert f"pid {os.getpid()}" in alert.message
    assert "3 ping report(s) waiting, the oldest for 3.0 s" in alert.message
    assert gate_batches == [3, 2, 1]
    assert alert.subject_name == f"ingestion/{os.getpid()}"
    assert during["backlog"] and during["queued"] == 2 and during["oldest_age_seconds"] >= 3
    assert not after["backlog"] and after["queued"] == 0 and after["oldest_age_seconds"] == 0


def test_no_backlog_no_event():
    """A batcher that keeps up records nothing."""
    import asyncio

    from asgiref.sync import async_to_sync

    async def run():
        gate = Gate()
        gate.gate.set()
        b = ingest.Batcher(apply=gate.apply, record=gate.record)
        assert await b.submit("tok-a", [], ago(0.1)) == 10
        assert await b.submit("tok-a", [], ago(0.9)) == 10
        await asyncio.sleep(0.01)
        b.task.cancel()
        return gate.events, b.stats()

    events, stats = async_to_sync(run)()
    assert events == [] and not stats["backlog"]


def test_engine_status_reports_this_process_ingestion():
    """GET /api/v1/engine keeps its fields and adds this web process's ingestion."""
    from django.contrib.auth import get_user_model
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(get_user_model().objects.create_user("viewer"))
    body = client.get("/api/v1/engine").json()
    assert {"sweeper", "loops", "alive_loops", "target_loops", "ingestion"} <= set(body)
    assert {"pid", "pings", "batches", "steady", "coalesced", "queued", "oldest_age_seconds",
            "backlog", "backlog_after_seconds"} == set(body["ingestion"])
    assert body["ingestion"]["backlog_after_seconds"] == 1.0


def test_a_failed_batch_answers_its_pings_with_the_error():
    """A batch that fails (or returns a wrong number of answers) fails its pings — the
    sockets get an error — and the batcher goes on with the next batch."""
    import asyncio

    from asgiref.sync import async_to_sync

    async def run():
        calls = []

        async def apply(items):
            calls.append(items)
            return [10] * (len(items) + (1 if len(calls) == 1 else 0))

        b = ingest.Batcher(apply=apply, record=Gate().record)
        with pytest.raises(RuntimeError, match="2 results for 1 pings"):
            await b.submit("tok-a", [], ago(0))
        assert await b.submit("tok-a", [], ago(0)) == 10
        b.task.cancel()
        await asyncio.sleep(0)

    async_to_sync(run)()
