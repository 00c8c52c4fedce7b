"""The operations UI in a real browser, inside the real Airflow UI (issue 6, first acceptance item).

Against ``airflow standalone`` started by the fixture (see ``conftest.py``), with headless Debian
Chromium:

* the operator ``alice`` logs in through Airflow's login page, opens the review queue from the
  Airflow navigation ("D365 Sync", a top-level entry of Airflow's navigation bar from the
  plugin's ``external_views``, embedded in an iframe, then the app's own "Review queue" tab),
  resolves one conflict with a typed value and one by taking the ERP value, each with a comment,
  and the state store holds both decisions with her name;
* the dead letters open grouped by cause; from the rows she replays a dead letter: the UI calls
  Airflow's REST API as her, and the REST API then lists a ``replay_dead_letters`` run with that
  record in its conf, triggered by ``alice`` (it stays queued: DAGs are paused at creation);
* the health dashboard's server-side SVG charts render (present, visible, non-empty);
* the viewer ``victor`` sees no unmasked e-mail or phone on any page and no action controls.

Screenshots of every step go to ``var/test-artifacts/browser/`` (see ``conftest.py``).
Run: ``.venv/bin/python -m pytest -m browser`` (or ``tests/browser``).
"""

from __future__ import annotations

from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from d365sync.ui import queries
from tests.browser.conftest import REPLAY_DAG, WAIT, AirflowServer, Browser
from tests.ui.conftest import EMAIL, PHONE, PII

pytestmark = pytest.mark.browser

PAGES = {  # the app's tab -> path of the embedded page (the tab's id is nav-<path>)
    "Review queue": "reviews",
    "Dead letters": "dead-letters",
    "Sync health": "health",
    "Sync audit log": "audit",
}


def wait(driver: WebDriver, timeout: float = WAIT) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, timeout)


def login(driver: WebDriver, server: AirflowServer, user: str) -> None:
    """Sign in through Airflow's own login page (SimpleAuthManager), landing on the home page."""
    driver.get(f"{server.url}/")
    wait(driver).until(ec.url_contains("/auth/login"))
    wait(driver).until(ec.visibility_of_element_located((By.NAME, "username"))).send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(server.passwords[user])
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(driver, 60).until(ec.element_to_be_clickable((By.CSS_SELECTOR, "[aria-label='D365 Sync']")))
    assert "/auth/login" not in driver.current_url
    assert driver.get_cookie("_token") is not None, "Airflow set no _token cookie at login"


def open_from_nav(driver: WebDriver, entry: str) -> None:
    """ "D365 Sync" in the Airflow navigation bar (top level), then the app's ``entry`` tab."""
    driver.switch_to.default_content()
    top = (By.CSS_SELECTOR, "[aria-label='D365 Sync']")
    wait(driver).until(ec.element_to_be_clickable(top)).click()
    wait(driver).until(ec.url_contains("/plugin/d365sync"))
    frame = (By.CSS_SELECTOR, "iframe[src*='/d365sync/']")
    wait(driver).until(ec.frame_to_be_available_and_switch_to_it(frame))
    path = PAGES[entry]
    wait(driver).until(ec.element_to_be_clickable((By.ID, f"nav-{path}"))).click()
    wait(driver).until(lambda d: f"/d365sync/{path}" in d.execute_script("return location.pathname"))
    wait(driver).until(ec.presence_of_element_located((By.CSS_SELECTOR, "main h1")))


def flash(driver: WebDriver, text: str) -> str:
    """Wait for the page (after a post/redirect/get) to show a success message containing ``text``."""
    ok = (By.CSS_SELECTOR, "p.flash.ok")
    wait(driver).until(ec.text_to_be_present_in_element(ok, text))
    errors = driver.find_elements(By.CSS_SELECTOR, "p.flash.err")
    assert not errors, errors[0].text
    return str(driver.find_element(*ok).text)


def decide(driver: WebDriver, review_id: int, choice: str, comment: str, value: str = "") -> None:
    row = wait(driver).until(ec.presence_of_element_located((By.ID, f"review-{review_id}")))
    form = row.find_element(By.CSS_SELECTOR, "form.decide")
    form.find_element(By.CSS_SELECTOR, f"input[name=choice][value={choice}]").click()
    if value:
        form.find_element(By.NAME, "value").send_keys(value)
    form.find_element(By.NAME, "comment").send_keys(comment)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def review_ids(server: AirflowServer) -> dict[str, int]:
    return {r.record_key: r.id for r in server.store.reviews(limit=100)}


