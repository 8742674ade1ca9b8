"""hadash settings: everything comes from the environment.

With nothing set, hadash runs on one machine with no servers: an SQLite file under
``var/`` and in-memory channel layers. Secrets (R30) come from the environment, else
from ``var/secrets.env`` (random ones, written once by ``scripts/setup``); with DEBUG
off, hadash refuses to start without them or with the development values.

Environment (README.md, "Configuration", has the full table):
    DATABASE_URL      e.g. postgres://postgres@127.0.0.1:5432/hadash (default: sqlite);
                      several servers: postgres://u@db1:5432,db2:5432/hadash
                      ?target_session_attrs=read-write (hadash/dburl.py)
    REDIS_URL         e.g. redis://127.0.0.1:6379/0 (optional; channel layer)
    HADASH_AGENT_KEY  the join key agents present on connect (a secret)
    SECRET_KEY        Django's secret key (sessions, CSRF, signing)
    HADASH_FLEET_TOKEN  the simulated fleet's control-API token (optional)
    HADASH_METRICS_TOKEN  bearer token for GET /metrics (R21; optional: unset → 403)
    HADASH_AGENT_NETWORKS  CIDRs the server may call agents on (R31; default:
                      loopback and the private ranges)
    DEBUG             1/true/yes to enable debug (and allow the development secrets)
    ALLOWED_HOSTS     comma-separated
    HADASH_HTTPS      1: served over HTTPS only (redirect, secure cookies, HSTS)
    HADASH_SMTP_HOST, _PORT, _USER, _PASSWORD, _STARTTLS, HADASH_MAIL_FROM
                      the SMTP server e-mail notification channels send through (R20)
    HADASH_PUBLIC_URL the dashboard's address, for links in notifications
    HADASH_DB_POOL    N > 0: a psycopg connection pool of at most N connections per
                      process (PostgreSQL only; meant for web processes serving HTTP
                      agents — docs/deploy.md)
"""

import os
from datetime import timedelta
from pathlib import Path

from csp.constants import NONE, SELF

from hadash import dburl

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("HADASH_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = [
    h.strip()
    for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver").split(",")
    if h.strip()
]

# --- secrets (R30) -----------------------------------------------------------------
# Each comes from the environment, else from SECRETS_FILE (KEY=value lines, written once
# with random values by scripts/setup), and is then exported to the processes this one
# starts. Under pytest (PYTEST_VERSION is set for the whole session) a missing one is
# made up at random and exported, so the suite and every process it starts share it
# (conftest.py). With DEBUG on, a missing one falls back to a well-known development
# value; with DEBUG off that value, or none at all, stops every process (manage.py,
# daphne, qcluster) at start with a message naming the variable.
DEVELOPMENT_SECRETS = {
    "SECRET_KEY": "hadash-insecure-development-key-set-SECRET_KEY-in-production",
    "HADASH_AGENT_KEY": "hadash-dev-join-key",
}
SECRETS_FILE = VAR_DIR / "secrets.env"


def _secrets_file() -> dict[str, str]:
    try:
        text = SECRETS_FILE.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    values = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            values[name.strip()] = value.strip()
    return values


def _secret(name: str, required: bool = True) -> str:
    from django.core.exceptions import ImproperlyConfigured

    value = os.environ.get(name, "").strip()
    if not value and "PYTEST_VERSION" in os.environ:
        import secrets

        value = os.environ[name] = secrets.token_urlsafe(50)
    if not value:
        value = _secrets_file().get(name, "")
        if value:
            # Handed down to every process this one starts (the demo's, the benchmarks',
            # which may run with another HADASH_VAR_DIR), as if it had been set.
            os.environ[name] = value
    development = DEVELOPMENT_SECRETS.get(name)
    if DEBUG or not required:
        return value or development or ""
    if not value:
        raise ImproperlyConfigured(
            f"{name} is not set and DEBUG is off: hadash will not start without it (R30). "
            f"Set {name} in the environment (e.g. to the output of python -c 'import "
            f"secrets; print(secrets.token_urlsafe(50))'), or run ./scripts/setup, which "
            f"writes random ones to {SECRETS_FILE}; for development only, set DEBUG=1.")
    if value == development:
        raise ImproperlyConfigured(
            f"{name} is the development value and DEBUG is off: hadash refuses to start "
            f"with it (R30). Set {name} to a secret of your own (or DEBUG=1 for "
            "development).")
    return value


