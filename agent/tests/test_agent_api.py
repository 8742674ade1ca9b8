"""(b) The agent's HTTP API, as the hadash server calls it (PROTOCOL.md "Server →
agent"): a real agent process on its own libvirt test-driver host, real HTTP. These
agents have credentials on disk but no server to talk to (they keep retrying it),
which is also what the API must survive."""

from __future__ import annotations

import httpx
from agenttest import Dom


def definition(dom: Dom) -> dict:
    return {"format": "libvirt-xml", "xml": dom.xml(test_ns=False)}


def power(agent, name: str) -> str | None:
    with agent.client() as c:
        r = c.get(f"/vms/{name}")
    if r.status_code == 404:
        assert r.json() == {"error": f"no domain named {name} on this host"}
        return None
    assert r.status_code == 200, r.text
    assert r.json()["name"] == name
    return r.json()["power_state"]


def test_reports_vm_power_states(make_agent):
    agent = make_agent("kvm-a", [Dom("web-1"), Dom("db-1", running=False)])
    assert power(agent, "web-1") == "PowerOn"
    assert power(agent, "db-1") == "PowerOff"
    assert power(agent, "nope-1") is None
    with agent.client() as c:
        r = c.post("/check-health", json={})
    assert r.status_code == 200 and r.json()["ok"] is True


def test_wrong_server_token_is_refused_and_changes_nothing(make_agent):
    """PROTOCOL.md Authentication: the server's calls carry server_token; anything
    else is 401 with a JSON error, and nothing happens."""
    agent = make_agent("kvm-a", [Dom("web-1"), Dom("db-1", running=False)])
    for header in (None, "Bearer wrong-token", "Basic abc", "Bearer",
                   "Bearer " + agent.credentials()["token"]):  # the host token is not it
        headers = {"Authorization": header} if header else {}
        with httpx.Client(base_url=agent.url, timeout=10, headers=headers) as c:
            answers = [
                c.post("/vms/web-1/stop", json={"force": True}),
                c.post("/vms/db-1/start", json={"cpus": 1, "memory_mb": 64}),
                c.post("/vms/new-1/start", json={"definition": definition(Dom("new-1"))}),
                c.get("/vms/web-1"),
                c.post("/check-health", json={}),
                c.post("/check-on-host", json={"name": "kvm-b", "address": "127.0.0.1"}),
            ]
        for r in answers:
            assert r.status_code == 401, (header, r.request.url, r.text)
            assert r.json()["error"] in ("invalid server token", "missing credentials: send "
                                         "Authorization: Bearer <server_token>")
    assert power(agent, "web-1") == "PowerOn"
    assert power(agent, "db-1") == "PowerOff"
    assert power(agent, "new-1") is None
    agent.wait_log("refused a call POST /vms/web-1/stop from 127.0.0.1: wrong server token")


def test_start_from_a_definition_with_a_missing_disk_is_refused(make_agent, tmp_path):
    agent = make_agent("kvm-a", [])
    missing = tmp_path / "shared" / "vm-9.qcow2"
    with agent.client() as c:
        r = c.post("/vms/vm-9/start", json={"cpus": 1, "memory_mb": 64, "definition":
                                            definition(Dom("vm-9", disks=[str(missing)]))})
    assert r.status_code == 409
    assert r.json() == {"error": f"disk {missing} missing on this host"}
    assert power(agent, "vm-9") is None  # nothing was defined
    agent.wait_log("start vm-9 refused (409)")


def test_start_from_a_definition_then_stop_forgets_it(make_agent, tmp_path):
    """Started from the server's definition (its disk is on 'shared storage'): runs;
    stop with force destroys it and the host forgets it (a transient domain)."""
    disk = tmp_path / "shared" / "vm-9.qcow2"
    disk.parent.mkdir()
    disk.write_bytes(b"")
    agent = make_agent("kvm-a", [])
    with agent.client() as c:
        r = c.post("/vms/vm-9/start", json={
            "cpus": 1, "memory_mb": 64, "definition": definition(Dom("vm-9", disks=[str(disk)]))})
        assert r.status_code == 200, r.text
        assert r.json() == {"power_state": "PowerOn"}
        assert power(agent, "vm-9") == "PowerOn"
        # Starting a running VM again is not an error.
        again = definition(Dom("vm-9", disks=[str(disk)]))
        r = c.post("/vms/vm-9/start", json={"definition": again})
        assert r.status_code == 200 and r.json() == {"power_state": "PowerOn"}
        r = c.post("/vms/vm-9/stop", json={"force": True})
        assert r.status_code == 200 and r.json() == {"power_state": "PowerOff"}
        assert power(agent, "vm-9") is None
        r = c.post("/vms/vm-9/stop", json={"force": True})
        assert r.status_code == 404 and r.json() == {"error": "no domain named vm-9 on this host"}
    agent.wait_log("server: start vm-9 → PowerOn (started from the definition (transient")
    agent.wait_log("server: stop vm-9 → PowerOff (destroyed and forgotten)")


