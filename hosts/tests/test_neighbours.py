"""R4 Neighbour investigator: the host's neighbours are asked at once, not one after
another (each real neighbour probes the host itself before answering, waiting up to its
peer_timeout for a dead one: asked in turn, five neighbours cost five waits). Driven on
the simulated fleet; the neighbours' answers are held back where a test needs to
decide the order in which they come."""

import threading

import pytest

from fleet.sim import SimAgentClient
from fleet.testing import world
from hadash import config
from hosts.choices import Verdict
from hosts.investigators import neighbour
from hosts.models import Host

pytestmark = pytest.mark.django_db

SAFETY = 30.0  # no test waits this long unless the investigator is broken


class HeldNeighbours(SimAgentClient):
    """The simulated agents, with check-on-host answers that wait for ``hold[name]``
    (a callable) before answering."""

    def __init__(self, fleet, hold):
        super().__init__(fleet)
        self.hold = hold

    def check_on_host(self, neighbour, target):
        wait = self.hold.get(neighbour.name)
        if wait is not None:
            wait()
        return super().check_on_host(neighbour, target)


def ask(w, agents):
    engine = w.engine
    engine.agents = agents
    return neighbour(engine, Host.objects.get(name="h1"), now=w.clock.now(),
                     cfg=config.snapshot())


@pytest.fixture
def three_neighbours():
    w = world({"hosts": {"h1": {}, "h2": {}, "h3": {}, "h4": {}}})
    w.advance_to(5)
    w.apply("host h1 power off")
    return w


def test_neighbours_are_asked_at_once(three_neighbours):
    """Each neighbour answers only once all three were asked: asked in turn, the first
    would wait for the others forever (here: until SAFETY, then cannot tell)."""
    w = three_neighbours
    everyone = threading.Barrier(3)

    def together():
        everyone.wait(SAFETY)

    agents = HeldNeighbours(w.fleet, {n: together for n in ("h2", "h3", "h4")})
    assert ask(w, agents) == Verdict.DEAD
    asked = {c[1] for c in w.fleet.calls if c[0] == "check-on-host" and c[2] == "h1"}
    assert asked == {"h2", "h3", "h4"}


def test_a_silent_neighbour_does_not_hold_up_the_verdict(three_neighbours):
    """Two neighbours see h1 dead; the third has not answered when the verdict is in
    (Dead): it is not waited for."""
    w = three_neighbours
    release = threading.Event()
    agents = HeldNeighbours(w.fleet, {"h4": lambda: release.wait(SAFETY)})
    try:
        verdict = ask(w, agents)
        still_silent = not release.is_set() and not any(
            c[:2] == ("check-on-host", "h4") for c in w.fleet.calls)
    finally:
        release.set()
    assert verdict == Verdict.DEAD
    assert still_silent


def test_any_neighbour_seeing_the_host_alive_wins(three_neighbours):
    """R4: any neighbour says alive → Alive, whatever the others say (h1's agent is
    stopped, the machine runs: a neighbour that cannot reach it says dead)."""
    w = three_neighbours
    w.apply("host h1 power on")
    w.apply("host h1 agent stop")

    class OneBlind(SimAgentClient):
        def check_on_host(self, n, target):
            if n.name == "h2":
                self.fleet.calls.append(("check-on-host", n.name, target.name))
                return False
            return super().check_on_host(n, target)

    assert ask(w, OneBlind(w.fleet)) == Verdict.ALIVE