SECRET_KEY = _secret("SECRET_KEY")
# The join key agents present on `connect` (PROTOCOL.md, Authentication).
HADASH_AGENT_KEY = _secret("HADASH_AGENT_KEY")
# R31: the networks the server may call agents on (agent_url, check-on-host address).
# Comma- or space-separated CIDRs; unset: loopback and the private ranges
# (hosts.agent.networks.DEFAULT_AGENT_NETWORKS). Link-local is refused whatever this says.
HADASH_AGENT_NETWORKS = None
if os.environ.get("HADASH_AGENT_NETWORKS", "").strip():
    import ipaddress as _ipaddress
    import re as _re

    HADASH_AGENT_NETWORKS = [
        v for v in _re.split(r"[\s,]+", os.environ["HADASH_AGENT_NETWORKS"]) if v]
    for _net in HADASH_AGENT_NETWORKS:
        try:
            _ipaddress.ip_network(_net, strict=False)
        except ValueError as _exc:
            from django.core.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(
                f"HADASH_AGENT_NETWORKS: {_net!r} is not a network in CIDR notation "
                f"(e.g. 10.0.0.0/8): {_exc}") from None
# The simulated fleet's control-API token (docs/simulator.md): the dashboard's
# Simulator page sends it; `manage.py simulate` takes it by default. Optional.
HADASH_FLEET_TOKEN = _secret("HADASH_FLEET_TOKEN", required=False)
# R21: the bearer token Prometheus presents on GET /metrics. Optional: unset, /metrics
# answers 403 saying to set it (scripts/secrets writes a random one).
HADASH_METRICS_TOKEN = _secret("HADASH_METRICS_TOKEN", required=False)

# --- HTTPS (manage.py check --deploy is clean with HADASH_HTTPS=1) ----------------------
# HADASH_HTTPS=1 turns everything on; each switch can be overridden on its own.
HTTPS = env_bool("HADASH_HTTPS", False)
SECURE_SSL_REDIRECT = env_bool("HADASH_SSL_REDIRECT", HTTPS)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("HADASH_SECURE_COOKIES", HTTPS)


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(f"{name}={raw!r}: give a whole number of at least {minimum}")
    return int(raw)


SECURE_HSTS_SECONDS = env_int("HADASH_HSTS_SECONDS", 365 * 24 * 3600 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("HADASH_HSTS_INCLUDE_SUBDOMAINS", HTTPS)
SECURE_HSTS_PRELOAD = env_bool("HADASH_HSTS_PRELOAD", HTTPS)
# Behind a proxy that terminates TLS: the header it sets, e.g. X-Forwarded-Proto
# (requests carrying "https" in it are secure). Only set it when the proxy always
# sets (or strips) that header.
_proxy_header = os.environ.get("HADASH_PROXY_SSL_HEADER", "").strip()
if _proxy_header:
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + _proxy_header.upper().replace("-", "_"), "https")

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
    "axes",
    "csp",
    "hadash",
    "hosts",
    "vms",
    "fleet",
    "dashboard",
    "notify",  # R20: notification channels and deliveries
    "metrics",
    "clusters",  # R22: failover plans
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last: turns a login refused for too many failures into the lockout page.
    "axes.middleware.AxesMiddleware",
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
# Seconds a client has to send a whole HTTP request (line, headers and body) to daphne
# before it gets 408 and is disconnected (hadash/asgi.py; issue 8: a slow body).
HADASH_REQUEST_TIMEOUT = env_int("HADASH_REQUEST_TIMEOUT", 30, minimum=1)

