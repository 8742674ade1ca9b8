"""hadash settings: everything comes from the environment.

With nothing set, hadash runs on one machine with no servers: an SQLite file under
``var/`` and in-memory channel layers.

Environment:
    DATABASE_URL      e.g. postgres://postgres@127.0.0.1:5432/hadash (default: sqlite)
    REDIS_URL         e.g. redis://127.0.0.1:6379/0 (optional; channel layer)
    HADASH_AGENT_KEY  the join key agents present on connect
    SECRET_KEY        Django's secret key (also derives the per-host agent tokens)
    DEBUG             1/true/yes to enable debug
    ALLOWED_HOSTS     comma-separated
    HADASH_DB_POOL    N > 0: a psycopg connection pool of at most N connections per
                      process (PostgreSQL only; meant for web processes serving HTTP
                      agents — docs/deploy.md)
"""

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("HADASH_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


SECRET_KEY = os.environ.get(
    "SECRET_KEY", "hadash-insecure-development-key-set-SECRET_KEY-in-production"
)
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = [
    h.strip()
    for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver").split(",")
    if h.strip()
]

# The join key agents present on `connect` (PROTOCOL.md, Authentication).
HADASH_AGENT_KEY = os.environ.get("HADASH_AGENT_KEY", "hadash-dev-join-key")

INSTALLED_APPS = [
    "daphne",  # must precede staticfiles (daphne.E001)
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "django_q",
    "hadash",
    "hosts",
    "vms",
    "fleet",
    "dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "hadash.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = None
ASGI_APPLICATION = "hadash.asgi.application"

SQLITE_DEFAULT = f"sqlite:///{VAR_DIR / 'hadash.sqlite3'}"
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or SQLITE_DEFAULT, conn_max_age=0  # empty = unset
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE transactions take SQLite's write lock up front, so two processes
    # never deadlock upgrading a read lock; WAL lets readers run beside a writer.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-hadash.sqlite3")}
    if DATABASES["default"]["NAME"] != ":memory:":
        VAR_DIR.mkdir(parents=True, exist_ok=True)


def _db_pool_size() -> int:
    raw = os.environ.get("HADASH_DB_POOL", "").strip() or "0"
    if not raw.isdigit():
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(
            f"HADASH_DB_POOL={raw!r}: give the most connections the pool may hold "
            "(a whole number; 0 or unset: no pool)")
    return int(raw)


DB_POOL = _db_pool_size()
if DB_POOL and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Without a pool every HTTP request opens (and PostgreSQL forks) a connection:
    # ~90 agent pings/s per web process, most of a core of backend start-ups
    # (docs/benchmarks.md, P9). CONN_MAX_AGE must stay 0 with a pool.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1, "max_size": DB_POOL, "timeout": 10,
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "hadash.api.auth.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "hadash operator API",
    "DESCRIPTION": "Hosts, VMs, HA work, events, configuration and operator actions.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
}

# django-q2: the ORM broker needs no extra server; the cluster runs the engine loops
# (hadash.ha.runtime). A loop lives HADASH_LOOP_LIFETIME (240 s) < timeout < retry,
# so django-q never kills or re-delivers a healthy loop.
Q_CLUSTER = {
    "name": "hadash",
    "orm": "default",
    "workers": int(os.environ.get("HADASH_Q_WORKERS", 4)),
    "timeout": 300,
    "retry": 360,
    "max_attempts": 1,
    "ack_failures": True,
    "catch_up": False,
    "poll": 0.2,
    "save_limit": 100,
    "label": "Task queue",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "hadash": {"handlers": ["console"], "level": os.environ.get("HADASH_LOG", "INFO")},
    },
}
