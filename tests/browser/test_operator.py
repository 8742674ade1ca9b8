"""Issue 10, item 8: what an operator sees through a failure, in a real browser.

The set-up of tests/browser/test_dashboard.py (fixtures and helpers in
tests/browser/conftest.py): Debian's Chromium driven by Playwright against the real
running system of tests/conftest.py — daphne, one engine process (qcluster) and the
fleet simulator, over real HTTP. One system for the module, a small fleet of three
clusters of two hosts (``kvm-001…006``; the simulator puts clusters round-robin, so
c1 = 001+004, c2 = 002+005, c3 = 003+006, and the HA VMs on the even hosts), each
failure in a cluster of its own so that no brake (R14) is in the way. The tests run in order:

1. R18/R19: a host failure is one alert on the overview's panel — critical once the
   host is declared Down, gone by itself when its HA VMs run again (no reload); the
   restarts are not alerts of their own;
2. R20: the same failure reached a webhook receiver running in this test process —
   ``opened``, ``declared``, ``resolved``, each with a valid HMAC signature;
3. R17: a VM page's header follows a crash of the VM and its restart, live;
4. R17: a host behind on ping is shown ``suspect`` before it is declared (the engine
   process is stopped, as during an upgrade, so that the verdict waits), then Down
   once an engine runs again;
5. R17: an HA VM whose host failed while its cluster has no room says
   ``waiting: no-capacity`` with the words why, on its page; it restarts when the
   operator makes room;
6. the list, notifications and cluster pages show the fleet (and, with
   ``HADASH_SCREENSHOTS=1``, are saved to docs/screenshots/).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hadash.supervisor import live_members
from tests.browser.conftest import LONG, USERS, WAIT, shoot, wait_live
from tests.conftest import System, start_system, wait_for

pytestmark = [pytest.mark.e2e]

HOSTS, VMS, CLUSTERS = 6, 12, 3
SECRET = "brw-webhook-secret-1"
CHANNEL = "ops-webhook"


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(browser, module_database, module_var_dir) -> System:
    """The running system (6 hosts in 3 clusters, 12 VMs, half HA), with an admin."""
    with start_system(module_database, module_var_dir, hosts=HOSTS, vms=VMS,
                      clusters=CLUSTERS,
                      setup=lambda s: s.manage("shell", "-c", USERS)) as system:
        yield system


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append({
            "path": self.path, "body": body,
            "headers": {k.lower(): v for k, v in self.headers.items()}})
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    """A webhook receiver in this process: every POST it got, in arrival order."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def channel(live, receiver) -> dict:
    """A webhook channel for every alert (min severity info), pointing at `receiver`,
    created through the API as an operator would."""
    port = receiver.server_address[1]
    r = live.api.post("/notification-channels", json={
        "name": CHANNEL, "kind": "webhook", "url": f"http://127.0.0.1:{port}/hadash",
        "secret": SECRET, "min_severity": "info"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["has_secret"] is True and not made.get("secret")  # write-only
    return made


# --- helpers --------------------------------------------------------------------------


def cluster_hosts(system: System, cluster: str) -> list[dict]:
    return sorted((h for h in system.api.get("/hosts").json() if h["cluster"] == cluster),
                  key=lambda h: h["name"])


def running_ha(system: System, host: str) -> list[str]:
    return sorted(v["name"] for v in system.api.get("/vms", params={"host": host}).json()
                  if v["ha_enabled"] and v["state"] == "Running")


def pair(system: System, cluster: str) -> tuple[str, list[str], str]:
    """(the Up host of ``cluster`` with the most running HA VMs, those VMs, the other
    host of the cluster)."""
    hosts = [h["name"] for h in cluster_hosts(system, cluster) if h["status"] == "Up"]
    assert len(hosts) == 2, f"{cluster}: {hosts}"
    victim = max(hosts, key=lambda n: (len(running_ha(system, n)), n))
    ha = running_ha(system, victim)
    assert ha, f"no HA VM runs on {victim}"
    return victim, ha, next(n for n in hosts if n != victim)


def fault(system: System, do: str) -> None:
    r = system.control.post("/faults", json={"do": do})
    assert r.status_code == 200, r.text


def latest_alert_id(system: System) -> int:
    rows = system.api.get("/alerts", params={"limit": 1}).json()
    rows = rows.get("results", rows) if isinstance(rows, dict) else rows
    return max((a["id"] for a in rows), default=0)


def all_alerts(system: System) -> list[dict]:
    rows = system.api.get("/alerts", params={"limit": 500}).json()
    return rows.get("results", rows) if isinstance(rows, dict) else rows


def vms_back(system: System, victim: str, ha: list[str]) -> bool:
    vms = [system.api.get(f"/vms/{n}").json() for n in ha]
    return all(v["state"] == "Running" and v["host"] not in (victim, None) for v in vms)


def mark_loaded_once(page) -> float:
    return page.evaluate("() => { window.__hadashTestMark = 'loaded once';"
                         " return performance.timeOrigin; }")


def assert_not_reloaded(page, origin: float) -> None:
    assert page.evaluate("() => [window.__hadashTestMark, performance.timeOrigin]") == [
        "loaded once", origin], "the page was reloaded"


# --- tests --------------------------------------------------------------------------


def test_r19_host_failure_is_one_alert_critical_then_resolved_without_reload(
        admin, live, story, channel):
    victim, ha, spare = pair(live, "c1")
    before = latest_alert_id(live)
    page = admin.new_page()
    page.goto("/")
    wait_live(page)
    page.wait_for_selector("#alert-list")
    origin = mark_loaded_once(page)
    # Every refresh of the panel (alerts.js dispatches hadash:alerts with what it shows).
    page.evaluate("""() => {
        window.__panels = [];
        document.addEventListener('hadash:alerts', e => window.__panels.push(
          (e.detail.alerts || []).map(a => ({id: a.id, kind: a.kind, subject: a.subject,
            name: a.subject_name, incident: a.incident, severity: a.severity}))));
    }""")
    # The restart on the only other host of c1 fails once (retried after
    # restart.retry.interval): the incident stays open, declared, for a few seconds.
    fault(live, f"host {spare} start-fail 1")
    fault(live, f"host {victim} power off")
    story.update(victim=victim, ha=ha, alert_after=before)

    # Critical once declared (its row in the panel), for the victim's incident.
    row = page.wait_for_function(
        """victim => [...document.querySelectorAll(
              '#alert-list li.alert-row[data-incident][data-severity="critical"]')]
            .find(li => li.querySelector('.alert-title').textContent.includes(victim))""",
        arg=victim, timeout=LONG)
    incident = int(row.evaluate("li => li.dataset.incident"))
    alert_id = int(row.evaluate("li => li.dataset.alertId"))
    story.update(incident=incident, alert=alert_id)
    # Resolved by itself once the HA VMs run on the other host: the row goes away.
    wait_for(f"{ha} running on {spare}", lambda: vms_back(live, victim, ha), 90)
    page.wait_for_selector(f'#alert-list li.alert-row[data-incident="{incident}"]',
                           state="detached", timeout=LONG)
    assert_not_reloaded(page, origin)

    # Through it all the panel showed one alert about the victim or its VMs: the
    # incident's (the restarts, the failed start included, were not alerts of their own).
    panels = page.evaluate("() => window.__panels")
    assert panels, "the panel never refreshed"
    mine = {(a["id"], a["incident"]) for p in panels for a in p
            if a["name"] == victim or a["name"] in ha or a["incident"] == incident}
    assert mine == {(alert_id, incident)}, mine
    severities = [a["severity"] for p in panels for a in p if a["id"] == alert_id]
    assert "critical" in severities, severities
    # And so does the server: one alert since the failure, resolved; incident Resolved.
    new = [a for a in all_alerts(live) if a["id"] > before
           and (a["subject_name"] in [victim, *ha] or a["incident"] == incident)]
    assert [(a["id"], a["state"]) for a in new] == [(alert_id, "resolved")], new
    inc = live.api.get(f"/incidents/{incident}").json()
    assert inc["state"] == "Resolved", inc
    page.close()


def test_r20_webhook_receiver_gets_the_failure_signed(live, receiver, channel, story):
    if "incident" not in story:
        pytest.skip("needs the host failure of the test before")
    incident, alert_id = story["incident"], story["alert"]

    def for_incident():
        out = []
        for r in list(receiver.received):
            body = json.loads(r["body"])
            if (body.get("incident") or {}).get("id") == incident:
                out.append((r, body))
        return out if "resolved" in {b["transition"] for _, b in out} else None

    got = wait_for("the incident's resolved POST at the receiver", for_incident, 60)
    transitions = [b["transition"] for _, b in got]
    for wanted in ("opened", "declared", "resolved"):
        assert wanted in transitions, transitions
    keys = set()
    for r, body in got:
        h = r["headers"]
        assert r["path"] == "/hadash"
        assert h["content-type"].startswith("application/json")
        expected = "sha256=" + hmac.new(SECRET.encode(), r["body"], hashlib.sha256).hexdigest()
        assert hmac.compare_digest(expected, h.get("x-hadash-signature", "")), h
        # A signature made with another key does not match (the check can fail).
        other = "sha256=" + hmac.new(b"not-the-secret", r["body"], hashlib.sha256).hexdigest()
        assert not hmac.compare_digest(other, h["x-hadash-signature"])
        assert h["x-hadash-transition"] == body["transition"]
        assert body["source"] == "hadash" and body["alert"]["id"] == alert_id
        assert body["incident"]["host"] == story["victim"]
        keys.add(h["idempotency-key"])
    assert len(keys) == len(got), "two deliveries shared an idempotency key"
    by = {b["transition"]: b for _, b in got}
    assert by["declared"]["severity"] == "critical"
    assert by["opened"]["time"] <= by["declared"]["time"] <= by["resolved"]["time"]
    assert by["resolved"]["alert"]["state"] == "resolved"
    # The deliveries are on record as sent.
    sent = live.api.get("/deliveries", params={"channel": channel["id"], "limit": 100}).json()
    sent = sent.get("results", sent) if isinstance(sent, dict) else sent
    states = {d["transition"]: d["state"] for d in sent
              if d["transition"] in ("opened", "declared", "resolved")}
    assert set(states.values()) == {"sent"}, states


def test_r17_vm_page_header_follows_crash_and_restart_without_reload(admin, live, story):
    victim = story.get("victim")
    host, ha, _ = pair(live, "c2")
    vm = ha[0]
    page = admin.new_page()
    page.goto(f"/vms/{vm}")
    page.wait_for_selector('#vm-state[data-state="Running"]')
    assert page.get_attribute("#vm-power", "data-power") == "PowerOn"
    wait_live(page)
    origin = mark_loaded_once(page)
    # Every state / power state the header shows (old values too: a batch of events
    # may set the badge more than once before the observer runs).
    page.evaluate("""() => {
        const seen = window.__head = [];
        const now = () => {
          const s = document.getElementById('vm-state'), p = document.getElementById('vm-power');
          seen.push('state:' + (s && s.dataset.state), 'power:' + (p && p.dataset.power));
        };
        new MutationObserver(records => {
          for (const r of records) {
            const id = r.target.id;
            if (r.type === 'attributes' && (id === 'vm-state' || id === 'vm-power'))
              seen.push((id === 'vm-state' ? 'state:' : 'power:') + r.oldValue);
          }
          now();
        }).observe(document.body, {subtree: true, childList: true, attributes: true,
                                   attributeOldValue: true,
                                   attributeFilter: ['data-state', 'data-power']});
        now();
    }""")
    fault(live, f"vm {vm} crash")
    story["crashed"] = vm
    page.wait_for_function(
        "() => window.__head.some(v => v === 'power:PowerOff' || v === 'state:Stopped')",
        timeout=LONG)
    # Then Running again on the header: state, power state and host, without a reload.
    page.wait_for_selector('#vm-head #vm-state[data-state="Running"]', timeout=LONG)
    page.wait_for_selector('#vm-head #vm-power[data-power="PowerOn"]', timeout=WAIT)
    now = live.api.get(f"/vms/{vm}").json()
    assert now["state"] == "Running" and now["power_state"] == "PowerOn", now
    page.wait_for_selector(f'#vm-head-host[data-host="{now["host"]}"]')
    assert now["host"] != victim
    page.wait_for_timeout(2500)  # a late refresh must not bring a stale PowerOff back
    assert page.get_attribute("#vm-power", "data-power") == "PowerOn"
    assert page.get_attribute("#vm-state", "data-state") == "Running"
    seen = page.evaluate("() => window.__head")
    down = max(i for i, v in enumerate(seen) if v in ("power:PowerOff", "state:Stopped"))
    assert "state:Running" in seen[down:] and "power:PowerOn" in seen[down:], seen
    assert_not_reloaded(page, origin)
    # The restart is on the page's HA work, step by step.
    page.wait_for_selector('article.work-item[data-step="Done"]')
    page.close()


def _engine(live: System):
    return next(c for c in live.sup.children if c.name == "engine")


def stop_process_group(child) -> None:
    """As Supervisor.stop does for one child: SIGTERM (the engine loop hands its
    sweeper lease over within 3 s: hadash.ha.runtime), a grace, then SIGKILL whatever
    of its group is left (django-q's sentinel takes its time)."""
    os.killpg(child.proc.pid, signal.SIGTERM)
    try:
        child.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.proc.pid, signal.SIGKILL)
    wait_for(f"the {child.name} process group gone", lambda: not live_members(child.proc.pid),
             10, 0.1)


def test_r17_suspect_host_shown_before_it_is_declared_down(admin, live, story):
    """The engine process is stopped (as during an upgrade): a host that stops pinging
    is behind on ping, not investigated — `suspect`, with the words why — until an
    engine runs again and declares it Down."""
    crashed = story.get("crashed")
    hosts = [h["name"] for h in cluster_hosts(live, "c2") if h["status"] == "Up"]
    # The c2 host that does not run the VM of the test before (if it ran).
    target = next((n for n in hosts if crashed not in
                   [v["name"] for v in live.api.get("/vms", params={"host": n}).json()]),
                  hosts[-1])
    engine = _engine(live)
    stop_process_group(engine)
    story["stopped_engine"] = engine.name

    sim = admin.new_page()
    sim.goto("/fleet")
    sim.wait_for_selector(f'tr[data-sim-host="{target}"] [data-ha-status="up"]')
    fault(live, f"host {target} power off")
    # The Simulator page (polled) shows hadash's verdict-to-be: suspect.
    sim.wait_for_selector(f'tr[data-sim-host="{target}"] [data-ha-status="suspect"]',
                          timeout=LONG)
    page = admin.new_page()
    page.goto(f"/hosts/{target}")
    page.wait_for_selector('#host-ha-status [data-ha-status="suspect"]')
    assert page.get_attribute("#host-status", "data-status") == "Up"  # not declared
    reason = page.inner_text("#host-ha-status .hs-reason")
    assert "behind on ping" in reason and "verdict due" in reason, reason
    assert page.get_attribute("#host-ping", "data-behind") == "true"
    shoot(page, "host-suspect")
    hosts_page = admin.new_page()
    hosts_page.goto("/hosts")
    hosts_page.wait_for_selector(f'#host-list tr[data-host="{target}"][data-status="Up"]'
                                 ' [data-ha-status="suspect"]')
    hosts_page.close()
    # The overview's fleet map: the tile is visibly suspect, and says so in its name.
    overview = admin.new_page()
    overview.goto("/")
    tile = f'#fleet-map .tile[data-host="{target}"]'
    overview.wait_for_selector(f'{tile}.suspect.st-Up')
    assert "suspect: behind on ping" in overview.get_attribute(tile, "aria-label")
    assert live.api.get(f"/hosts/{target}").json()["status"] == "Up"

    # An engine runs again: investigated, declared Down — on the open page, live.
    wait_live(page)
    origin = mark_loaded_once(page)
    live.sup.manage("engine-2", "qcluster")
    page.wait_for_selector('#host-status[data-status="Down"]', timeout=LONG)
    page.wait_for_selector('#host-ha-status [data-ha-status="down"]', timeout=WAIT)
    assert_not_reloaded(page, origin)
    sim.wait_for_selector(f'tr[data-sim-host="{target}"] [data-ha-status="down"]')
    overview.wait_for_selector(f'{tile}.st-Down:not(.suspect)', timeout=LONG)
    overview.close()
    sim.close()
    page.close()


def test_r17_no_capacity_waiting_with_its_words_on_the_vm_page(admin, live, story):
    """Scenario 118 on the real system: the only other host of the cluster is
    disabled, so an HA VM of the failed host has nowhere to go."""
    victim, ha, spare = pair(live, "c3")
    r = live.api.post(f"/hosts/{spare}/disable")
    assert r.status_code == 200, r.text
    vm = ha[0]
    page = admin.new_page()
    page.goto(f"/vms/{vm}")
    page.wait_for_selector('#vm-state[data-state="Running"]')
    wait_live(page)
    origin = mark_loaded_once(page)
    fault(live, f"host {victim} power off")

    badge = ('#vm-ha-status .ha-status[data-ha-status="waiting"]'
             '[data-ha-cause="no-capacity"]')
    page.wait_for_selector(badge, timeout=LONG)
    assert page.inner_text(f"{badge} .badge").strip() == "waiting: no-capacity"
    words = page.inner_text(f"{badge} .hs-reason")
    assert f"no host has room for VM {vm}" in words, words
    assert "no Up, Enabled host in cluster c3" in words, words
    assert_not_reloaded(page, origin)
    shoot(page, "vm-waiting")
    assert live.api.get(f"/vms/{vm}").json()["state"] != "Running"

    # The operator makes room: the VM restarts there, and its page says so.
    r = live.api.post(f"/hosts/{spare}/enable")
    assert r.status_code == 200, r.text
    page.wait_for_selector('#vm-state[data-state="Running"]', timeout=LONG)
    page.wait_for_selector(f'#vm-head-host[data-host="{spare}"]', timeout=WAIT)
    page.wait_for_selector('#vm-ha-status .ha-status:not([data-ha-status="waiting"])',
                           timeout=WAIT)
    assert_not_reloaded(page, origin)
    page.close()


def test_list_notification_and_cluster_pages_show_the_fleet(admin, live, story, channel):
    page = admin.new_page()
    page.goto("/hosts")
    page.wait_for_selector("#host-list tr[data-host]")
    assert page.locator("#host-list tr[data-host]").count() == HOSTS
    if story.get("victim"):
        page.wait_for_selector(f'#host-list tr[data-host="{story["victim"]}"]'
                               '[data-status="Down"]')
    wait_live(page)
    shoot(page, "hosts")

    page.goto("/vms")
    page.wait_for_selector("#vm-list tr[data-vm]")
    assert int(page.get_attribute("#vms-count", "data-total")) == VMS
    wait_live(page)
    shoot(page, "vms")

    page.goto("/notifications")
    page.wait_for_selector(f'#channels-table tr[data-channel="{CHANNEL}"]')
    if story.get("incident"):
        page.wait_for_selector(f'#deliveries-table tr[data-channel="{CHANNEL}"]'
                               '[data-state="sent"]')
    wait_live(page)
    shoot(page, "notifications")

    page.goto("/clusters/c1")
    page.wait_for_selector("#plan-table tr[data-host]")
    names = page.locator("#plan-table tr[data-host]").evaluate_all(
        "rs => rs.map(r => r.dataset.host)")
    assert set(names) <= {h["name"] for h in cluster_hosts(live, "c1")}, names
    wait_live(page)
    shoot(page, "cluster")
    page.close()


def test_new_pages_fit_390_px_and_the_timeline_reads_in_lines(admin, live, story, channel):
    """Issue 10 item 7 on the pages of issues 10 and 11: at 390 px no page is wider than
    the screen (wide tables scroll in their panel), and the incident timeline's messages
    keep a readable width (they were one letter per line)."""
    page = admin.new_page()
    page.set_viewport_size({"width": 390, "height": 900})
    paths = ["/", "/hosts", "/vms", "/clusters", "/clusters/c1", "/ha-mode", "/notifications",
             "/incidents", "/config"]
    if story.get("incident"):
        paths.append(f"/incidents/{story['incident']}")
    if story.get("victim"):
        paths.append(f"/hosts/{story['victim']}")
    wide = {}
    for path in paths:
        page.goto(path)
        page.wait_for_selector("main, .main")
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > 390:
            wide[path] = width
    assert not wide, f"wider than 390 px: {wide}"
    if story.get("incident"):
        page.goto(f"/incidents/{story['incident']}")
        widths = page.locator("#incident-timeline .ev-msg").evaluate_all(
            "els => els.map(e => e.getBoundingClientRect().width)")
        assert widths and min(widths) > 200, widths
    page.close()


def test_no_process_crashed(live, story):
    """Up through all of it, but for the engine process stopped on purpose."""
    for c in live.sup.children:
        if c.name == story.get("stopped_engine"):
            continue
        assert c.proc.poll() is None, f"{c.name} exited with {c.proc.returncode}"
