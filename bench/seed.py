"""Set-up inside a benchmark database, through the ORM (run as its own process with
``DATABASE_URL`` pointing at the benchmark database)::

    python -m bench.seed ping --hosts 1000 --vms-per-host 10 --out hosts.json

creates ``hosts`` Up hosts with agent tokens, each with ``vms-per-host`` Running VMs
(power state PowerOn, confirmed now), in a few bulk statements, and writes
``[{"id", "name", "token", "vm_ids", "vm_names"}, …]`` for the load generator and the
PostgreSQL ceiling. Only the set-up goes around HTTP; what is measured does not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def seed_ping(hosts: int, vms_per_host: int) -> list[dict]:
    import uuid

    from django.db import transaction
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
                 private_ip_address=f"10.1.{i // 250}.{i % 250 + 1}",
                 agent_url="http://127.0.0.1:9/agent")
        token, _ = h.issue_credentials()
        rows.append(h)
        tokens.append(token)
    with transaction.atomic():
        created = Host.objects.bulk_create(rows, batch_size=1000)
        vms: list[VMInstance] = []
        for h in created:
            for j in range(vms_per_host):
                vms.append(VMInstance(
                    name=f"{h.name}-vm{j:02d}", state=VmState.RUNNING,
                    power_state=PowerState.POWER_ON, power_host=h, host=h,
                    power_state_update_time=now, power_state_update_count=1,
                    ha_enabled=j % 2 == 0, cpus=1, memory_mb=1024,
                ))
        made = VMInstance.objects.bulk_create(vms, batch_size=2000)
    out: list[dict] = []
    per_host: dict[int, list[VMInstance]] = {}
    for vm in made:
        per_host.setdefault(vm.host_id, []).append(vm)
    for h, token in zip(created, tokens, strict=True):
        mine = per_host.get(h.pk, [])
        out.append({"id": h.pk, "name": h.name, "token": token,
                    "vm_ids": [v.pk for v in mine], "vm_names": [v.name for v in mine]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seed")
    parser.add_argument("what", choices=["ping"])
    parser.add_argument("--hosts", type=int, required=True)
    parser.add_argument("--vms-per-host", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hadash.settings")
    import django

    django.setup()
    t0 = time.monotonic()
    data = seed_ping(args.hosts, args.vms_per_host)
    with open(args.out, "w") as f:
        json.dump(data, f)
    print(f"seeded {len(data)} hosts, {sum(len(d['vm_ids']) for d in data)} VMs in "
          f"{time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
