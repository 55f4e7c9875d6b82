"""The gradio demo in headless Chromium with a fake camera: start the webcam, stream, ask,
see the streamed answer and the stats; a screenshot is saved (tmp dir, path printed)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def _browser():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs headless Chromium: apt-get install chromium chromium-driver (scripts/test.sh does, as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    pytest.importorskip("gradio")
    o = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-fake-device-for-media-stream",
              "--use-fake-ui-for-media-stream", "--window-size=1280,900"):
        o.add_argument(a)
    o.binary_location = chromium
    return webdriver.Chrome(service=webdriver.ChromeService(driver), options=o)


@pytest.fixture(scope="module")
def demo_url(tiny_bundle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edge_vila", "demo", str(tiny_bundle), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        if proc.poll() is not None:
            pytest.fail("demo exited: " + proc.stdout.read())
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_webcam_query_in_headless_chromium(demo_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    d = _browser()
    try:
        d.get(demo_url)
        wait = WebDriverWait(d, 30)
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#cam div[title='grant webcam access'] button"))).click()
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#cam button.capture-button"))).click()  # stream
        time.sleep(1.5)  # a few frames reach the server
        box = d.find_element(By.CSS_SELECTOR, "#prompt textarea, #prompt input")
        box.clear()
        box.send_keys("What do you see?")
        d.find_element(By.ID, "ask").click()
        answer = lambda drv: drv.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
        wait.until(lambda drv: "decode" in drv.find_element(By.ID, "stats").text and answer(drv)
                   and "tok/s" in drv.find_element(By.ID, "stats").text.split("decode")[1][:20])
        text = answer(d)
        assert text and "no image yet" not in text  # the webcam frame reached the model
        stats = d.find_element(By.ID, "stats").text
        assert "TTFT" in stats and "MB RSS" in stats and "onnxruntime" in stats
    finally:
        shot = tmp_path / "demo.png"
        d.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        d.quit()
    assert shot.stat().st_size > 10_000
