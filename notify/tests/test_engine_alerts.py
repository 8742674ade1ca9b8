"""R20 with the real engine on the in-process simulated fleet (fleet.testing): a host
that loses power opens an incident whose alert is declared and resolved; each step
queues its notification in the engine's own transaction, and the sender delivers them
in order — each with the alert as it was at that step."""

from __future__ import annotations

import pytest

from fleet.testing import world
from notify import sender
from notify.models import Channel, Delivery
from notify.tests.receivers import Receiver


@pytest.mark.django_db
def test_r20_host_power_loss_notifies_opened_declared_resolved_in_order():
    receiver = Receiver(secret="k")
    s = None
    try:
        Channel.objects.create(name="all", kind="webhook", url=receiver.url, secret="k",
                               min_severity="info")
        Channel.objects.create(name="pager", kind="alertmanager", url=receiver.url,
                               secret="k", min_severity="critical")
        w = world({"config": {"ping.interval": 10, "ping.timeout": 2.5},
                   "hosts": {"h1": {}, "h2": {}, "h3": {}},
                   "vms": {"vm1": {"host": "h1", "ha": True}}})
        w.advance_to(29)
        assert not Delivery.objects.exists(), "nothing to tell while all is well"
        w.fleet.power_off("h1")
        w.advance_to(150)

        got = {name: list(Delivery.objects.filter(channel__name=name).order_by("id")
                          .values_list("transition", flat=True))
               for name in ("all", "pager")}
        # The incident opens as a warning, becomes critical when h1 is declared Down:
        # the critical-only pager hears of it from then on.
        assert got == {"all": ["opened", "declared", "resolved"],
                       "pager": ["declared", "resolved"]}

        s = sender.Sender("engine-test", clock=w.clock.now)
        s.send_now()
        hook = [r["json"] for r in receiver.requests if "source" in r["json"]]
        assert [b["transition"] for b in hook] == ["opened", "declared", "resolved"]
        assert [b["severity"] for b in hook] == ["warning", "critical", "critical"]
        assert hook[0]["incident"]["host"] == "h1"
        assert hook[0]["incident"]["state"] == "Open"
        assert hook[2]["incident"]["vms_restarted"] == 1
        am = [r["json"] for r in receiver.requests if r["json"].get("version") == "4"]
        assert [b["status"] for b in am] == ["firing", "resolved"]
        assert am[0]["alerts"][0]["labels"]["host"] == "h1"
        assert all(r["signature_ok"] for r in receiver.requests)
        assert set(Delivery.objects.values_list("state", flat=True)) == {"sent"}
    finally:
        if s is not None:
            s.stop(wait=True)
        receiver.close()
