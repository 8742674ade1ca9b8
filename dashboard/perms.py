"""Who may do what on the dashboard (issue 4, item 3).

Every page needs a login. Any logged-in user reads (the group ``operators`` is the
read-only role); *admins* — superusers, staff, or members of the group ``admins`` —
also act: host and VM actions, acknowledging alerts, injecting simulator faults.
Configuration is edited in the Django admin, which needs a staff account.
Everything is enforced here, server-side (403); templates only hide the buttons.
"""

from __future__ import annotations

from functools import wraps

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import JsonResponse

from hadash.permissions import ADMINS, OPERATORS, is_admin  # noqa: F401

DENIED = "Read-only account: this needs an admin (group “admins” or staff)."


def wants_json(request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def admin_required(view):
    """Login first (anonymous users are sent to the login page), then 403 for
    read-only users (JSON for fetch() callers, the 403 page otherwise)."""

    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if not is_admin(request.user):
            if wants_json(request):
                return JsonResponse({"error": DENIED}, status=403)
            raise PermissionDenied(DENIED)
        return view(request, *args, **kwargs)

    return login_required(wrapped)
