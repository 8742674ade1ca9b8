"""The HA mode banner (SPEC R26): every page says so while HA is not armed, for the
installation or a cluster, with a link to the page that changes it."""

from __future__ import annotations

from django import template

register = template.Library()


@register.inclusion_tag("dashboard/_ha_mode_banner.html")
def ha_mode_banner() -> dict:
    """What is not armed (one or two small queries), for templates/base.html."""
    from hadash.ha import modes

    return {"not_armed": modes.not_armed()}
