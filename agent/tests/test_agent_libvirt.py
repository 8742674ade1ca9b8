"""(a) What the agent reads from libvirt: the power report, definitions and their
changes, lifecycle events, the disk check — in this process, against libvirt's test
driver (PROTOCOL.md ping, "Real agents"; issue 9)."""

from __future__ import annotations

import json
import stat
import threading
import time

import pytest
from agenttest import Dom, write_node


@pytest.fixture
def hv_factory(tmp_path):
    from hadash_agent.hypervisor import Hypervisor

    made = []

    def make(domains, on_event=None):
        uri = write_node(tmp_path / f"node{len(made)}.xml", domains)
        hv = Hypervisor(uri, on_event=on_event)
        made.append(hv)
        return hv

    yield make
    for hv in made:
        hv.close()


def report(hv):
    return {d.name: d.power_state for d in hv.domains()}


def test_report_maps_libvirt_states_to_power_states(hv_factory):
    """Running → PowerOn, shut off → PowerOff, paused is still PowerOn (the guest is
    in memory); a transient domain that stopped is gone from the report."""
    hv = hv_factory([Dom("web-1"), Dom("db-1", running=False), Dom("batch-1")])
    hv.conn().lookupByName("batch-1").suspend()
    transient = Dom("tmp-1").xml(test_ns=False)
    hv.conn().createXML(transient, 0)
    assert report(hv) == {"web-1": "PowerOn", "db-1": "PowerOff", "batch-1": "PowerOn",
                          "tmp-1": "PowerOn"}
    hv.conn().lookupByName("tmp-1").destroy()
    hv.conn().lookupByName("web-1").destroy()
    assert report(hv) == {"web-1": "PowerOff", "db-1": "PowerOff", "batch-1": "PowerOn"}


def test_crashed_domain_is_power_off():
    import libvirt
    from hadash_agent.hypervisor import power_state

    assert power_state(libvirt.VIR_DOMAIN_CRASHED) == "PowerOff"
    assert power_state(libvirt.VIR_DOMAIN_SHUTOFF) == "PowerOff"
    for state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED,
                  libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_SHUTDOWN,
                  libvirt.VIR_DOMAIN_PMSUSPENDED):
        assert power_state(state) == "PowerOn"


def test_names_hadash_refuses_are_left_out_of_the_report(hv_factory):
    """One bad name would make the server refuse the whole report (hadash/names.py)."""
    hv = hv_factory([Dom("good-1")])
    hv.conn().createXML(Dom("bad name!").xml(test_ns=False), 0)
    assert report(hv) == {"good-1": "PowerOn"}


def test_definitions_sent_once_then_only_when_they_change(hv_factory):
    from hadash_agent.report import Definitions, entries

    hv = hv_factory([Dom("web-1"), Dom("web-2", running=False)])
    defs = Definitions()
    assert defs.update(hv.definitions(["web-1", "web-2"])) == []  # new, not "changed"
    pending = defs.pending()
    assert sorted(pending) == ["web-1", "web-2"]
    xml = pending["web-1"][1]
    assert "<name>web-1</name>" in xml and "id=" not in xml.split(">", 1)[0]
    vms = entries(hv.domains(), pending)
    assert {v["name"]: v["definition"]["format"] for v in vms} == {
        "web-1": "libvirt-xml", "web-2": "libvirt-xml"}
    # Not delivered until the server answered: still pending.
    assert sorted(defs.pending()) == ["web-1", "web-2"]
    defs.mark_delivered(pending)
    assert defs.pending() == {}
    assert all("definition" not in v for v in entries(hv.domains(), defs.pending()))

    # A restart changes the live XML (a new id), not the definition: nothing to send.
    dom = hv.conn().lookupByName("web-1")
    dom.destroy()
    dom.create()
    assert defs.update(hv.definitions(["web-1", "web-2"])) == []
    assert defs.pending() == {}

    # Redefined with more memory: that one definition goes again.
    old = hv.conn().lookupByName("web-2").XMLDesc(0)
    hv.conn().defineXML(old.replace("<memory unit='KiB'>65536</memory>",
                                    "<memory unit='KiB'>131072</memory>"))
    assert defs.update(hv.definitions(["web-1", "web-2"])) == ["web-2"]
    assert list(defs.pending()) == ["web-2"]
    assert "131072" in defs.pending()["web-2"][1]

    # After a reconnect the server gets all of them again.
    defs.mark_delivered(defs.pending())
    defs.resend_all()
    assert sorted(defs.pending()) == ["web-1", "web-2"]

    # A domain that is gone is forgotten.
    defs.retain(["web-1"])
    assert sorted(defs.pending()) == ["web-1"]


