"""``hadash-agent``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from . import AGENT_NAME, __version__
from .config import ConfigError, load

log = logging.getLogger("hadash_agent")


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps every line; elsewhere we do.
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=AGENT_NAME, description="hadash host agent for KVM hypervisors (libvirt)")
    parser.add_argument("--config", "-c", help="configuration file (default "
                        "$HADASH_AGENT_CONFIG or /etc/hadash-agent/agent.toml)")
    parser.add_argument("--check-config", action="store_true",
                        help="print the effective configuration (without secrets) and exit")
    parser.add_argument("--version", action="version", version=f"{AGENT_NAME} {__version__}")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"{AGENT_NAME}: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        for key, value in sorted(vars(cfg).items()):
            shown = "(set)" if key == "join_key" and value else value
            print(f"{key} = {shown!r}")
        return 0
    setup_logging(cfg.log_level)
    try:
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        if not os.access(cfg.state_dir, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as exc:
        log.error("state directory %s cannot be used (%s)", cfg.state_dir, exc)
        return 2

    from .agent import Agent

    agent = Agent(cfg)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        await agent.run()

    try:
        asyncio.run(run())
    except OSError as exc:  # e.g. the listen address is taken
        log.error("cannot run: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
