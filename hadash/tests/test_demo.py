"""`manage.py demo` (issue 3): what its banner tells a newcomer to try must show HA at
work."""

from fleet.simulator import demo_fleet
from hadash.management.commands.demo import Command


def test_suggested_fault_powers_off_a_host_that_runs_ha_vms():
    """The banner's example fault (`host H power off`) names a host with HA-enabled
    VMs, so following it shows VMs restarted elsewhere (R5/R12) — not just a host
    going Down with nothing to restart."""
    o = {"hosts": 20, "vms": 200, "ha_ratio": 0.5}
    victim = Command.host_with_ha_vms(o)
    fleet = demo_fleet(**o)
    on_victim = [s for s in fleet.vm_specs.values() if s.home == victim]
    assert on_victim and any(s.ha_enabled for s in on_victim)
    # No HA VMs at all: still a real host to name.
    assert Command.host_with_ha_vms({**o, "ha_ratio": 0.0}) in fleet.hosts


def test_banner_shows_the_control_token_and_where_the_secrets_are(settings, tmp_path):
    """Issue 8, part 5: the demo prints the simulator's control token; the suggested
    `simulate fault` needs no token typed when it is the settings' (var/secrets.env),
    and says how to pass it otherwise."""
    from io import StringIO

    settings.SECRETS_FILE = tmp_path / "secrets.env"
    settings.SECRETS_FILE.write_text("SECRET_KEY=x\n")
    o = {"hosts": 4, "vms": 8, "ha_ratio": 0.5, "no_fleet": False, "username": "admin"}

    def banner(token: str) -> str:
        cmd = Command(stdout=StringIO())
        cmd.banner("http://127.0.0.1:8000", "http://127.0.0.1:9100", o, "pw", "hd_x", token)
        return cmd.stdout.getvalue()

    settings.HADASH_FLEET_TOKEN = "the-settings-token"
    out = banner("the-settings-token")
    assert "simulator control token  the-settings-token" in out
    assert str(settings.SECRETS_FILE) in out
    assert "HADASH_FLEET_TOKEN=" not in out
    out = banner("made-for-this-run")
    assert "HADASH_FLEET_TOKEN=made-for-this-run .venv/bin/python manage.py simulate fault" in out