def test_definitions_are_split_over_messages_when_large():
    from hadash_agent.report import Definitions

    defs = Definitions()
    defs.update({f"vm-{i}": "<domain>" + "x" * 1000 + f"{i}</domain>" for i in range(10)})
    first = defs.pending(budget=3500)
    assert len(first) == 3
    defs.mark_delivered(first)
    second = defs.pending(budget=3500)
    assert len(second) == 3 and not set(first) & set(second)


def test_lifecycle_events_arrive_when_a_domain_changes(hv_factory):
    seen: list[tuple[str, str]] = []
    arrived = threading.Event()

    def on_event(name, text):
        seen.append((name, text))
        arrived.set()

    hv = hv_factory([Dom("web-1")], on_event=on_event)
    hv.conn()  # opens and registers for events
    t0 = time.monotonic()
    hv.conn().lookupByName("web-1").destroy()
    assert arrived.wait(2), "no lifecycle event within 2 s"
    assert time.monotonic() - t0 < 1.0
    assert ("web-1", "stopped (destroyed)") in seen


def test_disk_check_names_missing_paths(tmp_path):
    from hadash_agent.hypervisor import missing_disks, parse_definition

    present = tmp_path / "present.qcow2"
    present.write_bytes(b"")
    xml = f"""<domain type='kvm'><name>vm-1</name><devices>
      <disk type='file' device='disk'><source file='{present}'/></disk>
      <disk type='file' device='disk'><source file='/nonexistent/vm-1-data.qcow2'/></disk>
      <disk type='block' device='disk'><source dev='/dev/nonexistent-lv'/></disk>
      <disk type='file' device='cdrom'><target dev='hdc'/></disk>
      <disk type='file' device='cdrom'><source file='/nonexistent/iso' startupPolicy='optional'/>
      </disk>
      <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/></disk>
      <disk type='volume' device='disk'><source pool='nopool' volume='v1'/></disk>
    </devices></domain>"""
    root = parse_definition(xml, "vm-1")
    assert missing_disks(root) == ["/nonexistent/vm-1-data.qcow2", "/dev/nonexistent-lv",
                                   "volume nopool/v1"]


@pytest.mark.parametrize("xml, problem", [
    ("<domain><name>other</name></domain>", "names the domain 'other', not 'vm-1'"),
    ("<network><name>vm-1</name></network>", "must be a <domain>"),
    ("<domain><name>vm-1</name>", "not well-formed"),
    ("<!DOCTYPE d [<!ENTITY a 'b'>]><domain><name>vm-1</name></domain>", "DOCTYPE"),
])
def test_bad_definitions_are_refused(xml, problem):
    from hadash_agent.hypervisor import ActionError, parse_definition

    with pytest.raises(ActionError) as exc:
        parse_definition(xml, "vm-1")
    assert exc.value.status == 400 and problem in exc.value.message


def test_start_refuses_missing_disk_and_defines_nothing(hv_factory, tmp_path):
    from hadash_agent.hypervisor import ActionError

    hv = hv_factory([])
    xml = Dom("vm-9", disks=[str(tmp_path / "missing.img")]).xml(test_ns=False)
    with pytest.raises(ActionError) as exc:
        hv.start("vm-9", xml)
    assert exc.value.status == 409
    assert exc.value.message == f"disk {tmp_path / 'missing.img'} missing on this host"
    assert report(hv) == {}


