"""R21: durable counters — incremented in the caller's transaction, summed by name and
labels, refused for unknown names or labels."""

import pytest
from django.db import transaction

from metrics.counters import inc, totals

pytestmark = pytest.mark.django_db(transaction=True)


def test_r21_inc_adds_up_and_inserts_when_missing():
    inc("fences", outcome="ok")
    inc("fences", outcome="ok")
    inc("fences", outcome="failed")
    inc("pings_ingested", 250)
    inc("pings_ingested", 50)
    got = totals()
    assert got[("fences", "outcome=ok")] == 2
    assert got[("fences", "outcome=failed")] == 1
    assert got[("pings_ingested", "")] == 300


def test_r21_inc_rolls_back_with_the_callers_transaction():
    inc("restarts", outcome="ok")
    with pytest.raises(RuntimeError), transaction.atomic():
        inc("restarts", 5, outcome="ok")
        raise RuntimeError("the change failed")
    assert totals()[("restarts", "outcome=ok")] == 1


@pytest.mark.parametrize("call", [
    lambda: inc("fence", outcome="ok"),  # unknown name
    lambda: inc("fences"),  # missing label
    lambda: inc("fences", outcome="ok", host="kvm-1"),  # extra label
    lambda: inc("notifications", outcome="a=b"),  # breaks the stored form
    lambda: inc("pings_ingested", -3),
])
def test_r21_inc_refuses_bad_calls_and_counts_nothing(call):
    with pytest.raises(ValueError):
        call()
    assert totals() == {}