def test_start_and_stop_of_a_domain_defined_on_the_host(make_agent):
    """Without a definition, start uses the domain defined here; stop destroys and
    undefines it (PROTOCOL.md: the hypervisor then forgets the VM)."""
    agent = make_agent("kvm-a", [Dom("db-1", running=False), Dom("web-1")])
    with agent.client() as c:
        r = c.post("/vms/db-1/start", json={"cpus": 1, "memory_mb": 64})
        assert r.status_code == 200 and r.json() == {"power_state": "PowerOn"}
        assert power(agent, "db-1") == "PowerOn"
        r = c.post("/vms/nope-1/start", json={"cpus": 1, "memory_mb": 64})
        assert r.status_code == 409
        assert r.json() == {"error": "no domain named nope-1 on this host and no "
                                     "definition was sent"}
        r = c.post("/vms/web-1/stop", json={"force": True})
        assert r.status_code == 200 and r.json() == {"power_state": "PowerOff"}
        assert power(agent, "web-1") is None  # undefined too, not just shut off
        # A graceful stop (force false) of a persistent domain: shut down, forgotten.
        r = c.post("/vms/db-1/stop", json={"force": False})
        assert r.status_code == 200 and r.json() == {"power_state": "PowerOff"}
        assert power(agent, "db-1") is None


def test_bad_requests_get_json_errors(make_agent):
    agent = make_agent("kvm-a", [Dom("web-1")])
    with agent.client() as c:
        cases = [
            (c.post("/vms/web-1/stop", content=b"{not json",
                    headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
            (c.post("/vms/web-1/stop", json=[1]), 400, "must be a JSON object"),
            (c.post("/vms/web-1/stop", json={"force": "yes"}), 400, "force must be"),
            (c.post("/vms/x-1/start", json={"definition": {"format": "ovf", "xml": "<a/>"}}),
             400, "format 'ovf' is not supported"),
            (c.post("/vms/x-1/start", json={"definition": {
                "format": "libvirt-xml", "xml": Dom("other").xml(test_ns=False)}}),
             400, "names the domain 'other', not 'x-1'"),
            (c.post("/vms/web-1/migrate", json={"target_url": "ftp://x"}), 400, "target_url"),
            (c.post("/test/destroy/web-1"), 404, "no such endpoint"),  # hooks are off
            (c.get("/nothing-here"), 404, "no such endpoint"),
        ]
    for r, status, text in cases:
        assert r.status_code == status, (r.request.url, r.text)
        assert text in r.json()["error"], r.text
    assert power(agent, "web-1") == "PowerOn"


def test_check_on_host_probes_the_other_hosts_agent(make_agent):
    """alive true when the other host's agent answers at its address; null ("cannot
    tell") when nothing answers — never false from a network probe, since a host cut
    off from the network looks the same as a dead one."""
    b = make_agent("kvm-b", [])
    a = make_agent("kvm-a", [], peer_port=str(b.port), peer_timeout="1")
    with a.client() as c:
        r = c.post("/check-on-host", json={"name": "kvm-b", "address": "127.0.0.1"})
        assert r.status_code == 200 and r.json()["alive"] is True, r.text
        r = c.post("/check-on-host", json={"name": "kvm-c", "address": "127.0.0.1"})
        assert r.json()["alive"] is None and "answers as host kvm-b" in r.json()["detail"]
        b.stop()
        r = c.post("/check-on-host", json={"name": "kvm-b", "address": "127.0.0.1"})
        assert r.status_code == 200 and r.json()["alive"] is None, r.text
        r = c.post("/check-on-host", json={"name": "kvm-b", "address": "a/b"})
        assert r.status_code == 400


def test_migrate_says_clearly_when_it_cannot(make_agent):
    """Peer-to-peer migration needs the target's libvirt URI (its agent's
    migration_uri); without it → 409. libvirt's test driver cannot migrate → 501 with
    libvirt's reason. The VM keeps running here either way."""
    no_uri = make_agent("kvm-b", [])
    with_uri = make_agent("kvm-c", [], migration_uri="test:///default")
    a = make_agent("kvm-a", [Dom("web-1"), Dom("db-1", running=False)])
    with a.client() as c:
        r = c.post("/vms/web-1/migrate", json={"target_url": no_uri.url})
        assert r.status_code == 409
        assert r.json() == {"error": "migrate web-1: host kvm-b accepts no libvirt migrations "
                                     "(set migration_uri in its agent configuration)"}
        r = c.post("/vms/web-1/migrate", json={"target_url": with_uri.url})
        assert r.status_code == 501, r.text
        assert r.json()["error"].startswith("migrate web-1 to test:///default: libvirt: ")
        r = c.post("/vms/web-1/migrate", json={"target_url": a.url})
        assert r.status_code == 409 and "the target is this host" in r.json()["error"]
        r = c.post("/vms/nope-1/migrate", json={"target_url": with_uri.url})
        assert r.status_code == 404
    assert power(a, "web-1") == "PowerOn"


def test_test_hooks_only_when_enabled(make_agent):
    agent = make_agent("kvm-a", [Dom("web-1"), Dom("db-1")], test_hooks="1")
    with agent.client() as c:
        r = c.post("/test/destroy/web-1")
        assert r.status_code == 200
    assert power(agent, "web-1") == "PowerOff"  # persistent: shut off, still defined
    with agent.client("wrong") as c:
        assert c.post("/test/destroy/db-1").status_code == 401
    assert power(agent, "db-1") == "PowerOn"
    agent.wait_log("test hooks are enabled")
