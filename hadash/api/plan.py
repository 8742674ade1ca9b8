"""Clusters and their failover plans (SPEC R22): the stored plan the engine keeps
current, and an on-demand "what if hosts X, Y fail now?" computed on a copy of the
state (vms.failover; nothing is changed). As everywhere in the API, POST needs an admin;
`GET …/what-if?hosts=a,b` answers the same question to every authenticated user."""

from __future__ import annotations

from django.db.models import Count, Q
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from clusters import plans
from clusters.models import FailoverPlan
from hadash import config
from hadash.clock import SystemClock
from hosts.choices import HostStatus
from hosts.models import Host
from vms import failover

from .views import E400, E401, E403, E404, ApiView, error

MAX_WHAT_IF_HOSTS = 100


def _clusters() -> dict[str, dict]:
    rows = Host.objects.values("cluster").annotate(
        hosts=Count("id"), up=Count("id", filter=Q(status=HostStatus.UP)),
    ).order_by("cluster")
    return {r["cluster"]: {"hosts": r["hosts"], "hosts_up": r["up"]} for r in rows}


class ClusterListView(ApiView):
    """Every cluster (the hosts' cluster names) with its failover capacity (R22)."""

    @extend_schema(summary="Clusters with their failover capacity (R22)",
                   responses={200: OpenApiTypes.OBJECT, 401: E401})
    def get(self, request):
        stored = {p.cluster: p for p in FailoverPlan.objects.all()}
        out = []
        for name, counts in _clusters().items():
            p = stored.get(name)
            out.append({
                "name": name, **counts,
                "failover_capacity": p.capacity if p else None,
                "failover_level": p.level if p else None,
                "below_level": p.below_level if p else None,
                "ha_vms": p.ha_vms if p else None,
                "plan_computed_at": p.computed_at.isoformat() if p else None,
            })
        return Response({"count": len(out), "results": out})


class ClusterPlanView(ApiView):
    """The cluster's failover plan: where each HA VM of each host would restart if that
    host failed (null: would not fit), the failover capacity and the worst
    `ha.failover.level` hosts failing together."""

    @extend_schema(summary="A cluster's failover plan (R22)",
                   responses={200: OpenApiTypes.OBJECT, 401: E401, 404: E404})
    def get(self, request, name):
        if not Host.objects.filter(cluster=name).exists():
            return error(f"unknown cluster '{name}'", 404)
        row = plans.current(name, now=SystemClock().now())
        if row is None:
            return error(f"unknown cluster '{name}'", 404)
        return Response(row.as_json())


class WhatIfSerializer(serializers.Serializer):
    hosts = serializers.ListField(
        child=serializers.CharField(max_length=255), min_length=1,
        max_length=MAX_WHAT_IF_HOSTS,
        help_text="Names of hosts of the cluster that fail together.")


def _what_if(name: str, hosts) -> Response:
    if not Host.objects.filter(cluster=name).exists():
        return error(f"unknown cluster '{name}'", 404)
    if not isinstance(hosts, list) or not hosts or \
            not all(isinstance(h, str) and h for h in hosts):
        return error("hosts: a non-empty list of host names is required", 400)
    if len(hosts) > MAX_WHAT_IF_HOSTS:
        return error(f"hosts: at most {MAX_WHAT_IF_HOSTS} hosts", 400)
    if len(set(hosts)) != len(hosts):
        return error("hosts: a host is named twice", 400)
    state = failover.load([name], cfg=config.snapshot()).get(name)
    try:
        outcome = failover.what_if(state, hosts)
    except ValueError as exc:
        return error(str(exc), 400)
    return Response({"cluster": name, **outcome.as_json()})


class ClusterWhatIfView(ApiView):
    """What if these hosts failed now? Computed at once on a copy of the current state
    with the placement code HA uses (R13, R24); nothing is changed."""

    @extend_schema(
        summary="What if hosts X, Y fail now? (R22; any authenticated user)",
        parameters=[OpenApiParameter("hosts", str, required=True,
                                     description="Comma-separated host names, e.g. "
                                                 "kvm-03,kvm-07")],
        responses={200: OpenApiTypes.OBJECT, 400: E400, 401: E401, 404: E404},
    )
    def get(self, request, name):
        raw = request.query_params.get("hosts", "")
        return _what_if(name, [h.strip() for h in raw.split(",") if h.strip()])

    @extend_schema(
        summary="What if hosts X, Y fail now? (R22; the same as GET, body in JSON)",
        request=WhatIfSerializer,
        responses={200: OpenApiTypes.OBJECT, 400: E400, 401: E401, 403: E403, 404: E404},
    )
    def post(self, request, name):
        body = request.data
        if not isinstance(body, dict) or set(body) - {"hosts"}:
            return error('the body must be {"hosts": ["<host name>", ...]}', 400)
        return _what_if(name, body.get("hosts"))
