"""The agent's configuration: a small TOML file, overridden by the environment.

Every setting ``foo_bar`` may be given in the file (``foo_bar = …``, top level or in an
``[agent]`` table) or as the environment variable ``HADASH_AGENT_FOO_BAR``; the
environment wins. ``server_url`` is the only setting without a default. See
docs/agent.md and packaging/agent.toml.example.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

ENV_PREFIX = "HADASH_AGENT_"
DEFAULT_CONFIG_FILE = "/etc/hadash-agent/agent.toml"
DEFAULT_PORT = 8250

# The names hadash accepts for hosts and VMs (hadash/names.py, which the agent cannot
# import): 1 to 255 ASCII letters, digits, '.', '_' or '-', starting with a letter or
# digit. A report naming anything else would be refused as a whole.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
NAME_RULE = (
    "1 to 255 characters: ASCII letters, digits, '.', '_' and '-', "
    "starting with a letter or digit"
)


class ConfigError(ValueError):
    """A setting the agent cannot work with; the message names it."""


@dataclass
class Config:
    server_url: str = ""
    # The server's join key: needed for the first enrolment (and a re-enrolment) only.
    join_key: str = ""
    libvirt_uri: str = "qemu:///system"
    # Where the agent's HTTP server listens for the server's calls (host:port).
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    # The URL the server calls this agent at; default http://<address>:<listen port>.
    agent_url: str = ""
    # This host's address as other hosts reach it; default: the address this host uses
    # to reach the server.
    address: str = ""
    name: str = ""  # default: the hostname
    cluster: str = "default"
    hypervisor: str = "KVM"
    state_dir: str = "/var/lib/hadash-agent"
    # Libvirt URI other hosts' libvirt migrates domains to (peer-to-peer), e.g.
    # qemu+tls://kvm-01.example/system. Empty: this host accepts no migrations.
    migration_uri: str = ""
    # Optional hypervisor data URI for the migration stream, e.g. tcp://10.0.0.11.
    migration_data_uri: str = ""
    # The port other hosts' agents listen on (for check-on-host); default: ours.
    peer_port: int = 0
    peer_timeout: float = 3.0
    # How long a graceful stop (force false) waits for the guest to power off.
    stop_timeout: float = 60.0
    # Back-off when the server cannot be reached: 1 s doubling to this cap, with jitter.
    backoff_max: float = 30.0
    # Retry period when the server refuses us (401/409): an operator has to act.
    refused_retry: float = 60.0
    # Until the server says otherwise (ping.interval), report this often.
    ping_interval: float = 10.0
    # Definitions are re-read on libvirt events and at least this often.
    definition_check_interval: float = 60.0
    # Say goodbye (POST /disconnect) on SIGTERM: the host goes Disconnected and is not
    # investigated (R7). Off by default: a host shut down then is protected by HA.
    goodbye_on_stop: bool = False
    # Test-only endpoints (/test/…) that act behind hadash's back. Never in production.
    test_hooks: bool = False
    log_level: str = "INFO"

    # --- derived ---------------------------------------------------------------
    @property
    def listen_host(self) -> str:
        return split_host_port(self.listen, "listen")[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.listen, "listen")[1]

    @property
    def effective_peer_port(self) -> int:
        if self.peer_port:
            return self.peer_port
        port = urlsplit(self.agent_url).port if self.agent_url else None
        return port or self.listen_port

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) / "state.json"


BOOL_TRUE = {"1", "true", "yes", "on"}
BOOL_FALSE = {"0", "false", "no", "off", ""}


def _coerce(name: str, kind: type, value: object, source: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOL_TRUE | BOOL_FALSE:
            return value.strip().lower() in BOOL_TRUE
        raise ConfigError(f"{name} ({source}) must be true or false, not {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} ({source}) must be a number, not {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} ({source}) must be a number, not {value!r}") from None
        if number < 0:
            raise ConfigError(f"{name} ({source}) must not be negative, not {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{name} ({source}) must be a string, not {value!r}")
    return value.strip()


def split_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} must be host:port, not {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _check_url(name: str, value: str) -> None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 — raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL: {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL, not {value!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(f"{name} must not carry a user, query or fragment: {value!r}")


def route_address(server_url: str) -> str:
    """The local address this host uses to reach the server (no packet is sent)."""
    parts = urlsplit(server_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        info = socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP)[0]
        with socket.socket(info[0], socket.SOCK_DGRAM) as s:
            s.connect(info[4])
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def url_host(address: str) -> str:
    try:
        if ipaddress.ip_address(address).version == 6:
            return f"[{address}]"
    except ValueError:
        pass
    return address


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """The configuration from ``path`` (if it exists or was named) and ``env``."""
    env = dict(os.environ if env is None else env)
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    known = {f.name: f for f in fields(Config)}
    named = path if path is not None else env.get(ENV_PREFIX + "CONFIG")
    file = Path(named) if named else Path(DEFAULT_CONFIG_FILE)
    if file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {file}: {exc}") from None
        if isinstance(data.get("agent"), dict):
            data = {**{k: v for k, v in data.items() if k != "agent"}, **data["agent"]}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"{file}: unknown setting {key!r}")
            values[key], sources[key] = value, str(file)
    elif named:
        raise ConfigError(f"configuration file {file} does not exist")
    for key in known:
        if ENV_PREFIX + key.upper() in env:
            values[key], sources[key] = env[ENV_PREFIX + key.upper()], "environment"
    cfg = Config()
    for key, value in values.items():
        kind = {"bool": bool, "int": int, "float": float}.get(str(known[key].type), str)
        setattr(cfg, key, _coerce(key, kind, value, sources[key]))
    return finish(cfg)


def finish(cfg: Config) -> Config:
    """Validate ``cfg`` and fill in the derived defaults."""
    if not cfg.server_url:
        raise ConfigError(
            "server_url is not set (the hadash server, e.g. http://hadash.example:8000): "
            f"set it in the configuration file or {ENV_PREFIX}SERVER_URL"
        )
    cfg.server_url = cfg.server_url.rstrip("/")
    _check_url("server_url", cfg.server_url)
    if not cfg.libvirt_uri:
        raise ConfigError("libvirt_uri must not be empty")
    split_host_port(cfg.listen, "listen")
    if not cfg.name:
        cfg.name = socket.gethostname()
    if not NAME_RE.fullmatch(cfg.name):
        raise ConfigError(f"name {cfg.name!r} is not a name hadash accepts ({NAME_RULE})")
    if not cfg.address:
        if cfg.agent_url:
            cfg.address = urlsplit(cfg.agent_url).hostname or ""
        else:
            host = cfg.listen_host
            unspecified = host in ("0.0.0.0", "::", "")
            cfg.address = route_address(cfg.server_url) if unspecified else host
    if not cfg.agent_url:
        cfg.agent_url = f"http://{url_host(cfg.address)}:{cfg.listen_port}"
    cfg.agent_url = cfg.agent_url.rstrip("/")
    _check_url("agent_url", cfg.agent_url)
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, not {cfg.log_level!r}")
    cfg.log_level = cfg.log_level.upper()
    if cfg.ping_interval < 1:
        raise ConfigError("ping_interval must be at least 1 (seconds)")
    return cfg
