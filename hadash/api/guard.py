"""Refusing an operator API request by its headers, before its body is read (issue 8,
part 4: unauthenticated bodies are refused by their Content-Length).

``early_refusal`` looks only at the path and the headers — no database, no body — so
it can run wherever the headers are known first: in front of Django's ASGI handler
(hadash.api.asgi.ApiGate, which then also checks the credentials), in the API views
before DRF parses anything (hadash.api.views.ApiView.initial: the length rules), and in
the HTTP server once a request's headers have arrived (daphne hands the application a
request only after reading its whole body, so that is the place that saves receiving
it at all).

The rules, for paths under ``/api/v1/``:

* a Content-Length that is not a number: 400;
* a body without a Content-Length (chunked): 411 — the API needs the length up front;
* a Content-Length above ``MAX_BODY_BYTES``: 413;
* a body from a request without credentials (no ``Authorization`` header and no session
  cookie): 401.

A request that passes still has its credentials checked by DRF (401/403) before the
view reads its body; at most ``MAX_BODY_BYTES`` of it can arrive in between.
"""

from __future__ import annotations

from collections.abc import Iterable

API_PREFIX = "/api/v1/"

# The largest request body the operator API accepts. Its bodies are small: a config
# value is at most 4096 characters, a host's tags at most 1024.
MAX_BODY_BYTES = 64 * 1024
# Except a VM's definition (`PUT /api/v1/vms/{name}/definition`, issue 9): up to 1 MiB of
# XML (vms.definitions), as JSON.
MAX_DEFINITION_BODY_BYTES = 2 * 1024 * 1024


# And a list of VMs to register or adopt, or of hosts' settings (issue 12: up to 20,000
# VMs or hosts in one request; 20,000 hosts' BMC settings are about 5 MB).
MAX_BULK_BODY_BYTES = 16 * 1024 * 1024
BULK_PATHS = (API_PREFIX + "vms/bulk", API_PREFIX + "unmanaged-vms/adopt",
              API_PREFIX + "hosts/bulk")


# And a VM group (R25): up to vms.groups.MAX_MEMBERS (1,000) member names of up to 255
# characters each, which JSON may escape to 12 bytes a character — a body the API's own
# description calls valid must not be refused for its size.
MAX_GROUP_BODY_BYTES = 4 * 1024 * 1024
GROUP_PATHS = API_PREFIX + "vm-groups"


def body_limit(path: str) -> int:
    """The largest body the operator API takes at ``path``."""
    if path == GROUP_PATHS or path.startswith(GROUP_PATHS + "/"):
        return MAX_GROUP_BODY_BYTES
    if path.startswith(API_PREFIX + "vms/") and path.rstrip("/").endswith("/definition"):
        return MAX_DEFINITION_BODY_BYTES
    if path in BULK_PATHS:
        return MAX_BULK_BODY_BYTES
    return MAX_BODY_BYTES


def _header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def early_refusal(
    path: str, headers: Iterable[tuple[str, str]], *, session_cookie: str = "sessionid"
) -> tuple[int, str] | None:
    """``(status, message)`` when the request must be refused before its body is read,
    else None. ``headers`` are (name, value) pairs as received (names in any case)."""
    if not path.startswith(API_PREFIX):
        return None
    headers = list(headers)
    refusal = length_refusal(headers, limit=body_limit(path))
    if refusal is not None:
        return refusal
    if has_body(headers):
        cookies = _header(headers, "cookie") or ""
        has_session = any(
            part.strip().startswith(f"{session_cookie}=") for part in cookies.split(";")
        )
        if _header(headers, "authorization") is None and not has_session:
            return 401, ("authentication required before sending a body: "
                         "Authorization: Bearer <api token>")
    return None


def has_body(headers: list[tuple[str, str]]) -> bool:
    length = (_header(headers, "content-length") or "").strip()
    chunked = "chunked" in (_header(headers, "transfer-encoding") or "").lower()
    return chunked or (length.isdigit() and int(length) > 0)


def length_refusal(headers: Iterable[tuple[str, str]],
                   limit: int = MAX_BODY_BYTES) -> tuple[int, str] | None:
    """The body-length rules alone (400, 411, 413); ``limit``: see ``body_limit``."""
    headers = list(headers)
    raw_length = _header(headers, "content-length")
    chunked = "chunked" in (_header(headers, "transfer-encoding") or "").lower()
    length = 0
    if raw_length is not None and raw_length.strip():
        if not raw_length.strip().isdigit():
            return 400, f"Content-Length must be a number of bytes, not {raw_length[:40]!r}"
        length = int(raw_length)
    elif chunked:
        return 411, "the operator API needs a Content-Length for a request body"
    if length > limit:
        return 413, (f"request body too large: {length} bytes, the operator API takes at "
                     f"most {limit} bytes here")
    return None


def meta_headers(meta: dict) -> list[tuple[str, str]]:
    """A Django request's headers (``request.META``) as (name, value) pairs."""
    pairs = []
    for key, value in meta.items():
        if key.startswith("HTTP_"):
            pairs.append((key[5:].replace("_", "-").lower(), value))
        elif key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
            pairs.append((key.replace("_", "-").lower(), value))
    return pairs
