"""Reading a validation gallery back as a browser would: every <img> it references must decode as an image."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image


class _Sections(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[int, int]] = []  # (step, images) in page order

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("data-step") is not None:
            self.steps.append((int(a["data-step"] or 0), 0))
        elif tag == "img":
            src = a.get("src") or ""
            assert src.startswith("data:image/png;base64,"), f"not self-contained: {src[:60]}"
            Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
            step, n = self.steps[-1]
            self.steps[-1] = (step, n + 1)


def check_gallery(page: str) -> list[tuple[int, int]]:
    """(step, number of images) per section in page order; raises if an image does not decode."""
    parser = _Sections()
    parser.feed(page)
    return parser.steps


def render_in_chromium(page: Path, screenshot: Path) -> tuple[int, int]:
    """(images the browser decoded, images on the page), read back from headless Chromium's DOM; also keeps a
    screenshot. The page is copied with a probe script next to it, so the gallery itself stays script-free."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is missing (scripts/test.sh installs it for the cluster tier)"
    probe = page.with_name("browser-probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    env = {**os.environ, "HOME": str(page.parent)}  # Chromium writes its profile under $HOME
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120,
                         env=env).stdout  # fmt: skip
    subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1200,900", page.as_uri()],
                   capture_output=True, timeout=120, env=env)  # fmt: skip
    m = re.search(r'data-decoded="(\d+)/(\d+)"', dom)
    assert m, f"the probe did not run: {dom[:500]}"
    return int(m.group(1)), int(m.group(2))


PROBE = """<script>window.addEventListener("load", () => { const im = [...document.images];
document.body.dataset.decoded = im.filter(i => i.complete && i.naturalWidth > 0).length + "/" + im.length; });
</script>"""
