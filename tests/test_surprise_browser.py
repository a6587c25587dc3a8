"""The surprisal page in a real headless Chromium (system package, driven by Selenium).

Skips, with the reason, where Chromium, chromedriver or the selenium package is missing. CI needs
`apt-get install chromium chromium-driver` and `pip install selenium` (the `test` extra).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from anchoring.domains.text.tokenize import CharTokenizer
from anchoring.models.ngpt import NormalizedTransformer
from anchoring.report.surprise_page import render_surprise, write_surprise_page

TEXT = ("O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n"
        "Or, if thou wilt not, be but sworn my love,\nAnd I'll no longer be a Capulet.\n\n"
        "'Tis but thy name that is my enemy;\nThou art thyself, though not a Montague.\n")

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("system Chromium / chromedriver not found (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    # the driver and browser are given by path: Selenium Manager must neither download nor phone home
    os.environ.setdefault("SE_OFFLINE", "true")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    profile = tempfile.mkdtemp(prefix="anchoring-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--window-size=1200,900"):
        opts.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except Exception as e:  # a broken install is an environment problem, not a page bug
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"Chromium did not start: {str(e).splitlines()[0]}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page_file(tmp_path_factory) -> Path:
    tok = CharTokenizer.train([TEXT])
    torch.manual_seed(0)
    model = NormalizedTransformer(tok.vocab_size, width=32, layers=1, heads=2, context=64).eval()
    edited = NormalizedTransformer(tok.vocab_size, width=32, layers=1, heads=2, context=64).eval()
    edited.load_state_dict(model.state_dict())
    with torch.no_grad():
        edited.unembed.weight[tok.encode("o")[0]] *= -1  # the 'edit': 'o' becomes a confident mistake
    page = render_surprise(model, tok, TEXT, edited_model=edited, title="Romeo, before and after")
    return write_surprise_page(tmp_path_factory.mktemp("page") / "surprise.html", page)


def test_page_renders_with_sparklines_tooltips_and_pixels(browser, page_file, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(page_file.as_uri())
    assert browser.title == "Romeo, before and after"
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0  # nothing fetched

    # every row (before and after of each of the 6 lines) has its sparkline, as wide as the text above it
    rows = browser.find_elements(By.CSS_SELECTOR, ".line .row")
    assert len(rows) == 12
    for row in rows:
        svgs = row.find_elements(By.CSS_SELECTOR, "svg.spark")
        assert len(svgs) == 1
        txt = row.find_element(By.CSS_SELECTOR, ".txt")
        assert svgs[0].rect["height"] > 20 and svgs[0].rect["width"] > 50
        assert abs(svgs[0].rect["width"] - txt.rect["width"]) <= 2 or svgs[0].rect["width"] < txt.rect["width"]
        assert len(svgs[0].find_elements(By.CSS_SELECTOR, "path")) >= 4

    # the tooltip of a scored token shows its numbers when hovered, and nothing before
    token = browser.find_elements(By.CSS_SELECTOR, ".row.after .t")[5]
    tip = token.get_attribute("data-tip")
    s2 = re.search(r"s₂\s+([+-]\d\.\d{3})", tip).group(1)
    after = "return getComputedStyle(arguments[0], '::after').content"
    assert browser.execute_script(after, token) in ("none", "normal", "")
    ActionChains(browser).move_to_element(token).perform()
    shown = browser.execute_script(after, token)
    assert "i/log|V|" in shown and "h/log|V|" in shown and s2 in shown
    assert browser.execute_script("return getComputedStyle(arguments[0], '::after').position", token) == "absolute"

    # a screenshot with the tooltip open is not blank: many colours, some of them the s₂ reds
    shot = tmp_path / "surprise.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("ANCHORING_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["ANCHORING_SCREENSHOTS"]) / "surprise_page.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)[..., :3]
    colours = np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20
    red = (img[..., 0] > 0.6) & (img[..., 1] < 0.5) & (img[..., 2] < 0.5)
    assert red.sum() > 50


def test_wide_and_combining_characters_keep_the_text_on_the_sparkline_columns(browser, tmp_path):
    # CJK takes two columns, a lone combining mark none of its own, ␍/→ come from whatever font has
    # them: each token must still start at its column, or every later value would sit under the wrong text
    from selenium.webdriver.common.by import By

    from anchoring.report.surprise_page import _columns, _shown

    text = "日本語 and cafe\u0301 ★ tab\there\rend ␍ done.\n"
    tok = CharTokenizer.train([text])
    torch.manual_seed(0)
    model = NormalizedTransformer(tok.vocab_size, width=32, layers=1, heads=2, context=64).eval()
    page = write_surprise_page(tmp_path / "wide.html", render_surprise(model, tok, text, title="wide"))
    browser.get(page.as_uri())
    ch = browser.execute_script(
        "const s = document.createElement('span'); s.style.font = getComputedStyle(document.querySelector('.txt')).font;"
        "s.textContent = '0'.repeat(40); document.querySelector('.txt').appendChild(s);"
        "const w = s.getBoundingClientRect().width / 40; s.remove(); return w;")
    checked = 0
    for row in browser.find_elements(By.CSS_SELECTOR, ".row"):
        txt, svg = row.find_element(By.CSS_SELECTOR, ".txt"), row.find_element(By.CSS_SELECTOR, "svg.spark")
        col = 0
        for span in txt.find_elements(By.CSS_SELECTOR, ":scope > span"):
            assert abs((span.rect["x"] - txt.rect["x"]) / ch - col) < 0.1, (span.text, col)
            col += _columns(_shown(span.get_attribute("textContent")))
            checked += 1
        assert abs(svg.rect["width"] - col * ch) < 1 and abs(txt.rect["width"] - col * ch) < 1
    assert checked == len(text)  # one span per character token, all of them placed
