"""Project-wide pytest hooks and generic fixtures.

App-specific fixtures belong in each app's own tests; keep this file small.
"""

import pytest


def pytest_runtest_setup(item):
    """``@pytest.mark.postgres_only``: skip unless the default database is PostgreSQL."""
    if item.get_closest_marker("postgres_only") is None:
        return
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip(f"needs PostgreSQL (database is {connection.vendor})")


@pytest.fixture
def agent_key():
    """The join key agents present on ``connect`` (settings.HADASH_AGENT_KEY)."""
    from django.conf import settings

    return settings.HADASH_AGENT_KEY
