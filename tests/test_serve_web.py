"""The chat page of `tpi serve` in a real headless browser (Debian's chromium + chromedriver, installed by
`make deps`; selenium from the test extra): type a prompt, watch the reply stream in, read the timing panel."""

from __future__ import annotations

import shutil
import time

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from serve_util import LiveServer, pid_alive, synth_tiny, tpi_env, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM and CHROMEDRIVER, "chromium and chromedriver are needed: run `make deps` (apt-packages.txt)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_chat_page_streams_and_shows_timings(browser, tmp_path_factory):
    base = tmp_path_factory.mktemp("serve-web")
    env = tpi_env(base / "cache")
    model = synth_tiny(base / "tiny")
    srv = LiveServer(["--model", model, "--devices", "2"], env, base / "web.log")
    pids = srv.pids()
    try:
        browser.get(srv.url + "/")
        wait_until(lambda: "2 device(s)" in browser.find_element(By.ID, "status").text, what="status line")
        browser.find_element(By.ID, "max-tokens").send_keys("64")  # two turns fit the context of 256
        browser.find_element(By.ID, "temperature").send_keys("0")  # greedy: the same reply every run
        browser.find_element(By.ID, "prompt").send_keys("Hello from the browser")
        browser.find_element(By.ID, "send").click()
        lengths: set[int] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # watch the reply grow while it streams
            replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            if replies:
                lengths.add(len(replies[-1].text))
            if browser.find_element(By.ID, "ttft").text != "–":
                break
            time.sleep(0.02)
        reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert reply and len([n for n in lengths if 0 < n < len(reply)]) >= 1, lengths  # seen part-way
        assert browser.find_element(By.ID, "ttft").text.endswith("ms")
        assert browser.find_element(By.ID, "token-latency").text.endswith("tok/s)")
        tokens = int(browser.find_element(By.ID, "tokens").text)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#token-bars span")) == tokens
        rows = browser.find_elements(By.CSS_SELECTOR, "#devices tr.device")
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == ["0", "1"]
        assert all(td.text.endswith("ms") for r in rows for td in r.find_elements(By.TAG_NAME, "td")[1:])
        # a second turn goes out with the history: the server reuses the first turn's KV caches
        browser.find_element(By.ID, "prompt").send_keys("And again")
        browser.find_element(By.ID, "send").click()
        wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
                   and not browser.find_element(By.ID, "send").get_attribute("disabled"), 120, "second reply")
        prompt_tokens, cached = browser.find_element(By.ID, "cached").text.split(" / ")
        assert 0 < int(cached) < int(prompt_tokens)
    finally:
        assert srv.stop() == 0
        assert not [p for p in pids if pid_alive(p)]
