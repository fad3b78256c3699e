"""Fixtures for browser tests: Airflow's real API server (UI, REST API, the Tuneship plugin)
and dag-processor on a free port in this session's TUNESHIP_HOME, and Debian's chromium
driven by Playwright.

No scheduler is started: a run triggered from the form is created in the metadata DB
(that is what the tests check) and stays queued, so no DAG does any work here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import pytest
from ports import free_port

from tuneship import config, services

COMPONENTS = ["airflow-api-server", "airflow-dag-processor"]
DAG_IDS = {"llm_data_validation", "llm_finetune", "llm_release", "llm_drift_monitor"}


@dataclass(frozen=True)
class AirflowUI:
    base_url: str
    username: str
    password: str

    def token(self) -> str:
        r = httpx.post(f"{self.base_url}/auth/token",
                       json={"username": self.username, "password": self.password}, timeout=30)
        r.raise_for_status()
        return r.json()["access_token"]

    def sign_in(self, page) -> None:
        """Fill and submit the login form the page shows now."""
        page.get_by_label("Username").fill(self.username)
        page.get_by_label("Password").fill(self.password)
        page.get_by_role("button", name="Sign in").click()

    def api(self, path: str) -> httpx.Response:
        """GET on the REST API (v2) as the admin user."""
        return httpx.get(f"{self.base_url}/api/v2{path}", timeout=30,
                         headers={"Authorization": f"Bearer {self.token()}"})


def _dags_parsed(ui: AirflowUI) -> bool:
    try:
        r = ui.api("/dags?dag_id_pattern=llm_&limit=100")
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and DAG_IDS <= {d["dag_id"] for d in r.json()["dags"]}


# Package scope (tests/browser has an __init__.py for it): Playwright's sync API keeps an
# event loop running in the main thread while it is open, which makes every later
# `asyncio.run()` in the session (the triggers' tests) fail; and Airflow should not keep
# running for the rest of the suite. Both stop when the browser tests are done.
@pytest.fixture(scope="package")
def airflow_ui() -> Iterator[AirflowUI]:
    os.environ["TUNESHIP_PORT_AIRFLOW"] = str(free_port())
    try:
        services.start(COMPONENTS)
        ui = AirflowUI(f"http://127.0.0.1:{os.environ['TUNESHIP_PORT_AIRFLOW']}",
                       services.ADMIN_USER, services.admin_password())
        services.wait_for(lambda: _dags_parsed(ui), "the four DAGs in the API", 180,
                          proc_name="airflow-dag-processor")
        yield ui
    finally:
        services.stop(COMPONENTS)
        os.environ.pop("TUNESHIP_PORT_AIRFLOW", None)


def chromium_path() -> str:
    """Debian's chromium (`make install` puts it there); Playwright downloads no browser."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{path}: Debian's chromium is missing; run `make install` "
                           "(or `apt-get install -y chromium` as root)")
    return path


@pytest.fixture(scope="package")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    # The trigger dialog's JSON editor (Monaco) is filled by pasting, as a person would.
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


@pytest.fixture
def screenshot(page):
    """Saves what the page shows under TUNESHIP_HOME/browser/<name>.png, to look at when a
    test fails (or with TUNESHIP_TEST_HOME set, after it passes)."""

    def _shot(name: str) -> None:
        out = config.home() / "browser"
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / f"{name}.png"), full_page=True)

    return _shot


@pytest.fixture(scope="package")
def _session_cookies() -> list[dict]:
    return []


@pytest.fixture
def login(airflow_ui, _session_cookies):
    """Logs a page in and opens `next_path`. The session's first login goes through
    Airflow's own login form, as a person's would; later pages reuse its cookie (the UI's
    `_token`), which saves a form round-trip per test on a busy machine."""

    def _login(page, next_path: str = "/") -> None:
        if _session_cookies:
            page.context.add_cookies(_session_cookies)
            page.goto(f"{airflow_ui.base_url}{next_path}")
        else:
            page.goto(f"{airflow_ui.base_url}/auth/login?next={quote(next_path, safe='')}")
            airflow_ui.sign_in(page)
            page.wait_for_url(f"{airflow_ui.base_url}{next_path}")
            _session_cookies.extend(page.context.cookies())

    return _login
