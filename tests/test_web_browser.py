"""The `sspry web` page in a real browser: Playwright driving Debian's chromium (the test set-up installs
it: `make test`; a browser is never downloaded) against a real `sspry web` over a real Forest. The test
writes a rule, sees the rule-check findings beside its lines, submits it, waits for the job and reads
the candidates table, exports it, and sees a compile error at its line."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from tests.webserver import PLANTED, build_forest, start_web

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        "Debian's chromium is not installed (make test installs it with apt-get when run as root)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is a dev dependency")

RULES = (
    'rule c2 {\n  strings:\n    $a = "evil-c2.example"\n  condition:\n    $a\n}\n'
    'rule short {\n  strings:\n    $s = "ab"\n  condition:\n    $s\n}\n'
)
PLANTED_ID = hashlib.sha256(PLANTED).hexdigest()
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root, _ = build_forest(tmp_path_factory.mktemp("browser"), binaries=8)
    server = start_web("--root", str(root), "--allow-download", state_dir=tmp_path_factory.mktemp("state"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_submit_wait_and_read_the_table(web, browser, tmp_path) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(web.url + "/")
    sync_api.expect(page.locator("#target")).to_contain_text("documents", timeout=WAIT_MS)

    # the rule-check findings appear beside their line (the short string of rule `short`, line 9)
    page.fill("#rule", RULES)
    numbers = page.locator("#numbers")
    sync_api.expect(numbers).to_be_visible()
    assert numbers.inner_text().split() == [str(n) for n in range(1, RULES.count("\n") + 2)]
    assert numbers.bounding_box()["width"] > 20
    page.click("#check")
    sync_api.expect(page.locator('#gutter .mark[data-line="9"]')).to_have_class(
        "mark has-note", timeout=WAIT_MS
    )
    sync_api.expect(page.locator('#findings-col .finding[data-line="9"]')).to_contain_text(
        "string-unanchored"
    )
    sync_api.expect(page.locator("#gutter .mark")).to_have_count(1)
    mark, line_box = (
        page.locator("#gutter .mark").bounding_box(),
        page.locator("#findings-col .finding").bounding_box(),
    )
    assert mark["width"] > 20 and abs(mark["y"] - line_box["y"]) < 1  # beside its line
    sync_api.expect(page.locator("#findings li")).to_contain_text(["line 9: string-unanchored"])
    sync_api.expect(page.locator("#rule-status")).to_contain_text("2 rule(s)")

    page.check("#verify")
    page.click("#submit")
    page.wait_for_url("**/#/search/*", timeout=WAIT_MS)
    sync_api.expect(page.locator("#job-status")).to_have_text("done", timeout=WAIT_MS)
    job_id = page.url.rsplit("/", 1)[-1]

    rules = page.locator("#rules tr")
    sync_api.expect(rules.first).to_contain_text("c2")
    c2 = [r.split("\t") for r in rules.all_inner_texts() if r.startswith("c2")]
    assert c2 and c2[0][1:4] == ["1", "1", "1"], c2  # candidates, listed, verified

    rows = page.locator("#candidates tr")
    # the planted file is a candidate of both rules (rule `short` is unsearchable: everything is)
    sync_api.expect(rows.filter(has_text=PLANTED_ID)).to_have_count(2, timeout=WAIT_MS)
    row = rows.filter(has_text=PLANTED_ID).filter(has_text="evil-c2.example")
    text = row.inner_text()
    assert "dropper.bin" in text and "copy-of-dropper.bin" in text and "match" in text
    assert "$a@" in text and "evil-c2.example" in text
    sync_api.expect(page.locator("#page-info")).to_contain_text("of")

    # the rule-name filter of the rules table, the rule filter of the candidates, then the exports
    page.fill("#rule-filter", "SHO")
    sync_api.expect(rules).to_have_count(1)
    sync_api.expect(rules.first).to_contain_text("short")
    page.fill("#rule-filter", "")
    sync_api.expect(rules).to_have_count(2)
    rules.filter(has_text="c2").first.click()
    sync_api.expect(page.locator("#cand-rule")).to_have_text("of c2")
    sync_api.expect(page.locator("#candidates tr")).to_have_count(1)
    with page.expect_download() as csv_download:
        page.click("#export-csv")
    saved = tmp_path / "export.csv"
    csv_download.value.save_as(saved)
    lines = saved.read_text().splitlines()
    assert lines[0] == "rule,source_id,verified,paths,matches" and lines[1].startswith(
        f"c2,{PLANTED_ID},true,"
    )
    with page.expect_download() as sample:
        row.locator("a.dl").click()
    sample.value.save_as(tmp_path / "sample")
    assert (tmp_path / "sample").read_bytes() == PLANTED

    # back to the editor with the job's rule, and the recent searches list shows it done
    page.eval_on_selector("#rule", 'e => { e.value = ""; }')  # hidden in the job view
    page.click("#edit")
    page.wait_for_url("**/#/", timeout=WAIT_MS)
    sync_api.expect(page.locator("#rule")).to_have_value(RULES)
    job_row = page.locator(f'#jobs tr[data-id="{job_id}"]')
    sync_api.expect(job_row).to_contain_text("done", timeout=WAIT_MS)
    assert "c2 (+1 more)" in job_row.inner_text()
    width = job_row.locator(".progress > div").evaluate("e => e.style.width")
    assert width == "100%"

    # external variables, as -d gives them
    page.fill("#rule", 'rule gated { strings: $a = "evil-c2.example" condition: $a and flag == 1 }')
    page.fill("#externals", "flag=1")
    page.click("#submit")
    page.wait_for_url(lambda url: "/#/search/" in url and not url.endswith(job_id), timeout=WAIT_MS)
    sync_api.expect(page.locator("#job-status")).to_have_text("done", timeout=WAIT_MS)
    sync_api.expect(page.locator("#candidates tr").filter(has_text=PLANTED_ID)).to_have_count(1)
    gated_id = page.url.rsplit("/", 1)[-1]
    page.click("#edit")
    page.wait_for_url("**/#/", timeout=WAIT_MS)
    page.fill("#externals", "")

    # deleting a search (after a confirmation) takes it out of the list
    page.goto(f"{web.url}/#/search/{gated_id}")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#purge")
    page.wait_for_url("**/#/", timeout=WAIT_MS)
    sync_api.expect(page.locator(f'#jobs tr[data-id="{job_id}"]')).to_have_count(1, timeout=WAIT_MS)
    sync_api.expect(page.locator(f'#jobs tr[data-id="{gated_id}"]')).to_have_count(0)

    # a rule YARA refuses: its message, and the line marked
    page.fill("#rule", "rule broken {\n  condition:\n    nope\n}\n")
    page.click("#submit")
    sync_api.expect(page.locator("#rule-status")).to_contain_text("line 3: undefined identifier")
    sync_api.expect(page.locator('#gutter .mark[data-line="3"]')).to_have_class("mark has-error")
    assert page.url.endswith("#/")
    assert problems == []
    page.close()


def test_the_page_asks_for_the_token(tmp_path, browser) -> None:
    root, _ = build_forest(tmp_path / "token", binaries=2)
    server = start_web("--root", str(root), state_dir=tmp_path / "state", token="browser-token-1")
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        sync_api.expect(page.locator("#auth")).to_be_visible(timeout=WAIT_MS)
        sync_api.expect(page.locator("#banner")).to_contain_text("needs a token")
        page.fill("#token", "browser-token-1")
        page.click("#save-token")
        sync_api.expect(page.locator("#target")).to_contain_text("documents", timeout=WAIT_MS)
        sync_api.expect(page.locator("#jobs")).to_contain_text("No searches yet.")
        page.close()
    finally:
        server.stop()
