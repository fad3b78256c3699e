"""The Reports page (the plugin's FastAPI app on Airflow's API server) needs Airflow's login.

Reports hold sample prompts and completions, and the API server is the address a
deployment exposes: anonymous callers are refused (API) or sent to the login page
(browser); the same login as the UI, cookie or Bearer token, reads them.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from tuneship import config

pytestmark = pytest.mark.browser

REPORT = "20261130-070000-cycle1.html"
SECRET_SAMPLE = "sample completion: refund order 4417"


@pytest.fixture(scope="module")
def report_file(airflow_ui):
    reports = config.home() / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / REPORT).write_text(f"<html><body><h1>Cycle 1</h1><p>{SECRET_SAMPLE}</p></body></html>")
    (config.home() / "outside.html").write_text("not a report")
    return REPORT


@pytest.mark.parametrize("path", ["/tuneship/reports/", f"/tuneship/reports/{REPORT}"])
def test_anonymous_api_caller_is_refused(airflow_ui, report_file, path):
    r = httpx.get(f"{airflow_ui.base_url}{path}", timeout=30)
    assert r.status_code == 401, r.text
    assert SECRET_SAMPLE not in r.text
    forged = httpx.get(f"{airflow_ui.base_url}{path}", cookies={"_token": "not-a-jwt"}, timeout=30)
    assert forged.status_code in (401, 403) and SECRET_SAMPLE not in forged.text


def test_anonymous_browser_request_is_sent_to_the_login_page(airflow_ui, report_file):
    r = httpx.get(f"{airflow_ui.base_url}/tuneship/reports/{REPORT}", headers={"Accept": "text/html"},
                  timeout=30)
    assert r.status_code == 303
    target = urlparse(r.headers["location"])
    assert target.path.rstrip("/") == "/auth/login"
    assert parse_qs(target.query)["next"] == [f"/tuneship/reports/{REPORT}"]


def test_bearer_token_reads_reports_and_traversal_stays_closed(airflow_ui, report_file):
    headers = {"Authorization": f"Bearer {airflow_ui.token()}"}
    index = httpx.get(f"{airflow_ui.base_url}/tuneship/reports/", headers=headers, timeout=30)
    assert index.status_code == 200 and REPORT in index.text
    report = httpx.get(f"{airflow_ui.base_url}/tuneship/reports/{REPORT}", headers=headers, timeout=30)
    assert report.status_code == 200 and SECRET_SAMPLE in report.text
    for name in ("..%2Foutside.html", "%2E%2E%2Foutside.html", "missing.html"):
        r = httpx.get(f"{airflow_ui.base_url}/tuneship/reports/{name}", headers=headers, timeout=30)
        assert r.status_code == 404, (name, r.status_code)
        assert "not a report" not in r.text


def test_browser_logs_in_through_airflow_and_reads_the_report(page, airflow_ui, report_file, screenshot):
    """Anonymous visit -> Airflow's own login form -> back on the reports page -> a report."""
    page.goto(f"{airflow_ui.base_url}/tuneship/reports/")
    assert urlparse(page.url).path.rstrip("/") == "/auth/login"
    assert SECRET_SAMPLE not in page.content()
    airflow_ui.sign_in(page)
    page.wait_for_url(f"{airflow_ui.base_url}/tuneship/reports/")
    assert page.get_by_role("heading", name="Tuneship reports").is_visible()
    screenshot("reports")
    page.get_by_role("link", name=REPORT).click()
    page.wait_for_url(f"{airflow_ui.base_url}/tuneship/reports/{REPORT}")
    assert page.get_by_text(SECRET_SAMPLE).is_visible()