def test_operator_resolves_conflicts_replays_and_sees_charts(
    airflow_server: AirflowServer, browser: Browser
) -> None:
    server, driver = airflow_server, browser.driver
    ids = review_ids(server)

    login(driver, server, "alice")
    browser.shot("01-home-after-login")

    # The review queue, from the Airflow navigation, embedded in the Airflow UI.
    open_from_nav(driver, "Review queue")
    assert driver.find_element(By.CSS_SELECTOR, "span.who").text.startswith("alice · op")
    shown = driver.find_element(By.TAG_NAME, "body").text  # as rendered: the changed characters are marked
    assert EMAIL in shown, "an operator sees the real values to decide between"
    browser.shot("02-review-queue")

    decide(driver, ids["C003"], "value", "agreed with finance", value="160")
    flash(driver, f"Review {ids['C003']} decided (value).")
    decide(driver, ids["O001"], "erp", "ERP holds the order")
    flash(driver, f"Review {ids['O001']} decided (erp).")
    assert not driver.find_elements(By.ID, f"review-{ids['C003']}"), "a decided item leaves the open queue"
    browser.shot("03-review-decided")

    decided = {r.record_key: r for r in server.store.reviews(status="decided")}
    assert set(decided) == {"C003", "O001"}
    assert (decided["C003"].chosen, decided["C003"].decided_by) == (160, "alice")
    assert decided["C003"].comment == "agreed with finance" and decided["C003"].decided_at is not None
    assert (decided["O001"].chosen, decided["O001"].decided_by) == ("held", "alice")
    assert decided["O001"].comment == "ERP holds the order"

    # Replay a dead letter: the UI triggers the replay DAG through the REST API as alice.
    open_from_nav(driver, "Dead letters")
    dead = {d.record_key: d.id for d in server.store.dead_letters()}
    groups = wait(driver).until(ec.presence_of_element_located((By.ID, "dead-letter-groups")))
    assert len(groups.find_elements(By.CSS_SELECTOR, "tbody tr[id^=group-]")) == len(dead), "one cause each"
    browser.shot("04-dead-letter-groups")
    driver.find_element(By.LINK_TEXT, "Show every row").click()
    row = wait(driver).until(ec.presence_of_element_located((By.ID, f"dead-letter-{dead['C011']}")))
    browser.shot("04-dead-letters")
    row.find_element(By.XPATH, ".//button[normalize-space()='Replay now']").click()
    flash(driver, f"Replay of dead letter {dead['C011']} queued.")  # fixed texts only (issue 11)
    browser.shot("05-replay-queued")

    runs = server.api("alice", f"dags/{REPLAY_DAG}/dagRuns")["dag_runs"]
    (run,) = [r for r in runs if r["conf"] == {"entity": "customers", "keys": ["C011"]}]  # one click, one run
    assert run["triggering_user_name"] == "alice" and run["run_type"] == "manual"
    assert run["state"] in {"queued", "running", "success", "failed"}
    extra = queries.dead_letter_extra(server.store.engine, [dead["C011"]])[dead["C011"]]
    assert extra["handled_by"] == "alice"
    assert [d.record_key for d in server.store.dead_letters(status="replay")] == ["C011"]

    # The health dashboard: server-side SVG charts, present and drawn.
    open_from_nav(driver, "Sync health")
    figures = wait(driver).until(
        ec.visibility_of_all_elements_located((By.CSS_SELECTOR, "section.charts figure svg"))
    )
    assert len(figures) >= 8, f"{len(figures)} charts"
    for svg in figures:
        assert svg.size["width"] > 0 and svg.size["height"] > 0
        assert svg.find_elements(By.CSS_SELECTOR, "rect, path, polyline, line, circle, text")
    driver.execute_script("arguments[0].scrollIntoView()", figures[0])
    browser.shot("06-health-charts")


def _page_controls(driver: WebDriver) -> list[WebElement]:
    """Anything that would let the user act: POST forms and their buttons, bulk checkboxes."""
    selectors = "form[method=post], form.decide, form#bulk, input[type=checkbox], input[name=csrf_token]"
    return list(driver.find_elements(By.CSS_SELECTOR, selectors))


def _assert_no_pii(driver: WebDriver, page: str) -> None:
    source: Any = driver.page_source + driver.find_element(By.TAG_NAME, "body").text  # markup and text
    leaked = [p for p in (*PII, PHONE) if p in source]
    assert not leaked, f"{page}: unmasked {leaked} shown to a viewer"