SQLITE_DEFAULT = f"sqlite:///{VAR_DIR / 'hadash.sqlite3'}"
DATABASES = {
    # hadash.dburl: dj_database_url, plus libpq's several hosts (PostgreSQL HA)
    "default": dburl.parse(
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

# --- notifications (R20, notify/, docs/notifications.md) ---------------------------------
# E-mail channels send through this SMTP server (Django's SMTP backend; STARTTLS when
# HADASH_SMTP_STARTTLS is on). Links in notifications start with HADASH_PUBLIC_URL
# (e.g. https://hadash.example.com); unset, they are paths.
HADASH_SMTP = {
    "host": os.environ.get("HADASH_SMTP_HOST", "localhost"),
    "port": env_int("HADASH_SMTP_PORT", 25, minimum=1),
    "user": os.environ.get("HADASH_SMTP_USER", ""),
    "password": os.environ.get("HADASH_SMTP_PASSWORD", ""),
    "starttls": env_bool("HADASH_SMTP_STARTTLS", False),
    "from": os.environ.get("HADASH_MAIL_FROM", "") or "hadash@localhost",
}
HADASH_PUBLIC_URL = os.environ.get("HADASH_PUBLIC_URL", "").strip().rstrip("/")

# --- login throttling (R30): django-axes on the dashboard and admin logins -----------
# HADASH_LOGIN_FAILURES wrong passwords for one user name from one address lock that
# pair out for HADASH_LOGIN_LOCKOUT_MINUTES; other users and addresses are unaffected.
# The operator API takes bearer tokens, not passwords, so it is not throttled here.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("HADASH_LOGIN_FAILURES", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("HADASH_LOGIN_LOCKOUT_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False

# --- Content-Security-Policy (django-csp 4): only this site's own scripts, styles and
# connections (the dashboard's websocket included); no inline code, no framing.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [NONE],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

# Redis reads must outlast channels_redis's blocking receive (BZPOPMIN, 5 s): redis-py
# 8 sets a 5 s socket timeout by default, which ended every idle dashboard socket after
# ~5.5 s (issue 8, part 8; django/channels_redis#422, redis/redis-py#4091). 15 s still
# notices a Redis that stopped answering.
REDIS_SOCKET_TIMEOUT = 15


def redis_channel_layer(url: str) -> dict:
    """The channel layer on Redis at ``url``, as production runs it (REDIS_URL)."""
    return {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [{
            "address": url,
            "socket_timeout": REDIS_SOCKET_TIMEOUT,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
        }]},
    }


REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {"default": redis_channel_layer(REDIS_URL)}
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
    # Several serializers have a "type" with different choices: name the hosts' one, so
    # the schema (and `check --deploy`) has no naming-collision warning.
    "ENUM_NAME_OVERRIDES": {
        "HostTypeEnum": "hosts.choices.HostType",
        # notify (R20): a delivery's state; severity also names a channel's minimum.
        "DeliveryStateEnum": "notify.models.DeliveryState",
        "SeverityEnum": "hadash.choices.Severity",
        "GroupKindEnum": "vms.choices.GroupKind",  # R25: a VM group's kind
    },
}

# django-q2: the ORM broker needs no extra server. Each cluster (`manage.py qcluster`)
# hosts one engine loop of its own in a worker thread started on post_spawn
# (hadash.ha.runtime, hadash.apps) — not a queued task, so no other cluster can take it;
# the queue carries only the short scheduled tasks (ensure_engine, cleanup).
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
    # One handler, on the root logger: this replaces the one daphne's basicConfig put
    # there (a handler on "hadash" as well printed every hadash line twice).
    "root": {"handlers": ["console"], "level": "INFO"},
    "loggers": {
        "hadash": {"level": os.environ.get("HADASH_LOG", "INFO")},
    },
}
