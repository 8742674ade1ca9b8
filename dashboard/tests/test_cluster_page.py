"""The cluster page's numbers (R22) after a host failure, as an operator reads them."""

import pytest
from django.contrib.auth import get_user_model

from fleet.testing import world
from hosts.choices import HostStatus
from hosts.models import Host

pytestmark = pytest.mark.django_db

# Four 18-cpu hosts, each with four 2-cpu HA VMs and a 1-cpu non-HA VM.
FOUR = {
    "hosts": {f"h{i}": {"cpus": 18} for i in range(1, 5)},
    "vms": {
        **{f"v{i}{j}": {"host": f"h{i}", "ha": True, "cpus": 2, "memory_mb": 4096}
           for i in range(1, 5) for j in range(4)},
        **{f"plain{i}": {"host": f"h{i}", "cpus": 1, "memory_mb": 1024} for i in range(1, 5)},
    },
}


def test_r22_cluster_page_counts_the_hosts_that_run_ha_vms_not_every_host(client):
    """R22: after h1 failed and its HA VMs restarted elsewhere, the page says the 16 HA
    VMs are on 3 hosts (of the cluster's 4) — it said "16 on 4 hosts", counting the Down
    host that runs nothing."""
    client.force_login(get_user_model().objects.create_user("viewer"))
    w = world(FOUR)
    w.advance_to(5)
    w.apply("host h1 power off")
    w.advance_to(60)
    assert Host.objects.get(name="h1").status == HostStatus.DOWN
    html = client.get("/clusters/c1").content.decode()
    assert 'id="plan-ha-vms">16 on 3 hosts <span class="muted small">(4 in the cluster)' in html
