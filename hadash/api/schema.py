"""OpenAPI (drf-spectacular) glue for the operator API."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """Documents `Authorization: Bearer <api token>` (PROTOCOL.md, Operator API)."""

    target_class = "hadash.api.auth.BearerTokenAuthentication"
    name = "BearerAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An operator API token made with `python manage.py apitoken USERNAME`.",
        }
