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

The bare ceiling (``bench ping`` always serves this application): besides hadash's own
routes, ``/bench/bare/ws`` is a bare Channels ``AsyncWebsocketConsumer`` that accepts any
socket and answers every message with the pong an agent gets
(``{"type": "pong", "ping_interval": N}``), touching neither the database nor the
message — the most a Channels consumer on this daphne can answer, measured in the same
run as the real endpoint. Like the agent consumer it has no channel layer and skips
Channels' per-message database clean-up (the two costs hadash's consumer already
avoids), so ``real ÷ bare`` is the share of the Channels ceiling that hadash's own
per-ping work leaves. This route exists only here, never in ``hadash.routing``.

A new experiment goes here as a function that patches the code at import time, named
in ``KNOWN`` and applied below when its name is in ``HADASH_BENCH_EXPERIMENTS`` (the
``bench`` command's ``--experiment`` choices list the names too).
"""

from __future__ import annotations

import json
import os
import sys

from channels.generic.websocket import AsyncWebsocketConsumer
from channels.routing import URLRouter
from django.urls import path

from bench.loadgen import BARE_PATH
from hadash.asgi import application as hadash_application  # sets Django up
from hosts.agent.consumers import NO_CHANNEL_LAYER

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


class BareConsumer(AsyncWebsocketConsumer):
    """Accepts the socket; answers every message with a pong, nothing else."""

    channel_layer_alias = NO_CHANNEL_LAYER
    pong = json.dumps({"type": "pong", "ping_interval": 2})

    async def dispatch(self, message) -> None:
        # no aclose_old_connections(): this consumer never touches the database
        handler = getattr(self, message["type"].replace(".", "_"))
        await handler(message)

    async def receive(self, text_data=None, bytes_data=None) -> None:
        await self.send(text_data=self.pong)


_bare = URLRouter([path(BARE_PATH.lstrip("/"), BareConsumer.as_asgi())])


async def application(scope, receive, send):
    """hadash.asgi.application, plus the bare ceiling's route."""
    if scope["type"] == "websocket" and scope.get("path") == BARE_PATH:
        return await _bare(scope, receive, send)
    return await hadash_application(scope, receive, send)
