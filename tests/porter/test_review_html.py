"""`porter review --html`: the page opened in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by selenium; .ci/run installs them). One browser session for the module.

The review is of a real port with review items (mamba under --allow-review), so the page shows
changes, review items and the port's `# REVIEW` notes.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from porter.analysis.source import locate
from porter.cli import app
from porter.review import command
from porter.review.model import review_source

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Chromium or its driver is missing: apt-get install chromium chromium-driver (.ci/run does)",
)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(the review's JSON, a browser showing the page `porter review mamba --html` wrote)."""
    review = review_source(locate("mamba"))
    folder = tmp_path_factory.mktemp("review")
    html_path, json_path = folder / "review.html", folder / "review.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(command, "load_review", lambda target, source: review)
        result = CliRunner().invoke(
            app, ["review", "mamba", "--html", str(html_path), "--format", "json", "--output", str(json_path)]
        )
    assert result.exit_code == 0, result.output
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1600,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        _open(browser, html_path)
        yield json.loads(json_path.read_text()), browser, html_path
    finally:
        browser.quit()


def _script(browser, code: str):
    return browser.execute_script(code)


def _open(browser, html_path) -> None:
    """A fresh page: no change selected, no filter (tests may run in any order, or on other workers);
    returns once the page's script has placed the notes."""
    if browser.current_url.startswith("file:"):  # the page shown now must not pass for the new one
        browser.execute_script("document.body.dataset.ready = 'stale'")
    browser.get(html_path.as_uri())
    WebDriverWait(browser, 30).until(lambda b: b.execute_script("return document.body.dataset.ready === '1'"))


def _press(browser, key: str) -> None:
    browser.find_element("tag name", "body").send_keys(key)


