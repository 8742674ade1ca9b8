"""hadash's settings with experimental overrides, for measuring a proposed change
without editing the project's settings (``bench ping --conn-max-age N`` / ``--db-pool N``).

    HADASH_BENCH_CONN_MAX_AGE   seconds Django keeps a database connection open
                                (hadash.settings uses 0: a new connection per request)
    HADASH_BENCH_DB_POOL        use Django's psycopg connection pool (Django ≥ 5.1,
                                needs the psycopg-pool package) of at most N connections
"""

import os

from hadash.settings import *  # noqa: F403
from hadash.settings import DATABASES

if "HADASH_BENCH_CONN_MAX_AGE" in os.environ:
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["HADASH_BENCH_CONN_MAX_AGE"])
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

if "HADASH_BENCH_DB_POOL" in os.environ:
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # required with a pool
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1, "max_size": int(os.environ["HADASH_BENCH_DB_POOL"]), "timeout": 30,
    }
