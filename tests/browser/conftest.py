"""Shared by the browser suites (tests/browser): Debian's Chromium through Playwright
(``browser``), a logged-in admin context (``admin``, on the module's own ``live``
system fixture), the module's ``story`` and the helpers the suites import (``log_in``,
``wait_live``, ``shoot`` …). Moved here from test_dashboard.py for test_operator.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hadash.supervisor import ROOT
from tests.conftest import System

CHROMIUM = Path(os.environ.get("HADASH_CHROMIUM", "/usr/bin/chromium"))
# No internet here: without these Chromium keeps trying (and failing) to reach Google.
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}
SCREENSHOTS = ROOT / "docs" / "screenshots"
WAIT = 30_000  # ms: Playwright's default wait in these tests (all bounded)
LONG = 60_000  # ms: detection + investigation + fencing + restarts

ADMIN = ("admin", "browser-admin-pw-1")
OPERATOR = ("operator", "browser-operator-pw-1")

USERS = f"""
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
User = get_user_model()
admin, _ = User.objects.get_or_create(username={ADMIN[0]!r})
admin.is_staff = admin.is_superuser = admin.is_active = True
admin.set_password({ADMIN[1]!r})
admin.save()
op, _ = User.objects.get_or_create(username={OPERATOR[0]!r})
op.is_staff = op.is_superuser = False
op.is_active = True
op.set_password({OPERATOR[1]!r})
op.save()
op.groups.add(Group.objects.get(name="operators"))
"""


def is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str):
    if is_ci():
        pytest.fail(f"{reason} — the browser tests are required when CI=true", pytrace=False)
    pytest.skip(reason)


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        unavailable(f"no Chromium at {CHROMIUM}: install Debian's (apt-get install chromium; "
                    "scripts/test does it when run as root) or set HADASH_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (requirements.txt)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                               args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()


def new_context(browser, system: System):
    ctx = browser.new_context(base_url=system.base_url, viewport=VIEWPORT)
    ctx.set_default_timeout(WAIT)
    return ctx


def log_in(page, who: tuple[str, str]) -> None:
    """Through the login form, from wherever the page is; lands on the overview."""
    if "/login/" not in page.url:
        page.goto("/login/")
    page.fill("#id_username", who[0])
    page.fill("#id_password", who[1])
    page.click("#login-submit")
    page.wait_for_selector('body[data-page="overview"]')


@pytest.fixture(scope="module")
def admin(browser, live):
    """A browser context logged in as the admin (pages open with ``admin.new_page()``)."""
    ctx = new_context(browser, live)
    page = ctx.new_page()
    log_in(page, ADMIN)
    page.close()
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def story() -> dict:
    """What the tests of this module learnt so far (the failed host, its HA VMs)."""
    return {}


def wait_live(page, timeout: int = WAIT) -> None:
    page.wait_for_selector('#conn-status[data-state="live"]', timeout=timeout)


def shoot(page, name: str) -> None:
    """docs/screenshots/<name>.png, only with HADASH_SCREENSHOTS=1 (CI churns no file)."""
    if os.environ.get("HADASH_SCREENSHOTS", "") != "1":
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(1800)  # let the "new" highlights fade
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)
