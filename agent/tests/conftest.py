"""Fixtures of the hadash-agent tests; the helpers are in agenttest.py."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import pytest
from agenttest import AGENT_DIR, LIBVIRT, AgentProcess, Dom, agent_env, write_node


def pytest_collection_modifyitems(config, items):
    """Without libvirt-python the agent's tests are skipped, saying why — except under
    CI=true, where they run and fail (the set-up must install it)."""
    if LIBVIRT or os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        return
    skip = pytest.mark.skip(reason=(
        "libvirt-python is not installed (run scripts/setup as root, or apt-get install "
        "libvirt-dev pkg-config && .venv/bin/pip install libvirt-python)"))
    for item in items:
        if AGENT_DIR in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture
def supervisor():
    from hadash.supervisor import Supervisor

    sup = Supervisor(echo=bool(os.environ.get("HADASH_E2E_ECHO")), grace=8.0)
    try:
        yield sup
    finally:
        sup.stop()
        assert sup.leftovers() == [], "processes left running after stop"


@pytest.fixture
def make_agent(tmp_path, supervisor):
    """``make_agent(name, domains, server_url=…, enrolled=True, **settings)``: an agent
    process on its own test-driver host. ``enrolled`` pre-seeds its state file with a
    host token and server token (for tests without a server)."""
    from hadash.supervisor import free_port

    def make(name: str, domains: Iterable[Dom] = (), *, server_url: str | None = None,
             enrolled: bool = True, start: bool = True, **settings: str) -> AgentProcess:
        base = tmp_path / name
        base.mkdir(exist_ok=True)
        uri = write_node(base / "node.xml", domains)
        port = free_port()
        state_dir = base / "state"
        if server_url is None:
            server_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        if enrolled:
            state_dir.mkdir(mode=0o700, exist_ok=True)
            (state_dir / "state.json").write_text(json.dumps({
                "name": name, "server_url": server_url, "token": secrets.token_urlsafe(),
                "server_token": secrets.token_urlsafe(), "host_id": 1}))
            (state_dir / "state.json").chmod(0o600)
        env = agent_env(server_url=server_url, libvirt_uri=uri, port=port,
                        state_dir=state_dir, name=name, **settings)
        agent = AgentProcess(supervisor, name, env, port, state_dir)
        agent.disk_dir = base
        return agent.start() if start else agent

    return make
