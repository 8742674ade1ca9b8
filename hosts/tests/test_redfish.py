"""RedfishClient against a real Redfish BMC: sushy-emulator (fake driver) as a subprocess.

The fake driver applies a power change 1–11 s after the Reset ("hardware actions are
not immediate"), so ``power_off`` must poll until the BMC reports Off. The polling and
normalisation details are also checked without waiting, through an httpx MockTransport.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from hosts.models import Host
from hosts.redfish import RedfishClient, normalise_power_state

USER, PASSWORD = "admin", "s3cret"


def _emulator_executable() -> str | None:
    beside_python = Path(sys.executable).with_name("sushy-emulator")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("sushy-emulator")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bmc:
    def __init__(self, url: str, systems: dict[str, str]):
        self.url = url
        self.systems = systems  # name → uuid

    def host(self, system: str, **kwargs) -> Host:
        fields = {
            "name": f"host-{system}",
            "oobm_enabled": True,
            "oobm_address": self.url,
            "oobm_system_id": self.systems.get(system, system),
            "oobm_username": USER,
            "oobm_password": PASSWORD,
        }
        fields.update(kwargs)
        return Host(**fields)


def _write_config(workdir: Path, systems: dict[str, tuple[str, str]]) -> Path:
    import bcrypt  # a sushy-tools dependency

    htpasswd = workdir / "htpasswd"
    digest = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"{USER}:{digest}\n")
    fake_systems = [
        {
            "uuid": system_uuid,
            "name": name,
            "power_state": power,
            "nics": [{"mac": f"00:5c:52:31:3a:{i:02x}", "ip": f"172.22.0.{100 + i}"}],
        }
        for i, (name, (system_uuid, power)) in enumerate(systems.items())
    ]
    config = workdir / "emulator.conf"
    config.write_text(
        "SUSHY_EMULATOR_FAKE_DRIVER = True\n"
        f"SUSHY_EMULATOR_FAKE_SYSTEMS = {json.dumps(fake_systems)}\n"
        # Keep the driver's persistent state private to this run (default: /tmp).
        f"SUSHY_EMULATOR_STATE_DIR = {str(workdir / 'state')!r}\n"
        f"SUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}\n"
    )
    return config


def _wait_ready(proc: subprocess.Popen, url: str, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"{url}/redfish/v1/", timeout=1.0, trust_env=False).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def bmc(tmp_path_factory):
    exe = _emulator_executable()
    if exe is None:
        pytest.skip("sushy-emulator is not installed (pip install sushy-tools)")
    workdir = tmp_path_factory.mktemp("sushy")
    systems = {
        "bmc-h1": (str(uuid.uuid4()), "On"),
        "bmc-h2": (str(uuid.uuid4()), "Off"),
        "bmc-h3": (str(uuid.uuid4()), "On"),
        "bmc-h4": (str(uuid.uuid4()), "On"),
        "bmc-h5": (str(uuid.uuid4()), "Off"),
    }
    config = _write_config(workdir, systems)
    log_path = workdir / "emulator.log"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    for _attempt in range(3):  # the free port may be taken meanwhile: try another
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [exe, "--fake", "--interface", "127.0.0.1", "--port", str(port),
                 "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        try:
            ready = _wait_ready(proc, url, time.monotonic() + 30)
        except BaseException:
            _stop(proc)
            raise
        if ready:
            break
        _stop(proc)
    else:
        pytest.fail(f"sushy-emulator did not start:\n{log_path.read_text()[-3000:]}")
    try:
        yield Bmc(url, {name: u for name, (u, _power) in systems.items()})
    finally:
        _stop(proc)


@pytest.fixture
def redfish():
    client = RedfishClient(confirm_timeout=20.0, poll_interval=0.5, read_timeout=5.0)
    yield client
    client.close()


# --- against sushy-emulator ----------------------------------------------------------

def test_power_state_on_and_off(bmc, redfish):
    assert redfish.power_state(bmc.host("bmc-h1")) == "On"
    assert redfish.power_state(bmc.host("bmc-h2")) == "Off"


def test_power_state_by_name_follows_the_redirect(bmc, redfish):
    # sushy-emulator answers a system addressed by name with a 307 to its uuid.
    host = bmc.host("bmc-h2", oobm_system_id="bmc-h2")
    assert redfish.power_state(host) == "Off"


def test_service_root_in_address_and_trailing_slash(bmc, redfish):
    host = bmc.host("bmc-h2", oobm_address=bmc.url + "/redfish/v1/")
    assert redfish.power_state(host) == "Off"


@pytest.mark.slow  # the emulator applies the power change 1–11 s later
def test_power_off_confirms_off(bmc, redfish):
    host = bmc.host("bmc-h1")
    assert redfish.power_state(host) == "On"
    started = time.monotonic()
    assert redfish.power_off(host) is True
    assert time.monotonic() - started < 20.0
    assert redfish.power_state(host) == "Off"
    # Fencing a host that is already off succeeds at once.
    assert redfish.power_off(host) is True


def test_power_off_not_confirmed_in_time_is_false(bmc):
    # The emulator applies the change at least one second later: a zero wait cannot
    # see it, so the fence must not be reported as done.
    with RedfishClient(confirm_timeout=0.0) as impatient:
        assert impatient.power_off(bmc.host("bmc-h3")) is False


def test_power_on_is_accepted(bmc, redfish):
    assert redfish.power_on(bmc.host("bmc-h5")) is True


def test_wrong_credentials_and_system_id(bmc, redfish):
    assert redfish.power_state(bmc.host("bmc-h4", oobm_password="wrong")) is None
    assert redfish.power_off(bmc.host("bmc-h4", oobm_password="wrong")) is False
    assert redfish.power_state(bmc.host("bmc-h4", oobm_username="")) is None
    assert redfish.power_state(bmc.host("no-such-system")) is None
    assert redfish.power_off(bmc.host("no-such-system")) is False
    assert redfish.power_state(bmc.host("bmc-h4")) == "On"  # untouched


@pytest.mark.django_db
def test_saved_host(bmc, redfish):
    bmc.host("bmc-h4").save()
    host = Host.objects.get(name="host-bmc-h4")
    assert redfish.power_state(host) == "On"


# --- without a BMC ------------------------------------------------------------------

def test_unreachable_bmc_fails_fast(redfish):
    host = Host(
        name="h1", oobm_enabled=True, oobm_address=f"http://127.0.0.1:{free_port()}",
        oobm_system_id="1", oobm_username=USER, oobm_password=PASSWORD,
    )
    started = time.monotonic()
    assert redfish.power_state(host) is None
    assert redfish.power_off(host) is False
    assert time.monotonic() - started < 3.0


def _no_requests(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"unexpected request {request.method} {request.url}")


@pytest.mark.parametrize(
    "fields",
    [
        {"oobm_enabled": False, "oobm_address": "http://bmc", "oobm_system_id": "1"},
        {"oobm_enabled": True, "oobm_address": "", "oobm_system_id": "1"},
        {"oobm_enabled": True, "oobm_address": "http://bmc", "oobm_system_id": ""},
    ],
)
def test_disabled_or_unconfigured_makes_no_request(fields):
    host = Host(name="h1", **fields)
    with RedfishClient(transport=httpx.MockTransport(_no_requests)) as client:
        assert client.power_state(host) is None
        assert client.power_off(host) is False
        assert client.power_on(host) is False


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _scripted_bmc(states: list[str], reset_status: int = 204):
    """A MockTransport BMC reporting ``states`` in turn (the last one sticks)."""
    seen: list[tuple[str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.content))
        if request.method == "POST":
            return httpx.Response(reset_status)
        state = states.pop(0) if len(states) > 1 else states[0]
        return httpx.Response(200, json={"Id": "1", "PowerState": state})

    return httpx.MockTransport(handler), seen


def _oob_host() -> Host:
    return Host(name="h1", oobm_enabled=True, oobm_address="bmc.example:8443",
                oobm_system_id="System.Embedded.1")


def test_power_off_polls_through_powering_off():
    transport, seen = _scripted_bmc(["On", "On", "PoweringOff", "PoweringOff", "Off"])
    clock = FakeClock()
    with RedfishClient(transport=transport, sleep=clock.sleep,
                       monotonic=clock.monotonic) as client:
        assert client.power_off(_oob_host()) is True
    assert seen[1] == (
        "POST",
        "/redfish/v1/Systems/System.Embedded.1/Actions/ComputerSystem.Reset",
        b'{"ResetType":"ForceOff"}',
    )
    assert clock.sleeps == [0.5, 0.5, 0.5]


def test_power_off_gives_up_after_confirm_timeout():
    transport, _seen = _scripted_bmc(["On"])
    clock = FakeClock()
    with RedfishClient(transport=transport, confirm_timeout=3.0, sleep=clock.sleep,
                       monotonic=clock.monotonic) as client:
        assert client.power_off(_oob_host()) is False
    assert sum(clock.sleeps) == pytest.approx(3.0)


def test_reset_refused_counts_only_if_already_off():
    transport, _seen = _scripted_bmc(["On"], reset_status=409)
    with RedfishClient(transport=transport) as client:
        assert client.power_off(_oob_host()) is False


def test_address_without_scheme_is_https():
    assert RedfishClient.system_url(_oob_host()) == (
        "https://bmc.example:8443/redfish/v1/Systems/System.Embedded.1"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("On", "On"), ("Off", "Off"), ("off", "Off"), ("PoweringOff", None),
     ("PoweringOn", None), ("Paused", None), (None, None), (1, None)],
)
def test_normalise_power_state(raw, expected):
    assert normalise_power_state(raw) == expected