def test_page_is_self_contained_and_loads_without_errors(page):
    data, browser, html_path = page
    messages = [
        entry["message"] for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")
    ]
    assert messages == []
    # Every link stays in the page: no script, style sheet, image or font comes from anywhere.
    targets = re.findall(r'\b(?:src|href)="([^"]*)"', html_path.read_text())
    assert targets and all(target.startswith(("#", "data:")) for target in targets)
    loaded = _script(browser, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded == []


def test_one_hunk_and_one_sidebar_entry_per_change(page):
    data, browser, _ = page
    counts = _script(
        browser,
        """return {
            hunks: document.querySelectorAll('section.hunk').length,
            byRule: document.querySelectorAll('#by-rule a.entry').length,
            byClass: document.querySelectorAll('#by-class a.entry').length,
            items: document.querySelectorAll('section.review-item').length,
            reviewLines: Array.from(document.querySelectorAll('.ln.rev[id^=p]')).map(e => e.id),
            ruleGroups: Array.from(document.querySelectorAll('#by-rule details')).map(
                d => [d.dataset.group, Number(d.querySelector('.count').textContent)]),
        }""",
    )
    changes = data["changes"]
    assert counts["hunks"] == counts["byRule"] == counts["byClass"] == len(changes) > 0
    assert counts["items"] == len(data["review_items"]) > 0
    # Each review item's `# REVIEW` note in the port is highlighted.
    assert {f"p{item['port_span']['start_line']}" for item in data["review_items"]} <= set(
        counts["reviewLines"]
    )
    expected = {}
    for change in changes:
        expected[change["rule"]] = expected.get(change["rule"], 0) + 1
    assert dict(counts["ruleGroups"]) == expected


def test_each_hunk_links_to_both_line_numbers(page):
    data, browser, _ = page
    links = _script(
        browser,
        """return Array.from(document.querySelectorAll('section.hunk')).map(h => [Number(h.dataset.index),
            Array.from(h.querySelectorAll('a.place')).map(a => a.getAttribute('href'))])""",
    )
    for index, hrefs in links:
        change = data["changes"][index]
        assert hrefs[0] == f"#s{change['source_span']['start_line']}"
        assert hrefs[1].startswith("#p")
        assert _script(browser, f"return document.getElementById('{hrefs[1][1:]}') !== null")


def test_n_and_p_walk_the_changes_in_order(page):
    data, browser, html_path = page
    _open(browser, html_path)
    order = _script(browser, "return Array.from(document.querySelectorAll('#notes .note')).map(n => n.id)")
    _press(browser, "n")
    assert _script(browser, "return document.body.dataset.current") == order[0]
    _press(browser, "n")
    _press(browser, "n")
    assert _script(browser, "return document.body.dataset.current") == order[2]
    _press(browser, "p")
    assert _script(browser, "return document.body.dataset.current") == order[1]
    _press(browser, "p")
    _press(browser, "p")  # from the first, back to the last: far down the page
    assert _script(browser, "return document.body.dataset.current") == order[-1]
    # The change's lines are marked and scrolled into view.
    in_view = _script(
        browser,
        """const line = document.querySelector('.ln.cur');
           const box = line.getBoundingClientRect();
           return [box.top >= 0 && box.bottom <= window.innerHeight,
                   document.getElementById('scroller').scrollTop > 0]""",
    )
    assert in_view == [True, True]


def test_rule_filter_hides_the_other_rules(page, tmp_path):
    data, browser, html_path = page
    _open(browser, html_path)
    rule = "dead-code"
    expected = sum(change["rule"] == rule for change in data["changes"])
    assert 0 < expected < len(data["changes"])
    Select(browser.find_element("id", "rule-filter")).select_by_value(rule)
    shown = _script(
        browser,
        """const visible = e => e.offsetParent !== null;
           return {
             hunks: Array.from(document.querySelectorAll('section.hunk')).filter(visible).map(h => h.dataset.rule),
             entries: Array.from(document.querySelectorAll('#by-rule a.entry')).filter(visible).length,
             count: document.getElementById('shown-count').textContent,
           }""",
    )
    assert shown["hunks"] == [rule] * expected
    assert shown["entries"] == expected
    assert shown["count"] == str(expected)
    _press(browser, "n")
    current = _script(browser, "return document.body.dataset.current")
    assert _script(browser, f"return document.getElementById('{current}').dataset.rule") == rule
    screenshot = tmp_path / "review.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    Select(browser.find_element("id", "rule-filter")).select_by_value("")
    assert _script(browser, "return document.getElementById('shown-count').textContent") == str(
        len(data["changes"])
    )


def test_both_columns_scroll_together_and_notes_sit_beside_their_rows(page):
    data, browser, html_path = page
    _open(browser, html_path)
    layout = _script(
        browser,
        """const scroller = document.getElementById('scroller');
           scroller.scrollTop = scroller.scrollHeight / 2;
           const rows = {};
           for (const cell of document.querySelectorAll('#grid .ln')) {
             const box = cell.getBoundingClientRect();
             if (box.bottom < 0 || box.top > window.innerHeight) continue;
             (rows[cell.dataset.row] = rows[cell.dataset.row] || []).push(Math.round(box.top));
           }
           const notes = Array.from(document.querySelectorAll('#notes .note-slot')).map(slot => {
             const cell = document.querySelector('#grid .ln[data-row="' + slot.dataset.row + '"]');
             return [Math.round(slot.getBoundingClientRect().top), Math.round(cell.getBoundingClientRect().top)];
           });
           return {scrolled: scroller.scrollTop, rows: Object.values(rows), notes: notes};""",
    )
    assert layout["scrolled"] > 0
    # Every row on screen has its source cell and its port cell at one height.
    assert layout["rows"] and all(len(tops) == 2 and tops[0] == tops[1] for tops in layout["rows"])
    # A note is level with its row, or below it when an earlier note is in the way; never above.
    assert all(note_top >= row_top for note_top, row_top in layout["notes"])
    assert sum(note_top == row_top for note_top, row_top in layout["notes"]) > len(layout["notes"]) / 4
