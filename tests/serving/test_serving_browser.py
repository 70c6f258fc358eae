"""End to end in headless Chromium: the web page uploads an image and shows loaded result thumbnails.

Needs Debian's ``chromium`` and ``chromium-driver`` (apt) and ``selenium`` (pip).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import CHROMIUM, chromium, serving

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium chromium-driver"
    ),
]


def _serve(app: Any) -> Iterator[str]:
    with serving(app) as url:
        yield url


@pytest.fixture(params=["flat_index", "milvus_index"])
def server_url(request: pytest.FixtureRequest, onnx_query: Path) -> Iterator[str]:
    """The ONNX query model (as on a device) against the gallery index on FAISS and on Milvus Lite (the
    same page, the same answers)."""
    from cmpnas.serving.app import create_app

    yield from _serve(create_app(request.getfixturevalue(request.param), onnx_query))


@pytest.fixture
def family_url(flat_index: Path, onnx_query: Path, small_query: Path) -> Iterator[str]:
    """Two query models against one index: 'query' (the default) and 'small'."""
    from cmpnas.serving.app import create_app

    yield from _serve(create_app(flat_index, onnx_query, small_query, watch_index_s=0))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with chromium(tmp_path / "chromium-profile") as driver:
        yield driver


def test_upload_shows_result_thumbnails(server_url: str, browser: Any, tmp_path: Path, pattern: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pattern("stripes", 4).save(tmp_path / "query.png")  # = gallery item stripes/004.png
    browser.get(server_url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "gallery items" in d.find_element(By.ID, "info").text)  # /stats loaded
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "query.png"))

    def loaded_thumbnails(d: Any) -> list[Any] | bool:
        imgs = d.find_elements(By.CSS_SELECTOR, "#results img")
        ok = len(imgs) == 10 and all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) for i in imgs
        )
        return imgs if ok else False

    imgs = wait.until(loaded_thumbnails)
    assert all(int(i.get_property("naturalWidth")) > 0 for i in imgs)
    captions = browser.find_elements(By.CSS_SELECTOR, "#results .label")
    assert {c.text for c in captions} <= {"stripes", "checks", "blobs"}
    assert "10 results" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(tmp_path / "search.png"))

    (tmp_path / "notes.txt").write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.txt"))
    wait.until(lambda d: "Error 415" in d.find_element(By.ID, "status").text)


def test_two_query_models_offer_a_select(family_url: str, browser: Any, tmp_path: Path, pattern: Any) -> None:
    """With several query models the page lists them; the one chosen embeds the query (?model=)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    pattern("blobs", 5).save(tmp_path / "query.png")
    browser.get(family_url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "gallery items" in d.find_element(By.ID, "info").text)
    select = Select(browser.find_element(By.ID, "model"))
    assert select.first_selected_option.text == "query" and browser.find_element(By.ID, "model").is_displayed()
    assert [o.text for o in select.options] == ["query", "small"]
    select.select_by_visible_text("small")
    assert "query model small (torch)" in browser.find_element(By.ID, "info").text
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "query.png"))
    wait.until(lambda d: "10 results" in d.find_element(By.ID, "status").text)
    assert "query model small" in browser.find_element(By.ID, "status").text