def test_state_file_is_private_and_replaced_atomically(tmp_path):
    from hadash_agent.state import Credentials, StateStore

    store = StateStore(tmp_path / "st" / "state.json")
    assert store.load() == Credentials()
    store.save(Credentials(name="kvm-1", server_url="http://s", token="t1", server_token="s1"))
    store.save(Credentials(name="kvm-1", server_url="http://s", token="t2", server_token="s2"))
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert [p.name for p in store.path.parent.iterdir()] == ["state.json"]
    assert json.loads(store.path.read_text())["token"] == "t2"
    assert store.load().server_token == "s2"


def test_config_from_file_and_environment(tmp_path):
    from hadash_agent.config import ConfigError, load

    path = tmp_path / "agent.toml"
    path.write_text('server_url = "http://10.0.0.5:8000/"\nlisten = "10.0.0.11:8250"\n'
                    'name = "kvm-01"\ncluster = "c1"\n')
    cfg = load(path, env={"HADASH_AGENT_CLUSTER": "c2", "HADASH_AGENT_TEST_HOOKS": "1"})
    assert cfg.server_url == "http://10.0.0.5:8000"
    assert cfg.agent_url == "http://10.0.0.11:8250" and cfg.address == "10.0.0.11"
    assert cfg.cluster == "c2" and cfg.test_hooks is True and cfg.name == "kvm-01"
    assert load(path, env={}).test_hooks is False

    path.write_text('server_url = "http://s"\nsevrer = "typo"\n')
    with pytest.raises(ConfigError, match="unknown setting 'sevrer'"):
        load(path, env={})
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="server_url is not set"):
        load(None, env={"HADASH_AGENT_CONFIG": str(empty)})
    with pytest.raises(ConfigError, match="not a name hadash accepts"):
        load(None, env={"HADASH_AGENT_CONFIG": str(tmp_path / "empty.toml"),
                        "HADASH_AGENT_SERVER_URL": "http://s", "HADASH_AGENT_NAME": "a b"})
    with pytest.raises(ConfigError, match="agent_url must not carry"):
        load(None, env={"HADASH_AGENT_CONFIG": str(tmp_path / "empty.toml"),
                        "HADASH_AGENT_SERVER_URL": "http://s",
                        "HADASH_AGENT_AGENT_URL": "http://u:p@10.0.0.1:8250"})


def test_backoff_doubles_with_jitter_up_to_the_cap():
    """Never a tight retry loop, never a fixed rhythm shared by a whole fleet."""
    from hadash_agent.agent import Backoff

    b = Backoff(cap=30)
    delays = [b.next() for _ in range(10)]
    for i, d in enumerate(delays):
        full = min(30, 2 ** i)
        assert full / 2 <= d <= full
    assert max(delays) <= 30 and delays[-1] >= 15
    b.reset()
    assert b.next() <= 1
    assert len({round(Backoff(cap=30).next(), 6) for _ in range(20)}) > 1  # jittered


def test_a_transient_domain_that_stopped_is_reported_power_off_for_a_while(tmp_path):
    """libvirt forgets a transient domain once it stops (HA restarts are transient): the
    report its lifecycle event triggers still says PowerOff, so the server learns of the
    crash at once instead of finding the VM missing two ping intervals later (R8). A
    domain that migrated away is not reported (it runs elsewhere)."""
    from hadash_agent.agent import Agent
    from hadash_agent.config import Config

    uri = write_node(tmp_path / "node.xml", [Dom("web-1")])
    agent = Agent(Config(server_url="http://127.0.0.1:9", libvirt_uri=uri,
                         state_dir=str(tmp_path / "state")))
    try:
        agent.hv.conn().createXML(Dom("tmp-1").xml(test_ns=False), 0)
        assert {d.name: d.power_state for d in agent._collect(True)} == {
            "web-1": "PowerOn", "tmp-1": "PowerOn"}
        agent.hv.conn().lookupByName("tmp-1").destroy()
        deadline = time.monotonic() + 10
        while "tmp-1" not in agent._stopped and time.monotonic() < deadline:
            time.sleep(0.05)  # the lifecycle event comes on libvirt's event thread
        assert {d.name: d.power_state for d in agent._collect(False)} == {
            "web-1": "PowerOn", "tmp-1": "PowerOff"}
        agent._stopped["tmp-1"] -= 3600  # long ago: no longer reported
        assert {d.name for d in agent._collect(False)} == {"web-1"}
    finally:
        agent.hv.close()
