"""R20 end to end, as in production: a real daphne, a real engine process
(`manage.py qcluster`) and a webhook receiver, talking HTTP only. A channel made
through the API gets its "send test" from the engine's sender, signed; with the engine
process killed, a delivery the web process committed waits, and the next engine
process sends it — nothing is lost between commit and send."""

from __future__ import annotations

import os
import signal

import pytest

from hadash.supervisor import live_members
from notify.tests.receivers import Receiver
from tests.conftest import fresh_database, start_system, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_r20_engine_process_sends_and_a_killed_engine_loses_nothing(tmp_path):
    receiver = Receiver(secret="e2e-secret")
    try:
        with fresh_database(tmp_path, "ntf") as url, \
                start_system(url, tmp_path, hosts=2, vms=2) as s:
            r = s.api.post("/notification-channels", json={
                "name": "e2e-hook", "kind": "webhook", "url": receiver.url,
                "secret": "e2e-secret", "min_severity": "info"})
            assert r.status_code == 201, r.text
            channel = r.json()["id"]

            first = s.api.post(f"/notification-channels/{channel}/test").json()
            wait_for("the engine sends the test", lambda: len(receiver.requests) >= 1, 30)
            req = receiver.requests[0]
            assert req["signature_ok"] and req["key"] == first["idempotency_key"]
            wait_for("the API shows it sent", lambda: s.api.get(
                f"/deliveries/{first['id']}").json()["state"] == "sent", 10)

            # The engine process dies (SIGKILL, its whole group) …
            engine = next(c for c in s.sup.children if c.name == "engine")
            os.killpg(engine.proc.pid, signal.SIGKILL)
            engine.proc.wait(10)
            wait_for("the engine's workers gone",
                     lambda: not live_members(engine.proc.pid), 10)
            # … a change commits its delivery meanwhile (here: "send test", in the web
            # process); nobody sends it …
            second = s.api.post(f"/notification-channels/{channel}/test").json()
            assert s.api.get(f"/deliveries/{second['id']}").json()["state"] == "pending"
            # … until an engine process runs again.
            s.sup.manage("engine-2", "qcluster")
            wait_for("the new engine sends it", lambda: len(receiver.requests) >= 2, 60)
            assert receiver.requests[1]["key"] == second["idempotency_key"]
            assert receiver.requests[1]["signature_ok"]
            wait_for("the API shows it sent", lambda: s.api.get(
                f"/deliveries/{second['id']}").json()["state"] == "sent", 10)
            assert len(receiver.requests) == 2, "each delivered once"
    finally:
        receiver.close()
