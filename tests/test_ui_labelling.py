"""The technician's labelling page (/ui/labelling), driven in a real browser.

Headless Debian Chromium through chromedriver and Selenium, against a real
node serving the digits app (worker process, ONNX Runtime, real Mosquitto and
AppStore): the technician labels hard examples with the keyboard, and the test
checks through the REST API what the node stored. Without Chromium the test
fails and says how to install it, unless AIDC_SKIP_BROWSER=1.
"""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
from flask import Flask

from edge_node.ui import STATIC, make_ui_blueprint
from tests.appstore_support import digits_dir  # noqa: F401
from tests.test_e2e import API, http, jget, loop  # noqa: F401
from tests.test_hard_examples import _classify, _serve_digits, _settle

INSTALL = ("apt-get install -y chromium chromium-driver (scripts/test.sh does it), "
           "pip install 'selenium>=4' (the test extra), or set AIDC_SKIP_BROWSER=1 to skip")


def test_the_page_is_served_and_needs_nothing_from_the_internet():
    """A site box often has no way out: /ui/ leads to the page, its script and
    style come from the node, and no file names anything outside it."""
    app = Flask("t")
    app.register_blueprint(make_ui_blueprint())
    c = app.test_client()
    r = c.get("/ui/")
    assert r.status_code in (301, 302, 303, 307, 308) and r.location.endswith("/ui/labelling")
    html = c.get("/ui/labelling")
    assert html.status_code == 200 and html.mimetype == "text/html"
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html.get_data(as_text=True)):
        if ref.startswith("static/"):
            assert c.get(f"/ui/{ref}").status_code == 200, ref
    for f in STATIC.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", f.read_text()), f


@pytest.fixture
def browser():
    if os.environ.get("AIDC_SKIP_BROWSER") == "1":
        pytest.skip("AIDC_SKIP_BROWSER=1: no browser tests")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    if not (chrome and driver):
        pytest.fail(f"Chromium or chromedriver is missing: {INSTALL}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is missing: {INSTALL}", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"):
        opts.add_argument(arg)
    # an explicit driver path: Selenium Manager never goes looking on the internet
    b = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    try:
        yield b
    finally:
        b.quit()


def test_a_technician_labels_hard_examples_with_the_keyboard(
        browser, loop, digits_dir, tmp_path):  # noqa: F811
    """Enter confirms the model, a digit key labels, the right arrow skips,
    Backspace goes back; the node stores exactly those labels by the name typed
    in, the page counts them, and a label given behind the page's back is shown
    as a conflict that the technician can overwrite."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    store, node = loop
    agent = _serve_digits(store, node, digits_dir, tmp_path,
                          feedback={"threshold": 1.0, "max_per_minute": 100000})
    _classify(agent, np.load(digits_dir / "heldout.npz")["X_test"][:15])
    _settle(agent, 15)
    edge = agent.http_url
    queue = jget(f"{edge}{API}/labelling/queue?app=digits&limit=50")["queue"]
    kept = len(queue)
    assert kept >= 6
    sid = [q["sample_id"] for q in queue]
    pred = [q["prediction"]["label"] for q in queue]

    b = browser
    wait = WebDriverWait(b, 10)
    el = b.find_element

    def shown(i: int) -> None:
        wait.until(lambda d: el(By.ID, "sample").get_attribute("data-id") == sid[i],
                   f"the page should show sample #{i}")

    def press(*keys) -> None:
        ActionChains(b).send_keys(*keys).perform()

    def text_has(elem_id: str, *parts: str) -> None:
        wait.until(lambda d: all(p in el(By.ID, elem_id).text for p in parts),
                   f"#{elem_id} should say {parts}")

    b.get(f"{edge}/ui/")  # redirects to the labelling page
    shown(0)
    assert b.current_url.endswith("/ui/labelling")
    wait.until(lambda d: d.execute_script(
        "return document.getElementById('input').naturalWidth") > 0, "the input image loads")
    assert el(By.ID, "pred").text == pred[0]
    assert el(By.ID, "app-label").is_displayed() is False  # one app: no selector
    el(By.ID, "by").send_keys("tech-ui", Keys.ENTER)  # Enter leaves the name field

    press(Keys.ENTER)  # sample 0: the model is right
    shown(1)
    mine1 = str((int(pred[1]) + 1) % 10)
    press(mine1)  # sample 1: the model is wrong, one key
    shown(2)
    press(Keys.ARROW_RIGHT)  # sample 2: not sure, skip
    shown(3)
    press(Keys.BACKSPACE)  # ...back to it
    shown(2)
    text_has("counter", "2 labelled this session", f"{kept - 2} remaining")
    assert el(By.CSS_SELECTOR, '#counts tr[data-app="digits"] [data-k="labelled"]').text == "2"

    # someone labels sample 2 behind the page's back; the page's answer differs
    theirs, mine2 = str((int(pred[2]) + 2) % 10), str((int(pred[2]) + 3) % 10)
    status, body = http("PUT", f"{edge}{API}/samples/{sid[2]}/label",
                        {"label": theirs, "by": "tech-2"})
    assert status == 200, body
    press(mine2)
    text_has("msg", "already labelled", f'"{theirs}"', "tech-2", f'Overwrite it with "{mine2}"')
    assert "warn" in el(By.ID, "msg").get_attribute("class")
    assert jget(f"{edge}{API}/samples/{sid[2]}")["label"] == theirs  # nothing changed yet
    press("y")  # overwrite
    shown(3)
    text_has("counter", "3 labelled this session", f"{kept - 3} remaining")
    assert el(By.CSS_SELECTOR, '#counts tr[data-app="digits"] [data-k="labelled"]').text == "3"

    # a key that is no class is refused out loud, and nothing is labelled
    press("x")
    text_has("msg", '"x" is not a class of digits')
    assert "error" in el(By.ID, "msg").get_attribute("class")

    labelled = jget(f"{edge}{API}/samples?app=digits&state=labelled")["samples"]
    assert {s["sample_id"]: (s["label"], s["labelled_by"]) for s in labelled} == {
        sid[0]: (pred[0], "tech-ui"), sid[1]: (mine1, "tech-ui"), sid[2]: (mine2, "tech-ui")}

    # the name is remembered; the help opens and closes with ?
    b.refresh()
    shown(3)
    assert el(By.ID, "by").get_attribute("value") == "tech-ui"
    press("?")
    wait.until(lambda d: el(By.ID, "help").is_displayed(), "? opens the help")
    press(Keys.ESCAPE)
    wait.until(lambda d: not el(By.ID, "help").is_displayed(), "Esc closes the help")