def test_viewer_sees_masked_values_and_no_actions(airflow_server: AirflowServer, browser: Browser) -> None:
    server, driver = airflow_server, browser.driver
    login(driver, server, "victor")

    for number, entry in enumerate(PAGES, start=1):
        open_from_nav(driver, entry)
        assert driver.find_element(By.CSS_SELECTOR, "span.who").text == "victor · viewer · read-only"
        _assert_no_pii(driver, entry)
        assert _page_controls(driver) == [], f"{entry}: action controls shown to a viewer"
        buttons = {b.text for b in driver.find_elements(By.TAG_NAME, "button")}
        assert not buttons & {"Decide", "Replay now", "Skip"}, f"{entry}: {buttons}"
        browser.shot(f"{number:02d}-viewer-{PAGES[entry]}")

    # The seeded conflicts and dead letters are there, just masked.
    open_from_nav(driver, "Review queue")
    rows = driver.find_elements(By.CSS_SELECTOR, "#reviews tbody tr[id^=review-]")
    assert rows, "the viewer sees the open review items"
    assert "masked for your role" in driver.find_element(By.CSS_SELECTOR, "p.note").text
    c001 = driver.find_element(By.ID, f"review-{review_ids(server)['C001']}")
    shown = c001.find_element(By.CSS_SELECTOR, "td.dyn").text
    assert shown and shown != EMAIL and "@" in shown, f"masked e-mail expected, got {shown!r}"


# --- issue 15: look and place ---------------------------------------------------------------
WIDTHS = (1280, 1920)
SCHEMES = ("light", "dark")


def _scheme(driver: WebDriver, scheme: str) -> None:
    """The system colour scheme the pages (and Airflow's default "system" theme) follow."""
    features = [{"name": "prefers-color-scheme", "value": scheme}]
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": features})


def _fits(driver: WebDriver) -> tuple[int, int]:
    """(content width, viewport width) of the embedded page: nothing may stick out sideways."""
    size = "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    wide, view = driver.execute_script(size)
    return int(wide), int(view)


def test_every_page_at_two_widths_light_and_dark_from_a_top_level_entry(
    airflow_server: AirflowServer, browser: Browser
) -> None:
    server, driver = airflow_server, browser.driver
    login(driver, server, "alice")
    top = driver.find_element(By.CSS_SELECTOR, "[aria-label='D365 Sync']")
    assert not driver.find_elements(By.CSS_SELECTOR, "[aria-label='Plugins']"), "no Plugins menu is needed"
    assert top.is_displayed(), "D365 Sync is an entry of the navigation bar itself"
    backgrounds = {}
    for width in WIDTHS:
        driver.set_window_size(width, 1000)
        for scheme in SCHEMES:
            _scheme(driver, scheme)
            for entry, path in PAGES.items():
                open_from_nav(driver, entry)
                wide, view = _fits(driver)
                assert wide <= view, f"{entry} at {width}px ({scheme}): {wide}px of content in {view}px"
                table = driver.find_elements(By.CSS_SELECTOR, "table.grid")
                if table:
                    used = table[0].size["width"] / view
                    assert used > 0.9, f"{entry} at {width}px: the table uses {used:.0%} of the width"
                backgrounds[scheme] = driver.execute_script(
                    "return getComputedStyle(document.body).backgroundColor"
                )
                browser.shot(f"{width}-{scheme}-{path}")
    assert backgrounds["light"] != backgrounds["dark"], backgrounds
    _scheme(driver, "light")


def test_operator_skips_a_whole_group_of_dead_letters(
    airflow_server: AirflowServer, browser: Browser
) -> None:
    server, driver = airflow_server, browser.driver
    from d365sync.engine.state import Failure

    keys = [f"C9{i:02d}" for i in range(6)]
    error = "transform: record '{}': field 'country': rule 'lookup': no such country (value 'Atlantis')"
    server.store.dead_letter("customers", "transform", "ui-run", [Failure(k, error.format(k)) for k in keys])
    login(driver, server, "alice")
    open_from_nav(driver, "Dead letters")
    rows = driver.find_elements(By.CSS_SELECTOR, "#dead-letter-groups tbody tr[id^=group-]")
    counts = {r.get_attribute("id"): int(r.get_attribute("data-count") or 0) for r in rows}
    assert 6 in counts.values(), counts
    (group,) = [r for r in rows if r.get_attribute("data-count") == "6"]
    assert "no such country" in group.text and "Atlantis" in group.text
    group_id = group.get_attribute("id")
    assert group_id
    browser.shot("01-groups")
    group.find_element(By.NAME, "reason").send_keys("country retired, customers moved by hand")
    group.find_element(By.XPATH, ".//button[normalize-space()='Skip 6']").click()
    flash(driver, "6 dead letter(s) skipped.")
    browser.shot("02-group-skipped")
    skipped = server.store.dead_letters("customers", status="skipped")
    assert sorted(d.record_key for d in skipped) == keys
    extra = queries.dead_letter_extra(server.store.engine, [d.id for d in skipped])
    assert {x["handled_by"] for x in extra.values()} == {"alice"}
    assert not driver.find_elements(By.ID, group_id), "the group is gone"
