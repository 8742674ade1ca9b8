"""R21 "the same values from every process": two real daphne processes on one
database serve the same /metrics, including a counter another process counted."""

from __future__ import annotations

import os

import httpx
import pytest

from hadash.supervisor import Supervisor, daphne_argv, free_port, wait_for_port
from tests.conftest import fresh_database, manage

pytestmark = pytest.mark.e2e


def test_r21_two_web_processes_serve_the_same_metrics(tmp_path):
    with fresh_database(tmp_path, "met") as url:
        env = {**os.environ, "DATABASE_URL": url, "HADASH_VAR_DIR": str(tmp_path),
               "HADASH_METRICS_TOKEN": "metrics-test-token"}
        env.pop("CI", None)
        manage(env, "migrate", "--noinput", "-v0")
        # A third process counts (as ingestion does, in its own transaction).
        manage(env, "shell", "-c",
               "from metrics.counters import inc; inc('pings_ingested', 7); "
               "inc('fences', outcome='failed')")
        sup = Supervisor(echo=False, grace=5.0, base_env=env)
        try:
            ports = [free_port(), free_port()]
            for i, port in enumerate(ports):
                web = sup.python(f"web{i}", *daphne_argv(port))
                wait_for_port(port, proc=web.proc, timeout=60)
            texts = []
            for port in ports:
                r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10,
                              headers={"Authorization": "Bearer metrics-test-token"})
                assert r.status_code == 200, r.text
                texts.append(r.text)
                refused = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10,
                                    headers={"Authorization": "Bearer nope"})
                assert refused.status_code == 401
        finally:
            sup.stop()
        assert sup.leftovers() == []
    assert texts[0] == texts[1]
    assert "hadash_pings_ingested_total 7.0" in texts[0]
    assert 'hadash_fences_total{outcome="failed"} 1.0' in texts[0]
