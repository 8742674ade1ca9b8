"""Project-wide pytest hooks and generic fixtures.

App-specific fixtures belong in each app's own tests; keep this file small.
"""

import os

import pytest
from django.conf import settings

# R30: the suite makes its own secrets. pytest-django imports hadash.settings before
# this file, and settings.py, seeing PYTEST_VERSION, made up a random SECRET_KEY, join
# key and fleet token for any the environment lacked and exported them. Make sure of it
# here: every process a test starts (daphne, qcluster, the simulator, benchmarks) takes
# its environment from os.environ and so shares this session's secrets.
for _name in ("SECRET_KEY", "HADASH_AGENT_KEY", "HADASH_FLEET_TOKEN"):
    if not os.environ.get(_name) and getattr(settings, _name, ""):
        os.environ[_name] = getattr(settings, _name)


def pytest_runtest_setup(item):
    """``@pytest.mark.postgres_only``: skip unless the default database is PostgreSQL."""
    if item.get_closest_marker("postgres_only") is None:
        return
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip(f"needs PostgreSQL (database is {connection.vendor})")


@pytest.fixture(scope="session", autouse=True)
def _agent_pool_closed_before_the_test_database_goes(django_db_setup, django_db_blocker):
    """The agent protocol's database threads (hosts.agent.dbpool) keep their
    connections between requests, and the websocket and HTTP agent tests under ASGI
    use them: close them before pytest-django drops the test database (PostgreSQL
    refuses to drop a database with sessions on it)."""
    yield
    from hosts.agent import dbpool

    with django_db_blocker.unblock():
        dbpool.close_all()


@pytest.fixture
def agent_key():
    """The join key agents present on ``connect`` (settings.HADASH_AGENT_KEY)."""
    from django.conf import settings

    return settings.HADASH_AGENT_KEY


# --- operator API clients (used by the API tests of several apps) ---------------------


@pytest.fixture
def staff(db):
    """An admin (staff) user. No password: hashing one takes seconds here, and these
    users log in by API token or force_login."""
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("ops", is_staff=True)


@pytest.fixture
def reader(db):
    """A read-only (non-staff) user."""
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("viewer")


@pytest.fixture
def api(staff):
    """An operator API client holding an admin's (``staff``) API token."""
    from hadash.testing import token_client

    return token_client(staff)


@pytest.fixture
def ro_api(reader):
    """An operator API client holding a read-only user's (``reader``) API token."""
    from hadash.testing import token_client

    return token_client(reader)
