"""DATABASE_URL with several PostgreSQL servers (hadash/dburl.py; docs/deploy.md,
"PostgreSQL high availability"). The failover itself: tests/e2e/test_pg_failover.py."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from hadash import dburl

HA = "postgres://hadash:s3cret@10.0.0.1:5432,10.0.0.2:5433/hadash?target_session_attrs=read-write"


def test_several_hosts_reach_libpq_as_lists():
    cfg = dburl.parse(HA, conn_max_age=0)
    assert cfg["ENGINE"] == "django.db.backends.postgresql"
    assert (cfg["HOST"], cfg["PORT"]) == ("10.0.0.1,10.0.0.2", "5432,5433")
    assert (cfg["USER"], cfg["PASSWORD"], cfg["NAME"]) == ("hadash", "s3cret", "hadash")
    assert cfg["OPTIONS"] == {"target_session_attrs": "read-write"}

    same = dburl.parse("postgresql://u@db1,db2:5432,[fd00::3]:5432/h?target_session_attrs"
                       "=primary&connect_timeout=3")
    assert (same["HOST"], same["PORT"]) == ("db1,db2,fd00::3", "5432,5432,5432")
    assert same["OPTIONS"] == {"target_session_attrs": "primary", "connect_timeout": 3}


def test_one_host_and_sqlite_are_as_before():
    cfg = dburl.parse("postgres://postgres@127.0.0.1:5432/hadash")
    assert (cfg["HOST"], cfg["PORT"], cfg["NAME"]) == ("127.0.0.1", 5432, "hadash")
    assert dburl.parse("sqlite:////tmp/x.sqlite3")["NAME"] == "/tmp/x.sqlite3"


@pytest.mark.parametrize("url, says", [
    ("postgres://u:pw@db1:5432,db2:5432/h", "target_session_attrs=any (unset)"),
    ("postgres://u@db1,db2/h?target_session_attrs=read-only", "must reach the primary"),
    ("postgres://u@db1:5432,,db2/h?target_session_attrs=read-write", "empty host"),
    ("postgres://u@db1:5432,db2:70000/h?target_session_attrs=read-write", "'70000'"),
    ("postgres://u@db1:x,db2/h?target_session_attrs=read-write", "port 'x' of db1"),
    ("postgres://u@db1,[fd00::1/h?target_session_attrs=read-write", "[address]:port"),
    ("postgres://u@db1/h?target_session_attrs=writable", "is not one of"),
])
def test_a_malformed_host_list_is_refused_saying_why(url, says):
    with pytest.raises(ImproperlyConfigured) as err:
        dburl.parse(url)
    assert says in str(err.value)
    assert "pw@" not in str(err.value)  # the password is never echoed
    assert "host1:5432,host2:5432" in str(err.value)
