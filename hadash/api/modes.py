"""HA modes in the operator API (SPEC R26): `GET/PUT /api/v1/ha-mode` (the
installation's mode, every cluster's override and what is not armed) and
`PUT /api/v1/clusters/{name}/ha-mode` (a cluster's override; empty or null: the
installation's). As everywhere in the API, reading needs a login and changing an admin;
a bad mode is a 400 that changes nothing. A change is an event and, while not armed, an
alert; returning to armed re-examines every host and VM (hadash.ha.modes)."""

from __future__ import annotations

from django.urls import path
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.response import Response

from hadash.config import ConfigError
from hadash.ha import modes

from .views import E400, E401, E403, E404, ApiView, error


def _mode_of(request):
    """The body's "mode", or an error Response."""
    data = request.data
    if not isinstance(data, dict) or "mode" not in data:
        return None, error('the body is {"mode": "armed" | "observe" | "disarmed"}',
                           status.HTTP_400_BAD_REQUEST)
    return data["mode"], None


class HaModeView(ApiView):
    """The installation's HA mode (R26) and every cluster's."""

    @extend_schema(summary="HA modes: the installation's and every cluster's (R26)",
                   responses={200: OpenApiTypes.OBJECT, 401: E401})
    def get(self, request):
        return Response(modes.state())

    @extend_schema(
        summary="Set the installation's HA mode (R26)",
        description='Body `{"mode": "armed" | "observe" | "disarmed"}`. observe: failures '
        "are detected and recorded, each HA item records what it would have done, nothing "
        "is fenced or restarted; disarmed: no new HA work. Answers the modes in force.",
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, 400: E400, 401: E401, 403: E403})
    def put(self, request):
        mode, bad = _mode_of(request)
        if bad is not None:
            return bad
        try:
            return Response(modes.set_mode(mode, now=timezone.now(), by=self.by()))
        except ConfigError as exc:
            return error(str(exc), status.HTTP_400_BAD_REQUEST)


class ClusterHaModeView(ApiView):
    """A cluster's own HA mode (R26): overrides the installation's."""

    @extend_schema(
        summary="Set a cluster's HA mode (R26)",
        description='Body `{"mode": "armed" | "observe" | "disarmed" | ""}`; "" or null: '
        "the cluster follows the installation's mode again.",
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, 400: E400, 401: E401, 403: E403, 404: E404})
    def put(self, request, name: str):
        mode, bad = _mode_of(request)
        if bad is not None:
            return bad
        if name not in modes.known_clusters():
            return error(f"unknown cluster {name!r}", status.HTTP_404_NOT_FOUND)
        try:
            return Response(modes.set_mode(mode, cluster=name, now=timezone.now(),
                                           by=self.by()))
        except ConfigError as exc:
            return error(str(exc), status.HTTP_400_BAD_REQUEST)


urlpatterns = [
    path("ha-mode", HaModeView.as_view(), name="ha-mode"),
    path("clusters/<str:name>/ha-mode", ClusterHaModeView.as_view(), name="cluster-ha-mode"),
]
