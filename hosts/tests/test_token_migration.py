"""R30 on upgrade (hosts migration 0003): v1 agent tokens that anyone could compute from
the development SECRET_KEY are revoked; tokens derived from a real key stay valid."""

from __future__ import annotations

import hashlib
import hmac
import uuid

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

DEV_KEY = "hadash-insecure-development-key-set-SECRET_KEY-in-production"
BEFORE = [("hosts", "0002_ping_friendly_fillfactor")]
AFTER = [("hosts", "0003_agent_credentials")]


def v1_token_hash(key: str, host_uuid: uuid.UUID, generation: int) -> str:
    token = hmac.new(key.encode(), f"{host_uuid}:{generation}".encode(),
                     hashlib.sha256).hexdigest()
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.mark.django_db(transaction=True)
def test_v1_tokens_from_the_development_key_are_revoked_others_kept():
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    old = executor.loader.project_state(BEFORE).apps.get_model("hosts", "Host")
    exposed, private = uuid.uuid4(), uuid.uuid4()
    real_key_hash = v1_token_hash("a-real-secret-key-nobody-knows", private, 3)
    old.objects.create(name="kvm-dev", uuid=exposed, token_generation=2,
                       token_hash=v1_token_hash(DEV_KEY, exposed, 2))
    old.objects.create(name="kvm-real", uuid=private, token_generation=3,
                       token_hash=real_key_hash)
    try:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(AFTER)
        new = executor.loader.project_state(AFTER).apps.get_model("hosts", "Host")
        dev, real = new.objects.get(name="kvm-dev"), new.objects.get(name="kvm-real")
        assert dev.token_hash == ""  # computable by anyone: revoked, re-enrol needed
        assert real.token_hash == real_key_hash  # the running agent keeps working
        assert dev.server_token and real.server_token and dev.server_token != real.server_token
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
