"""Screenshots of every demo tab for the README, taken in headless Chromium.

    python scripts/demo_screenshots.py builds/medical docs/screenshots [--edit "PROMPT|SUBJECT|TARGET"]

Runs the demo on a hard-linked copy of the build (an applied edit and its rollback change the copy's
edit log, never the build's), asks the pack's first example question, compares models, applies and
rolls back one edit, searches the index and opens the report.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--edit", default="", help="PROMPT|SUBJECT|TARGET for the editing tab")
    parser.add_argument("--port", type=int, default=7871)
    args = parser.parse_args()
    import httpx
    from playwright.sync_api import sync_playwright

    from vertical.pack import load_pack
    from vertical.pipeline import load_manifest

    manifest = load_manifest(args.build)
    pack = load_pack(manifest.get("pack_dir") or manifest["pack"])
    question = pack.config.example_questions[0]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.build.parent) as scratch:
        copy = Path(scratch) / args.build.name
        subprocess.run(["cp", "-al", str(args.build), str(copy)], check=True)
        shutil.rmtree(copy / ".work", ignore_errors=True)
        demo = subprocess.Popen([sys.executable, "-m", "vertical", "demo", str(copy), "--port", str(args.port)])
        url = f"http://127.0.0.1:{args.port}"
        for _ in range(600):
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.set_default_timeout(600_000)
                page.goto(url)
                page.fill("#question textarea", question)
                page.click("#ask")
                page.wait_for_selector("#chatbot details.citation summary").click()
                page.screenshot(path=str(args.out / "chat.png"))
                page.get_by_role("tab", name="Side by side").click()
                page.fill("#compare-question textarea", question)
                page.click("#compare")
                page.wait_for_selector("#vertical-answer details.citation")
                page.screenshot(path=str(args.out / "side-by-side.png"))
                page.get_by_role("tab", name="Knowledge editing").click()
                if args.edit:
                    prompt, subject, target = args.edit.split("|")
                    page.fill("#edit-prompt textarea", prompt)
                    page.fill("#edit-subject textarea", subject)
                    page.fill("#edit-target textarea", target)
                    page.click("#apply-edit")
                    page.wait_for_function("document.querySelector('#edit-after textarea').value.length > 0")
                    page.click("#trace")
                    page.wait_for_selector("#trace-image img", timeout=900_000)
                page.screenshot(path=str(args.out / "editing.png"), full_page=True)
                page.get_by_role("tab", name="Knowledge base").click()
                page.fill("#search-query textarea", question)
                page.click("#search")
                page.wait_for_selector("#hits:has-text('documents')")
                page.screenshot(path=str(args.out / "knowledge-base.png"))
                page.get_by_role("tab", name="Report").click()
                page.wait_for_selector("#report-table")
                time.sleep(2)
                page.screenshot(path=str(args.out / "report.png"), full_page=True)
                browser.close()
        finally:
            demo.terminate()
            demo.wait(timeout=30)
    print(f"screenshots in {args.out}")


if __name__ == "__main__":
    main()
