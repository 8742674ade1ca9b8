"""Secrets and deployment settings (R30, issue 8 part 2), as a process sees them: every
check runs manage.py (or daphne) in a subprocess with a chosen environment — not this
test session's, whose secrets pytest made up (conftest.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from hadash.supervisor import ROOT

DEV_SECRET_KEY = "hadash-insecure-development-key-set-SECRET_KEY-in-production"
DEV_AGENT_KEY = "hadash-dev-join-key"
GOOD = {"SECRET_KEY": "k" * 10 + "-a-long-random-looking-secret-key-0123456789-ABCDEFGH",
        "HADASH_AGENT_KEY": "a-join-key-of-our-own-7f3a9c"}
# What the subprocesses must not inherit from this session.
INHERITED = ("PYTEST_VERSION", "SECRET_KEY", "HADASH_AGENT_KEY", "HADASH_FLEET_TOKEN",
             "HADASH_METRICS_TOKEN", "DEBUG",
             "HADASH_HTTPS", "HADASH_SSL_REDIRECT", "HADASH_SECURE_COOKIES",
             "HADASH_HSTS_SECONDS", "HADASH_HSTS_INCLUDE_SUBDOMAINS", "HADASH_HSTS_PRELOAD",
             "HADASH_PROXY_SSL_HEADER", "HADASH_LOGIN_FAILURES", "HADASH_LOGIN_LOCKOUT_MINUTES",
             "DATABASE_URL", "REDIS_URL")


def run(tmp_path, *args, env: dict[str, str] | None = None, timeout: float = 120,
        python_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``manage.py ARGS`` (or ``python PYTHON_ARGS``) with this session's secrets removed,
    an empty HADASH_VAR_DIR (no secrets file) and ``env`` on top."""
    full = {k: v for k, v in os.environ.items() if k not in INHERITED}
    full["HADASH_VAR_DIR"] = str(tmp_path)
    full.update(env or {})
    argv = [sys.executable, *python_args] if python_args else [
        sys.executable, str(ROOT / "manage.py"), *args]
    return subprocess.run(argv, cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert "ImproperlyConfigured" in last, proc.stderr
    for word in words:
        assert word in last, last
    return last


@pytest.mark.parametrize("env, words", [
    ({}, ("SECRET_KEY is not set and DEBUG is off", "./scripts/setup", "DEBUG=1")),
    ({"SECRET_KEY": "  "}, ("SECRET_KEY is not set",)),
    ({"SECRET_KEY": DEV_SECRET_KEY, "HADASH_AGENT_KEY": GOOD["HADASH_AGENT_KEY"]},
     ("SECRET_KEY is the development value",)),
    ({"SECRET_KEY": GOOD["SECRET_KEY"]}, ("HADASH_AGENT_KEY is not set",)),
    ({"SECRET_KEY": GOOD["SECRET_KEY"], "HADASH_AGENT_KEY": DEV_AGENT_KEY},
     ("HADASH_AGENT_KEY is the development value",)),
    ({**GOOD, "DEBUG": "0", "HADASH_AGENT_KEY": ""}, ("HADASH_AGENT_KEY is not set",)),
])
def test_debug_off_refuses_missing_or_development_secrets(tmp_path, env, words):
    """R30: with DEBUG off, manage.py stops at once with a message naming the variable."""
    refused(run(tmp_path, "check", env=env), *words)


def test_web_and_engine_processes_refuse_too(tmp_path):
    """daphne and the qcluster load the same settings: they fail fast the same way."""
    env = {"SECRET_KEY": GOOD["SECRET_KEY"], "HADASH_AGENT_KEY": DEV_AGENT_KEY}
    refused(run(tmp_path, env=env, python_args=("-m", "daphne", "-b", "127.0.0.1", "-p", "0",
                                                "hadash.asgi:application")),
            "HADASH_AGENT_KEY is the development value")
    refused(run(tmp_path, "qcluster", env=env), "HADASH_AGENT_KEY is the development value")


def test_debug_on_allows_the_development_secrets(tmp_path):
    proc = run(tmp_path, "shell", "--no-imports", "-c",
               "from django.conf import settings; print(settings.SECRET_KEY, "
               "settings.HADASH_AGENT_KEY)", env={"DEBUG": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [DEV_SECRET_KEY, DEV_AGENT_KEY]


def test_scripts_secrets_file_is_used_kept_and_private(tmp_path):
    """scripts/setup (through scripts/secrets) writes random secrets once, readable by
    this user only; settings read them when the environment does not set them, and pass
    them on to the processes they start; the environment wins."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    env["HADASH_VAR_DIR"] = str(tmp_path)
    subprocess.run([str(ROOT / "scripts" / "secrets")], env=env, check=True, timeout=60,
                   capture_output=True)
    path = tmp_path / "secrets.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    values = dict(line.split("=", 1) for line in first.splitlines() if not line.startswith("#"))
    assert set(values) == {"SECRET_KEY", "HADASH_AGENT_KEY", "HADASH_FLEET_TOKEN",
                           "HADASH_METRICS_TOKEN"}
    assert all(len(v) >= 50 for v in values.values())
    assert values["SECRET_KEY"] != DEV_SECRET_KEY and values["HADASH_AGENT_KEY"] != DEV_AGENT_KEY
    subprocess.run([str(ROOT / "scripts" / "secrets")], env=env, check=True, timeout=60,
                   capture_output=True)
    assert path.read_text() == first, "a second run must keep the secrets (demo restarts)"

    code = ("import os, subprocess, sys; from django.conf import settings; "
            "print(settings.SECRET_KEY, settings.HADASH_AGENT_KEY, settings.HADASH_FLEET_TOKEN); "
            "print(subprocess.run([sys.executable, '-c', 'import os; "
            "print(os.environ[\"SECRET_KEY\"], os.environ[\"HADASH_AGENT_KEY\"])'], "
            "capture_output=True, text=True, env={**os.environ, 'HADASH_VAR_DIR': '/nonexistent'}"
            ").stdout)")
    proc = run(tmp_path, "shell", "--no-imports", "-c", code)
    assert proc.returncode == 0, proc.stderr
    own, child = proc.stdout.strip().splitlines()[:2]
    assert own.split() == [values["SECRET_KEY"], values["HADASH_AGENT_KEY"],
                           values["HADASH_FLEET_TOKEN"]]
    assert child.split() == [values["SECRET_KEY"], values["HADASH_AGENT_KEY"]]
    proc = run(tmp_path, "shell", "--no-imports", "-c", "from django.conf import settings; "
               "print(settings.HADASH_AGENT_KEY)", env={"HADASH_AGENT_KEY": "from-the-env-1"})
    assert proc.stdout.strip() == "from-the-env-1"


def test_this_test_session_has_secrets_of_its_own():
    """pytest makes random secrets for itself and every process it starts (conftest.py):
    neither the development values nor anything a developer's var/ holds."""
    from django.conf import settings

    assert settings.SECRET_KEY not in ("", DEV_SECRET_KEY)
    assert settings.HADASH_AGENT_KEY not in ("", DEV_AGENT_KEY)
    assert os.environ["SECRET_KEY"] == settings.SECRET_KEY
    assert os.environ["HADASH_AGENT_KEY"] == settings.HADASH_AGENT_KEY


def deploy_check(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run(tmp_path, "check", "--deploy", "--fail-level", "WARNING", env={**GOOD, **env})


def test_check_deploy_is_clean_when_the_environment_asks_for_https(tmp_path):
    """R30 / issue 8: `manage.py check --deploy` reports nothing with HADASH_HTTPS=1 (SSL
    redirect, secure session and CSRF cookies, HSTS), and without it names exactly the
    HTTPS settings it misses."""
    proc = deploy_check(tmp_path, {"HADASH_HTTPS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "System check identified no issues" in proc.stdout
    assert "WARNING" not in proc.stderr

    proc = deploy_check(tmp_path, {})
    assert proc.returncode != 0
    found = {w for w in ("W004", "W008", "W012", "W016") if f"security.{w}" in proc.stderr}
    assert found == {"W004", "W008", "W012", "W016"}, proc.stderr
    for other in ("W009", "W018", "W020"):  # secret key, DEBUG, ALLOWED_HOSTS: fine
        assert f"security.{other}" not in proc.stderr


def test_https_switches_one_by_one(tmp_path):
    code = ("from django.conf import settings as s; print(s.SECURE_SSL_REDIRECT, "
            "s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS, "
            "s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SECURE_HSTS_PRELOAD, "
            "s.SECURE_PROXY_SSL_HEADER, s.AXES_FAILURE_LIMIT, s.AXES_COOLOFF_TIME)")
    proc = run(tmp_path, "shell", "--no-imports", "-c", code, env={
        **GOOD, "HADASH_HTTPS": "1", "HADASH_SSL_REDIRECT": "0", "HADASH_HSTS_SECONDS": "600",
        "HADASH_HSTS_PRELOAD": "no", "HADASH_PROXY_SSL_HEADER": "X-Forwarded-Proto",
        "HADASH_LOGIN_FAILURES": "3", "HADASH_LOGIN_LOCKOUT_MINUTES": "2"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("False True True 600 True False "
                                   "('HTTP_X_FORWARDED_PROTO', 'https') 3 0:02:00")
    refused(run(tmp_path, "check", env={**GOOD, "HADASH_HSTS_SECONDS": "a year"}),
            "HADASH_HSTS_SECONDS")
    refused(run(tmp_path, "check", env={**GOOD, "HADASH_LOGIN_FAILURES": "0"}),
            "HADASH_LOGIN_FAILURES")
