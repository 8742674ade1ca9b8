"""Test helpers shared by several apps' tests (the operator API's clients).

The pytest fixtures built on these (``staff``, ``reader``, ``api``, ``ro_api``) are in
the root conftest.py."""

from __future__ import annotations

from rest_framework.test import APIClient

from hadash.models import ApiToken


def token_client(user) -> APIClient:
    """An API client that authenticates as ``user`` with a freshly issued API token."""
    _, key = ApiToken.issue(user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client
