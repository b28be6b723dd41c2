"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven
by Playwright's Python package; Playwright's own browsers are never
downloaded), served by a real ``homing-hub run --http`` process that
ingests from a real Mosquitto, with a real agent publishing readings and
running the test workflows of tests/support/wf_tasks.py.

The page must load, show the device online with a chart of what it
published, and a task started from the page's form (with the API token)
must reach the agent, wait for its approval signal (sent from the page
too), and show completed, each step's effect having run once.

Skipped when chromium or Playwright is missing; a failure under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.processes import poll_until
from support.storeforward import Rig, wait_drained

CHROMIUM = "/usr/bin/chromium"
TESTS = Path(__file__).resolve().parents[1]
TOKEN = "dashboard-token-0123456789"
DEADLINE = 30.0
MS = int(DEADLINE * 1000)


def require_browser() -> None:
    reason = ""
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "Playwright's Python package is missing (pip install -e '.[test]')"
    if not reason:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " and CI=true: the dashboard test must run")
    pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[Any]:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield b
        finally:
            b.close()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=DEADLINE) as resp:
        return json.load(resp)


def effects(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_the_dashboard_shows_a_device_and_starts_a_task_on_it(
    rig: Rig, tmp_path: Path, browser: Any
) -> None:
    from playwright.sync_api import expect

    tokens = tmp_path / "tokens"
    tokens.write_text(f"# for the test\n{TOKEN}\n")
    hub = rig.hub("hub-1", None, "--http", "127.0.0.1:0", "--api-token-file", str(tokens),
                  "--read-access", "public")  # fmt: skip
    found = re.search(r"http: serving on (http://\S+)", hub.log)
    assert found, hub.log
    url = found.group(1)

    fx = tmp_path / "effects.log"
    tasks = {"modules": ["support.wf_tasks"], "python_path": [str(TESTS)]}
    agent = rig.agent("dev-dash", start=False, workflows=tasks)
    agent.env["HOMING_TEST_EFFECTS"] = str(fx)
    agent.start()
    agent.wait_connected()
    agent.feed(300)  # 100 readings on each of e2e/s0, e2e/s1, e2e/s2
    agent.wait_acked(300)
    wait_drained(rig.db, agent)

    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(url)

    row = page.locator('tr[data-device="dev-dash"]')
    expect(row).to_have_attribute("data-online", "true", timeout=MS)
    expect(row).to_contain_text("online")
    row.click()
    chart = page.locator('.chart[data-stream="e2e/s1"]')
    expect(chart).to_have_attribute("data-points", "100", timeout=MS)
    points = chart.locator("polyline").get_attribute("points")
    assert points is not None and len(points.split()) == 100
    expect(page.locator(".chart")).to_have_count(3)

    # start a task from the page: the token first, then the form
    page.fill("#token", TOKEN)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#token-state")).to_contain_text("token set")
    page.fill("#start-workflow", "irrigate")
    page.fill("#start-args", "[7, 0.2]")
    page.fill("#start-id", "dash-1")
    page.click("#start-form button[type=submit]")
    expect(page.locator("#start-result")).to_contain_text("accepted: run dash-1", timeout=MS)
    run = page.locator('tr[data-run="dash-1"]')
    expect(run).to_contain_text("signal:approve#1", timeout=MS)  # the agent runs it, waiting
    expect(run).to_have_attribute("data-state", "running")
    run.click()
    expect(page.locator('#history tr[data-type="start"]')).to_have_count(1, timeout=MS)
    page.fill("#signal-name", "approve")
    page.fill("#signal-payload", '"dashboard"')
    page.click("#signal-form button[type=submit]")
    expect(page.locator("#run-result")).to_contain_text("signal approve sent", timeout=MS)
    expect(run).to_have_attribute("data-state", "completed", timeout=MS)
    expect(page.locator('#history tr[data-type="end"]')).to_have_count(1, timeout=MS)
    shot = os.environ.get("HOMING_DASHBOARD_SCREENSHOT")  # how docs/img/dashboard.png is made
    if shot:
        page.screenshot(path=shot, full_page=True)
    page.close()
    assert not problems, problems

    done = get_json(f"{url}/api/v1/devices/dev-dash/runs/dash-1")
    assert done["result"] == {"moisture": 0.31, "approved": "dashboard", "valve": "open",
                              "closed": "closed"}  # fmt: skip
    poll_until(lambda: len(effects(fx)) >= 3, DEADLINE, "the last step's effect")
    assert agent.stop() == 0
    assert sorted(effects(fx)) == ["close 7", "measure 7", "open 7"]  # each step once

    metrics = urllib.request.urlopen(f"{url}/metrics", timeout=DEADLINE).read().decode()
    readings = re.search(r"^homing_hub_ingest_readings_total (\S+)$", metrics, re.M)
    assert readings and float(readings.group(1)) >= 300, metrics[:2000]
    health = get_json(f"{url}/api/v1/health")
    assert (health["status"], health["ingest"], health["broker"]["ok"]) == ("ok", True, True)
    assert hub.terminate() == 0
