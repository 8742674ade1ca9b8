"""hadash's settings with experimental overrides, for measuring a proposed change
without editing the project's settings (``bench ping --conn-max-age N``; ``--db-pool N``
sets hadash's own ``HADASH_DB_POOL``).

    HADASH_BENCH_CONN_MAX_AGE   seconds Django keeps a database connection open
                                (hadash.settings uses 0: a new connection per request)
"""

import os

from hadash.settings import *  # noqa: F403
from hadash.settings import DATABASES

if "HADASH_BENCH_CONN_MAX_AGE" in os.environ:
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["HADASH_BENCH_CONN_MAX_AGE"])
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
