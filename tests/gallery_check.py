"""Reading a validation gallery back as a browser would: every <img> it references must decode as an image."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

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
