"""A bounded schemathesis run against the operator API's own description,
/api/v1/openapi.json (issue 8 part 4; PROTOCOL.md "Operator API").

Every operation in the document is called with generated requests — valid ones and,
in schemathesis's negative mode, invalid ones — once with an admin's API token and
once with a read-only user's token:

* admin: no answer is a 5xx; every answer is one the document lists for the
  operation, with the documented content type and a body that matches its schema; a
  request the document calls invalid is refused (4xx).
* read-only: the same, and besides, nothing changes — hosts, VMs, HA work, events
  and configuration are compared before and after every call — and every write
  attempt is a 403.

Bounded and deterministic: a fixed number of examples per operation (derandomized,
no shrinking, no example database), so the module takes about a minute on a small
machine, on PostgreSQL and on SQLite alike (measured on 2 shared cores: 48 s and 54 s).
A failure is reported with the request that caused it (a curl line), unshrunk.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from django.contrib.auth import get_user_model
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, transaction
from django.utils import timezone
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from hadash.choices import Reason, Step, Subject, WorkType
from hadash.events import record_event
from hadash.models import ApiToken, Configuration, Event, HaWork
from hosts.choices import HostStatus, ResourceState
from hosts.models import Host
from vms.choices import PowerState, VmState
from vms.models import VMInstance

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

# Examples per operation and token (23 operations × 2 tokens × EXAMPLES calls). For a
# longer hunt: HADASH_FUZZ_EXAMPLES=500 pytest hadash/tests/test_api_fuzz.py
EXAMPLES = int(os.environ.get("HADASH_FUZZ_EXAMPLES", 20))

schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", get_wsgi_application())
# The token is ours to send (an admin's or a reader's); authentication failures are
# tested in test_api.py.
schema.config.generation.update(with_security_parameters=False)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

fuzz_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)

HOSTS = ("kvm-01", "kvm-02")
VMS = ("web-1", "db-1")


@pytest.fixture
def world():
    """Two hosts (their agents unreachable at once: a closed local port), a running
    and a stopped VM, an HA item, an alert; an admin and a read-only user."""
    # Django's test client does the same: a request's end must not close the test's
    # database connection (and with it the transaction the test runs in).
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    User = get_user_model()
    admin = User.objects.create_user("ops", is_staff=True)  # no password: no hashing
    reader = User.objects.create_user("viewer")
    now = timezone.now()
    hosts = [
        Host.objects.create(
            name=name, status=HostStatus.UP, resource_state=ResourceState.ENABLED,
            cluster="c1", cpus=16, memory_mb=65536, last_ping=now,
            agent_url="http://127.0.0.1:9",
        )
        for name in HOSTS
    ]
    web = VMInstance.objects.create(
        name="web-1", state=VmState.RUNNING, power_state=PowerState.POWER_ON,
        host=hosts[0], last_host=hosts[0], power_host=hosts[0], cpus=2, memory_mb=2048,
        ha_enabled=True,
    )
    VMInstance.objects.create(
        name="db-1", state=VmState.STOPPED, power_state=PowerState.POWER_OFF,
        last_host=hosts[1], cpus=1, memory_mb=1024,
    )
    work = HaWork.objects.create(
        instance=web, vm_type=web.type, type=WorkType.HA, reason=Reason.HOST_DOWN,
        step=Step.DONE, host=hosts[0], state=web.state, update_count=web.update_count,
        time_to_try=now, created=now, updated=now,
    )
    with transaction.atomic():
        alert = record_event(Subject.HOST, hosts[1], event="HostDown", field="status",
                             old="Up", new="Down", alert=True, now=now)
    yield {
        "admin": f"Bearer {ApiToken.issue(admin)[1]}",
        "reader": f"Bearer {ApiToken.issue(reader)[1]}",
        "ids": (work.pk, alert.pk),
    }
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def aim(case, pick: int, world) -> None:
    """Now and then point a generated request at an object that exists, so that
    operations are exercised beyond their 404."""
    if not pick:
        return
    params = case.path_parameters
    if "name" in params:
        names = HOSTS if case.path.startswith("/api/v1/hosts") else VMS
        params["name"] = names[pick % len(names)]
    if "id" in params:
        work_id, event_id = world["ids"]
        params["id"] = work_id if case.path.startswith("/api/v1/ha-work") else event_id
    if case.path == "/api/v1/vms" and isinstance(case.body, dict) and "host" in case.body:
        case.body["host"] = HOSTS[pick % len(HOSTS)]
    # Reading `meta` revalidates the edited request: an invalid name replaced by a real
    # one makes a valid request, which must not count as "invalid data accepted".
    assert case.meta is not None


def snapshot() -> dict:
    return {
        "hosts": list(Host.objects.order_by("pk").values()),
        "vms": list(VMInstance.objects.order_by("pk").values()),
        "work": list(HaWork.objects.order_by("pk").values()),
        "events": list(Event.objects.order_by("pk").values()),
        "config": list(Configuration.objects.order_by("pk").values()),
    }


@schema.parametrize()
@schema.given(pick=st.integers(min_value=0, max_value=3))
@fuzz_settings
def test_admin(case, pick, world):
    """Issue 8: with an admin token no request is a 5xx, every answer is the
    documented one, and invalid requests are refused."""
    aim(case, pick, world)
    case.call_and_validate(headers={"Authorization": world["admin"]}, checks=CHECKS)


@schema.parametrize()
@schema.given(pick=st.integers(min_value=0, max_value=3))
@fuzz_settings
def test_read_only(case, pick, world):
    """Issue 8 / R30: a read-only token changes nothing whatever it sends; every write
    is a 403 and reads answer as documented."""
    aim(case, pick, world)
    before = snapshot()
    response = case.call(headers={"Authorization": world["reader"]})
    assert snapshot() == before, f"{case.method} {case.formatted_path} changed the database"
    if case.method.upper() not in ("GET", "HEAD", "OPTIONS"):
        body = response.json()
        assert response.status_code == 403 or (
            response.status_code == 404 and body["error"].startswith("no such API path")
        ), (case.method, case.formatted_path, response.status_code, body)
    case.validate_response(response, checks=CHECKS)
