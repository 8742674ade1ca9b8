"""Fixtures shared by the tests of agent reports (definitions, discovery): two Up hosts
with agent tokens, one Running VM, and a discovery cache reset around each test."""

from __future__ import annotations

import datetime as dt

import pytest

from hosts.choices import HostStatus
from hosts.models import Host
from vms import discovery
from vms.choices import PowerState, VmState
from vms.models import VMInstance

EARLIER = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _fresh_discovery():
    discovery.forget()
    yield
    discovery.forget()


@pytest.fixture
def hosts(db):
    """Two Up hosts; ``web-1`` Running on kvm-01. Each host has ``.token``."""
    out = []
    for i, name in enumerate(("kvm-01", "kvm-02"), 1):
        h = Host(name=name, status=HostStatus.UP, cluster="c1", cpus=32, memory_mb=131072,
                 private_ip_address=f"10.0.0.1{i}", agent_url=f"http://10.0.0.1{i}:8250",
                 last_ping=EARLIER)
        token, _ = h.issue_credentials()
        h.save()
        h.token = token
        out.append(h)
    VMInstance.objects.create(name="web-1", state=VmState.RUNNING, host=out[0],
                              last_host=out[0], power_state=PowerState.POWER_ON,
                              power_host=out[0], power_state_update_time=EARLIER)
    return out
