"""GET /metrics (SPEC R21): Prometheus text format, bearer token HADASH_METRICS_TOKEN."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from prometheus_client import CollectorRegistry, generate_latest

from .collector import HadashCollector

# Only hadash's collector: no process or platform metrics of whichever process answers
# (they would differ between processes; R21 wants the same values from every one).
REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(HadashCollector())
# The classic text format every Prometheus (2.x and 3.x) reads; hadash's names need no
# escaping, so prometheus_client's newer "1.0.0" label would describe the same bytes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _error(status: int, message: str, **headers) -> JsonResponse:
    response = JsonResponse({"error": message}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def metrics(request):
    if request.method not in ("GET", "HEAD"):
        return _error(405, f"{request.method} is not allowed on /metrics: use GET.",
                      Allow="GET, HEAD")
    token = settings.HADASH_METRICS_TOKEN
    if not token:
        return _error(403, "GET /metrics is disabled: set HADASH_METRICS_TOKEN in the "
                           "environment (or in var/secrets.env) and have Prometheus send it "
                           "as 'Authorization: Bearer <token>' (docs/metrics.md).")
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return _error(401, "GET /metrics needs 'Authorization: Bearer <HADASH_METRICS_TOKEN>'.",
                      WWW_Authenticate='Bearer realm="hadash metrics"')
    if not hmac.compare_digest(presented.strip().encode(), token.encode()):
        return _error(401, "wrong metrics token: send the value of HADASH_METRICS_TOKEN.",
                      WWW_Authenticate='Bearer realm="hadash metrics", error="invalid_token"')
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE)
