"""DATABASE_URL, including libpq's multi-host form for a highly available PostgreSQL
(docs/deploy.md, "PostgreSQL high availability"):

    postgres://hadash:secret@db1:5432,db2:5432/hadash?target_session_attrs=read-write

dj_database_url reads one host only (``db1:5432,db2:5432`` is "not a valid url"). Here
the hosts and ports become Django's HOST and PORT as comma-separated lists, which
Django hands to psycopg 3 and libpq as they are: libpq tries the hosts in order and,
with ``target_session_attrs=read-write`` (or ``primary``), keeps the first that accepts
writes — after a failover, the promoted standby. A malformed list, or several hosts
without a target that excludes standbys, is refused with an error saying what to write.
"""

from __future__ import annotations

import re
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

POSTGRES_SCHEMES = ("postgres", "postgresql", "pgsql", "postgis")
# libpq's target_session_attrs values (PostgreSQL 14+); psycopg 3 passes them on.
SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
WRITABLE = ("read-write", "primary")
_HOSTNAME = re.compile(r"^[A-Za-z0-9._%-]+$")


def _bad(url: str, why: str) -> ImproperlyConfigured:
    shown = re.sub(r"(://[^:@/]*:)[^@/]*@", r"\1***@", url)  # never echo a password
    return ImproperlyConfigured(
        f"DATABASE_URL={shown!r}: {why}. Several PostgreSQL servers are written "
        "postgres://user:password@host1:5432,host2:5432/dbname"
        "?target_session_attrs=read-write")


def _host_port(item: str, url: str) -> tuple[str, str]:
    if item.startswith("["):  # [IPv6]:port
        host, sep, rest = item[1:].partition("]")
        if not sep or not host or (rest and not rest.startswith(":")):
            raise _bad(url, f"host {item!r} is not [address]:port")
        port = rest[1:]
    else:
        host, _, port = item.partition(":")
        if not host or not _HOSTNAME.match(host):
            raise _bad(url, f"host {item!r} is not host or host:port" if item
                       else "an empty host in the host list")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise _bad(url, f"port {port!r} of {host} is not a number from 1 to 65535")
    return host, port


def parse(url: str, **kwargs: Any) -> dict[str, Any]:
    """Django's DATABASES entry for ``url`` (dj_database_url's, plus several hosts)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in POSTGRES_SCHEMES:
        return dj_database_url.parse(url, **kwargs)
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostlist = netloc.rpartition("@")
    items = hostlist.split(",")
    if len(items) == 1:
        cfg = dj_database_url.parse(url, **kwargs)
        hosts = [(cfg["HOST"], str(cfg["PORT"] or ""))]
    else:
        hosts = [_host_port(item.strip(), url) for item in items]
        # dj_database_url reads the rest (user, password, name, options) with one host
        first = f"[{hosts[0][0]}]" if ":" in hosts[0][0] else hosts[0][0]
        try:
            cfg = dj_database_url.parse(f"{scheme}://{userinfo}{at}{first}{tail}", **kwargs)
        except ValueError as exc:
            raise _bad(url, str(exc)) from None
        ports = [p for _, p in hosts]
        cfg["HOST"] = ",".join(h for h, _ in hosts)
        # libpq: one port for every host, or one per host
        cfg["PORT"] = ports[0] if len(set(ports)) == 1 else ",".join(p or "5432" for p in ports)
    target = (cfg.get("OPTIONS") or {}).get("target_session_attrs")
    if target is not None and target not in SESSION_ATTRS:
        raise _bad(url, f"target_session_attrs={target!r} is not one of "
                   + ", ".join(SESSION_ATTRS))
    if len(hosts) > 1 and target not in WRITABLE:
        raise _bad(url, f"{len(hosts)} hosts but target_session_attrs="
                   f"{target or 'any (unset)'}: hadash writes, so it must reach the primary "
                   "only — add ?target_session_attrs=read-write")
    return cfg
