"""The simulator's control API is not open to whoever can reach it (issue 8, part 5):
a token (the demo prints it, the dashboard proxy sends it), JSON only, and Host/Origin
checked — so a web page open in the operator's browser cannot inject faults
cross-origin. Everything over real HTTP against a running simulator (on a thread, and
one `manage.py simulate` process)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from dashboard import fleetproxy
from fleet.simulator import Options, SimulatorThread

ROOT = Path(__file__).resolve().parents[2]
FAULT = {"do": "host kvm-001 power off"}


@pytest.fixture
def sim(monkeypatch):
    monkeypatch.setenv("HADASH_FLEET_TOKEN", "control-token-for-this-test")
    opts = Options(listen_port=0, agents=False, hosts=2, vms=4, status_interval=0, seed=1)
    with SimulatorThread(opts) as st:
        yield st


def auth(token: str = "control-token-for-this-test") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def faults_applied(st) -> int:
    return st.call(lambda: st.sim.health()["faults"])


def powered(st, name: str = "kvm-001") -> bool:
    return st.call(lambda: st.sim.fleet.hosts[name].powered)


def test_token_is_required_for_every_control_call(sim):
    for method, path in [("GET", "/control/health"), ("GET", "/control/hosts"),
                         ("GET", "/control/hosts/kvm-001"), ("POST", "/control/faults")]:
        for headers in ({}, auth("wrong"), {"Authorization": "Basic Zm9vOmJhcg=="}):
            r = httpx.request(method, sim.url + path, json=FAULT if method == "POST" else None,
                              headers=headers, timeout=5)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert "control token" in r.json()["error"]
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert faults_applied(sim) == 0 and powered(sim)
    # With the token everything works.
    assert httpx.get(sim.url + "/control/health", headers=auth(), timeout=5).json()["ok"]
    r = httpx.post(sim.url + "/control/faults", json=FAULT, headers=auth(), timeout=5)
    assert r.status_code == 200, r.text
    assert not powered(sim) and faults_applied(sim) == 1


def test_only_json_bodies_are_accepted(sim):
    for content_type, body in [("application/x-www-form-urlencoded", b"do=host+kvm-001+power+off"),
                               ("text/plain", b'{"do": "host kvm-001 power off"}'),
                               ("multipart/form-data; boundary=x", b"--x--")]:
        r = httpx.post(sim.url + "/control/faults", content=body, timeout=5,
                       headers={**auth(), "Content-Type": content_type})
        assert r.status_code == 415, (content_type, r.text)
        assert "application/json" in r.json()["error"]
    assert faults_applied(sim) == 0 and powered(sim)


def test_a_cross_origin_form_post_is_refused(sim):
    """What a hostile page can make the operator's browser send: a form POST (no
    preflight) with its own Origin. Refused, even if it somehow had the token."""
    form = {"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"}
    for headers in (form, {**form, **auth()}, {"Origin": "http://evil.example", **auth()},
                    {"Origin": "null", **auth()},
                    # the dashboard's own page is another origin too (it uses the proxy)
                    {"Origin": "http://127.0.0.1:8000", **auth()}):
        r = httpx.post(sim.url + "/control/faults", content=b"do=host+kvm-001+power+off",
                       headers=headers, timeout=5)
        assert r.status_code == 403, (headers, r.text)
        assert "origin" in r.json()["error"]
    r = httpx.get(sim.url + "/control/hosts", timeout=5,
                  headers={"Origin": "http://evil.example", **auth()})
    assert r.status_code == 403
    assert faults_applied(sim) == 0 and powered(sim)
    # The simulator's own origin is not foreign.
    r = httpx.post(sim.url + "/control/faults", json=FAULT, timeout=5,
                   headers={"Origin": sim.url, **auth()})
    assert r.status_code == 200, r.text


def test_a_foreign_host_header_is_refused(sim):
    """DNS rebinding: a hostile name resolving to 127.0.0.1 makes the browser's requests
    same-origin to that name, but they carry its Host."""
    for host in ("evil.example", f"evil.example:{sim.sim.port}", "10.1.2.3", ""):
        r = httpx.post(sim.url + "/control/faults", json=FAULT, timeout=5,
                       headers={"Host": host, **auth()})
        assert r.status_code == 400, (host, r.text)
        assert "Host" in r.json()["error"]
    assert faults_applied(sim) == 0 and powered(sim)
    for host in (f"localhost:{sim.sim.port}", f"127.0.0.1:{sim.sim.port}", "127.0.0.2"):
        r = httpx.get(sim.url + "/control/health", timeout=5, headers={"Host": host, **auth()})
        assert r.status_code == 200, (host, r.text)


def test_advertised_host_is_accepted():
    opts = Options(listen_port=0, agents=False, hosts=1, vms=0, status_interval=0,
                   advertise="http://sim.example:9100")
    with SimulatorThread(opts) as st:
        token = st.sim.control_token
        r = httpx.get(f"http://127.0.0.1:{st.sim.port}/control/health", timeout=5,
                      headers={"Host": "sim.example:9100", **auth(token)})
        assert r.status_code == 200, r.text


def test_without_a_configured_token_one_is_made_up(monkeypatch):
    monkeypatch.delenv("HADASH_FLEET_TOKEN", raising=False)
    opts = Options(listen_port=0, agents=False, hosts=1, vms=0, status_interval=0)
    with SimulatorThread(opts) as st:
        token = st.sim.control_token
        assert len(token) >= 32
        assert httpx.get(st.url + "/control/health", timeout=5).status_code == 401
        r = httpx.get(st.url + "/control/health", headers=auth(token), timeout=5)
        assert r.status_code == 200
    with SimulatorThread(opts) as other:
        assert other.sim.control_token != token


def test_simulate_command_and_dashboard_proxy_send_the_token(sim, settings, monkeypatch):
    # `manage.py simulate fault|status`: --token, else $HADASH_FLEET_TOKEN.
    call_command("simulate", "fault", "host kvm-002 power off", control=sim.url)
    assert not powered(sim, "kvm-002")
    with pytest.raises(CommandError, match="refused the control token"):
        call_command("simulate", "status", control=sim.url, token="wrong")
    monkeypatch.delenv("HADASH_FLEET_TOKEN")
    settings.HADASH_FLEET_TOKEN = ""
    with pytest.raises(CommandError, match="refused the control token"):
        call_command("simulate", "fault", "host kvm-001 power off", control=sim.url)
    assert powered(sim)
    call_command("simulate", "fault", "host kvm-001 power off", control=sim.url,
                 token="control-token-for-this-test")
    assert not powered(sim)

    # The dashboard's proxy (the Simulator page) sends settings.HADASH_FLEET_TOKEN.
    settings.HADASH_FLEET_URL = sim.url
    settings.HADASH_FLEET_TOKEN = "wrong"
    with pytest.raises(fleetproxy.FleetError, match="HADASH_FLEET_TOKEN"):
        fleetproxy.hosts()
    settings.HADASH_FLEET_TOKEN = "control-token-for-this-test"
    assert [h["name"] for h in fleetproxy.hosts()] == ["kvm-001", "kvm-002"]
    assert fleetproxy.fault("host kvm-001 power on")["ok"] is True
    assert powered(sim)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_simulator_process_takes_its_token_from_the_environment(tmp_path):
    """`manage.py simulate` as the demo runs it: HADASH_FLEET_TOKEN in its environment
    is the control token; nothing else gets in."""
    port = free_port()
    env = {**os.environ, "HADASH_FLEET_TOKEN": "token-of-the-process", "HADASH_VAR_DIR":
           str(tmp_path)}
    log = (tmp_path / "sim.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "simulate", "--server",
         f"http://127.0.0.1:{free_port()}", "--listen", f"127.0.0.1:{port}", "--hosts", "2",
         "--vms", "0", "--status-interval", "0"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/control"
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    (tmp_path / "sim.log").read_text())
                time.sleep(0.2)
        assert r.status_code == 401
        r = httpx.post(url + "/faults", json=FAULT, timeout=5,
                       headers={"Origin": "http://evil.example",
                                **auth("token-of-the-process")})
        assert r.status_code == 403
        r = httpx.post(url + "/faults", json=FAULT, headers=auth("token-of-the-process"),
                       timeout=5)
        assert r.status_code == 200 and r.json()["hosts"][0]["powered"] is False
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
