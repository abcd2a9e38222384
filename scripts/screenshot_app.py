"""Screenshot the running app as an analyst sees it: draw a box on the map, ask, wait for the answer.

    rsvlm-app --port 7870 &      # the real default model (or --fake-model)
    python scripts/screenshot_app.py --url http://127.0.0.1:7870/ --out docs/screenshots/app-embedded.png

Uses the Debian Chromium through playwright (as the browser test does). The question is one of
the quick actions (`--action find|describe|count|classify`) or a typed `--question`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--action", default="find",
                        choices=("find", "describe", "count", "classify"))
    parser.add_argument("--question", default=None,
                        help="type this question and press Ask instead of a quick action")
    parser.add_argument("--box", default="0.30,0.30,0.62,0.66",
                        help="drawn rectangle as fractions of the map frame: x0,y0,x1,y1")
    parser.add_argument("--timeout-s", type=float, default=180)
    args = parser.parse_args()
    x0f, y0f, x1f, y1f = (float(v) for v in args.box.split(","))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(args.url)
            frame_el = page.locator("#rsvlm-map-frame")
            frame_el.wait_for(timeout=60_000)
            fl = page.frame_locator("#rsvlm-map-frame")
            fl.locator(".leaflet-draw-draw-rectangle").wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            fl.locator(".leaflet-draw-draw-rectangle").click()
            box = frame_el.bounding_box()
            x0, y0 = box["x"] + box["width"] * x0f, box["y"] + box["height"] * y0f
            x1, y1 = box["x"] + box["width"] * x1f, box["y"] + box["height"] * y1f
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
            page.mouse.move(x1, y1, steps=5)
            page.mouse.up()
            fl.locator("path.rsvlm-chip").wait_for(timeout=30_000)
            bot = page.locator("#rsvlm-chat .message.bot, #rsvlm-chat [data-testid='bot']")
            before = bot.count()
            if args.question:
                page.locator("#rsvlm-question textarea").fill(args.question)
                page.locator("#rsvlm-send").click()
            else:
                page.locator(f"#rsvlm-{args.action}").click()
            page.wait_for_function(
                "n => document.querySelectorAll(\"#rsvlm-chat .message.bot, "
                "#rsvlm-chat [data-testid='bot']\").length > n", arg=before,
                timeout=args.timeout_s * 1000)
            # Streaming or scanning: wait until the answer is final and stops changing.
            last, stable = "", 0
            waited = 0
            busy = ("so far…", "Scanning the whole area", "Waiting for the model", "…")
            while stable < 4 and waited < args.timeout_s:
                page.wait_for_timeout(1000)
                waited += 1
                text = bot.last.inner_text().strip()
                done = text and not any(b in text for b in busy) and \
                    page.locator("#rsvlm-progress progress").count() == 0
                stable = stable + 1 if done and text == last else 0
                last = text
            page.wait_for_timeout(1500)  # boxes drawn onto the map
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            print(f"wrote {args.out}; answer: {last[:300]!r}")
        finally:
            browser.close()


if __name__ == "__main__":
    main()
