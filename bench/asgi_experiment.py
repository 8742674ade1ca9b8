"""hadash's ASGI application with proposed ingestion changes applied at start-up, so
``bench ping --experiment …`` can measure a change before anyone edits the code.
Each experiment is the reference implementation of a proposal in docs/benchmarks.md.

    HADASH_BENCH_EXPERIMENTS=any,dispatch,nolayer   (comma-separated)

The three experiments measured in docs/benchmarks.md §1 are now the production code,
so they change nothing any more; their names are still accepted so the commands
recorded there still run (they now measure the code as it is):

* ``any`` (P1) — ``hosts.agent.ingest.apply_batch`` writes the steady path's
  statements with one array parameter each on PostgreSQL (``= ANY(%s)``, ``unnest``).
* ``dispatch`` (P2) — ``AgentPingConsumer.dispatch`` skips Channels'
  ``aclose_old_connections()`` for ``websocket.receive``.
* ``nolayer`` (P4) — ``AgentPingConsumer.channel_layer_alias`` names an alias that is
  never configured, so agent sockets get no channel layer.

A new experiment goes here as a function that patches the code at import time, named
in ``KNOWN`` and applied below when its name is in ``HADASH_BENCH_EXPERIMENTS`` (the
``bench`` command's ``--experiment`` choices list the names too).
"""

from __future__ import annotations

import os
import sys

from hadash.asgi import application  # noqa: F401  (sets Django up)

EXPERIMENTS = {e.strip() for e in os.environ.get("HADASH_BENCH_EXPERIMENTS", "").split(",")
               if e.strip()}
ADOPTED = {"any": "P1", "dispatch": "P2", "nolayer": "P4"}  # now in hosts.agent
KNOWN = set(ADOPTED)

if EXPERIMENTS - KNOWN:
    raise RuntimeError(f"unknown experiment(s) {sorted(EXPERIMENTS - KNOWN)}; known: "
                       f"{sorted(KNOWN)}")

if EXPERIMENTS & set(ADOPTED):
    print("bench.asgi_experiment: "
          + ", ".join(f"'{e}' ({ADOPTED[e]})" for e in sorted(EXPERIMENTS & set(ADOPTED)))
          + " is the production code now; nothing to apply", file=sys.stderr)
