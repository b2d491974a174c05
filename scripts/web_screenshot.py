#!/usr/bin/env python3
"""Screenshots of a running `sspry web` for docs/web.md, taken with Debian's chromium through Playwright
(never a downloaded browser): the home page with RULE_FILE in the editor (its rule-check findings beside
the lines) and the recent searches, then the view of search JOB_ID (or the newest search).

  scripts/web_screenshot.py --url URL --rule FILE --out-dir docs [--job ID] [--rule-filter NAME]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import expect, sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rule", required=True, type=Path)
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--job")
    parser.add_argument("--rule-filter", help="click this rule in the job view first")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=args.chromium, headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
        page.goto(args.url + "/#/")
        expect(page.locator("#target")).to_contain_text("documents")
        page.fill("#rule", args.rule.read_text())
        page.click("#check")
        expect(page.locator("#rule-status")).to_contain_text("rule(s)", timeout=60_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(args.out_dir / "web-home.png"), full_page=True)
        job = args.job or page.locator("#jobs tr").first.get_attribute("data-id")
        page.goto(f"{args.url}/#/search/{job}")
        expect(page.locator("#job-status")).to_have_text("done", timeout=60_000)
        if args.rule_filter:
            page.locator("#rules tr", has_text=args.rule_filter).first.click()
            expect(page.locator("#cand-rule")).to_have_text(f"of {args.rule_filter}")
        page.wait_for_timeout(500)
        page.screenshot(path=str(args.out_dir / "web-job.png"), full_page=False)
        browser.close()


if __name__ == "__main__":
    main()
