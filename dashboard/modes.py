"""The HA mode page (SPEC R26): the installation's mode and every cluster's, and — for
admins — a change in two steps: choose, then confirm on a page that says what the mode
means (a plain second form: no inline JS under the CSP). A bad mode or cluster is a 400
that changes nothing."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponseNotAllowed
from django.shortcuts import redirect
from django.utils import timezone

from hadash.config import HA_MODES, ConfigError
from hadash.ha import modes

from .perms import admin_required
from .views import page

MEANING = {
    "armed": "HA acts: failed hosts are fenced and their HA VMs restarted elsewhere.",
    "observe": "Failures are detected, investigated and recorded, and each HA item records "
               "what it would have done — but nothing is fenced, stopped, started or "
               "migrated.",
    "disarmed": "No new HA work: failures are still detected and recorded, recoveries "
                "already past investigation finish, nothing else is restarted.",
}


def _ctx(**extra) -> dict:
    return {"state": modes.state(), "modes": HA_MODES, "meaning": MEANING, **extra}


@login_required
def ha_mode_page(request):
    if request.method == "POST":
        return change(request)
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET", "POST"])
    return page(request, "dashboard/ha_mode.html", "ha-mode", _ctx())


@admin_required
def change(request):
    mode = request.POST.get("mode", "")
    cluster = request.POST.get("cluster", "") or None
    where = f"cluster {cluster}" if cluster else "the installation"
    problem = None
    if cluster is not None and cluster not in modes.known_clusters():
        problem = f"unknown cluster {cluster!r}"
    elif mode not in (*HA_MODES, "") or (mode == "" and cluster is None):
        problem = f"the mode is one of {', '.join(HA_MODES)}, not {mode!r}"
    if problem:
        resp = page(request, "dashboard/ha_mode.html", "ha-mode", _ctx(error=problem))
        resp.status_code = 400
        return resp
    if request.POST.get("confirm") != "yes":
        return page(request, "dashboard/ha_mode.html", "ha-mode", _ctx(
            confirm={"mode": mode, "cluster": cluster or "", "where": where,
                     "meaning": MEANING.get(mode, "the cluster follows the installation's "
                                                  "mode again")}))
    try:
        modes.set_mode(mode, cluster=cluster, now=timezone.now(),
                       by=request.user.get_username())
    except ConfigError as exc:
        resp = page(request, "dashboard/ha_mode.html", "ha-mode", _ctx(error=str(exc)))
        resp.status_code = 400
        return resp
    messages.success(request, f"HA mode of {where}: {mode or 'the installation’s'}."
                     + (" Every host and VM was re-examined." if mode == "armed" else ""))
    return redirect("dash:ha-mode")
