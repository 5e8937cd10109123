"""The search page as a user sees it, in headless Chromium (Debian chromium +
chromium-driver, driven by Selenium): load, type a query, search, see results."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
from e2e_support import wait_for

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian chromium + chromium-driver (make browser)"
)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER),
                              options=options)
    yield driver
    driver.quit()


def test_a_user_searches_and_sees_scored_results(gateway, browser, tmp_path):
    tag = uuid.uuid4().hex[:6]
    texts = {f"moon-{tag}": "Astronauts walked on the surface of the Moon.",
             f"bread-{tag}": "Knead the dough and let the bread rise overnight."}
    with gateway.client() as client:
        res = client.post("/v1/events/text", json=[
            {"id": i, "text": t, "metadata": {"lang": "en", "year": 1969}} for i, t in texts.items()])
        assert res.status_code == 202
        assert wait_for(lambda: all(client.get(f"/v1/embeddings/all-minilm-l6-v2/{i}")
                                    .status_code == 200 for i in texts), timeout=60)

    browser.get(gateway.url + "/")
    assert browser.title == "embedstream search"
    wait = WebDriverWait(browser, 30)
    browser.find_element(By.ID, "api-key").send_keys(gateway.api_key)
    browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "all-minilm-l6-v2"))
    browser.find_element(By.ID, "query").send_keys("people landing on the moon")
    browser.find_element(By.ID, "search-button").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results li.hit")))

    hits = browser.find_elements(By.CSS_SELECTOR, "#results li.hit")
    assert hits[0].get_attribute("data-id") == f"moon-{tag}"
    assert texts[f"moon-{tag}"] in hits[0].text
    score = float(hits[0].find_element(By.CLASS_NAME, "score").text)
    assert 0.3 < score <= 1.0
    assert hits[0].find_element(By.CLASS_NAME, "thumb").is_displayed()
    assert "nearest in all-minilm-l6-v2" in browser.find_element(By.ID, "status").text

    # A filter on a field that is not indexed: the page shows the gateway's error.
    browser.find_element(By.TAG_NAME, "summary").click()
    browser.find_element(By.ID, "filters").send_keys('{"tenant": "x"}')
    browser.find_element(By.ID, "search-button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "invalid_filter"))

    shot = tmp_path / "search-page.png"
    browser.find_element(By.ID, "filters").clear()
    browser.find_element(By.ID, "search-button").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results li.hit")))
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("EMBEDSTREAM_SCREENSHOT_DIR"):  # keep it for a person to look at
        shutil.copy(shot, os.environ["EMBEDSTREAM_SCREENSHOT_DIR"])
