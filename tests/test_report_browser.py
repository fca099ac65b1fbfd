"""The HTML report opened in a real browser: headless Chromium (Debian's package) through Selenium
and chromedriver (Debian's chromium-driver, the same version as the browser).

The report is written by write_report from the project of test_report.py; the test checks what the
browser made of it: the table has one row per variant, and the embedded PNG decodes (img.decode()
and naturalWidth, as a browser reports a broken image; every decoded pixel opaque, as the plot's
are, which a PNG cut short is not). Copies of the same page whose PNG is cut short or has a broken
signature must be reported broken, so the image check is shown to fail where it should.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from test_report import EVALS, make_project  # noqa: E402  (tests/ is on sys.path, as for test_ray.py)

from modelbuild.cli.report import write_report
from modelbuild.cli.report_render import COLUMNS, PNG_DPI, PNG_SIZE

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver; "
           ".ci/run installs them)",
)

IMAGE_STATE = """
const done = arguments[arguments.length - 1];
const img = document.querySelector("img");
if (!img) { done({found: false}); return; }
img.decode().then(() => "decoded", (error) => "not decoded: " + error.name).then((decoded) => {
    let opaque = 0;
    if (img.naturalWidth > 0) {  // the decoded pixels: a PNG cut short decodes its first rows only
        const canvas = document.createElement("canvas");
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const context = canvas.getContext("2d");
        context.drawImage(img, 0, 0);
        const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
        for (let i = 3; i < pixels.length; i += 4) opaque += pixels[i] === 255 ? 1 : 0;
    }
    done({found: true, decoded: decoded, complete: img.complete, width: img.naturalWidth,
          height: img.naturalHeight, opaque: opaque});
});
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(arg)
    # the driver's path is given, so Selenium Manager never looks for (or downloads) a driver or a browser
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_html_report_renders_its_table_and_image_in_chromium(browser, tmp_path):
    paths = write_report(make_project(tmp_path / "project"), ["eval-*"], tmp_path / "out")
    rows = json.loads(paths["json"].read_text())["rows"]
    browser.get(paths["html"].as_uri())

    assert browser.title == "Model variants"
    assert browser.execute_script("return document.querySelectorAll('table thead th').length") == len(COLUMNS)
    count = browser.execute_script("return document.querySelectorAll('table tbody tr').length")
    assert count == len(rows) == len(EVALS)
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('table tbody tr td:first-child'), td => td.innerText.trim())")
    assert shown == [("★ " if r["pareto"] else "") + r["label"] for r in rows]

    state = browser.execute_async_script(IMAGE_STATE)
    width, height = int(PNG_SIZE[0] * PNG_DPI), int(PNG_SIZE[1] * PNG_DPI)
    assert state == {"found": True, "decoded": "decoded", "complete": True, "width": width, "height": height,
                     "opaque": width * height}
    shown_width = browser.execute_script("return document.querySelector('img').getBoundingClientRect().width")
    assert shown_width > 100  # laid out on the page, not collapsed

    # the same page with its PNG cut short, or with a broken signature: the checks above must fail
    page = paths["html"].read_text(encoding="utf-8")
    data = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert data, "no embedded PNG in the report"
    encoded = data.group(1)
    assert encoded.startswith("iVBORw0KGgo")  # base64 of the PNG signature
    broken = tmp_path / "broken" / "report.html"
    broken.parent.mkdir()
    broken.write_text(page.replace(encoded, encoded[:len(encoded) // 2]), encoding="utf-8")
    browser.get(broken.as_uri())
    state = browser.execute_async_script(IMAGE_STATE)
    assert state["found"] and state["opaque"] < width * height, state
    broken.write_text(page.replace(encoded, "AAAAAAAAAAA" + encoded[11:]), encoding="utf-8")
    browser.get(broken.as_uri())
    state = browser.execute_async_script(IMAGE_STATE)
    assert state["found"] and state["decoded"].startswith("not decoded") and state["width"] == 0, state
    shutil.rmtree(broken.parent)
