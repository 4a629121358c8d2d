"""The validation gallery: one self-contained HTML page (images inlined as data: URIs), newest step first.

Written by the trainer to ``<output>/validation/index.html`` at every validation (validation.py) and by
`dreambooth images` next to the downloaded PNGs. Pure standard library: bytes in, text out. Self-contained so
that the page can be mailed, attached to a ticket or opened from any folder or a presigned URL.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

# validation/step-N/image-I.png (validation.py writes them; grid.png is left out: the images are shown anyway).
IMAGE_KEY = re.compile(r"^validation/step-(\d+)/image-(\d+)\.png$")

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em} .meta{color:#555;margin-bottom:1.5em}
section{margin-bottom:2em;background:#fff;padding:1em;border-radius:6px;box-shadow:0 1px 3px #0002}
section h2{font-size:1.05em;margin:0 0 .6em} .row{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0} figure img{width:256px;max-width:40vw;image-rendering:auto;border:1px solid #ddd}
figcaption{font-size:.8em;color:#666}
"""


def render(
    job: str,
    steps: Mapping[int, Sequence[tuple[str, bytes]]],
    prompt: str | None = None,
    losses: Mapping[int, float] | None = None,
    source: str = "",
    now: datetime | None = None,
) -> str:
    """``steps``: validation step -> [(file name, PNG bytes)] in image order."""
    esc = html.escape
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M:%SZ")
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(job)} — validation</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(job)}: validation images</h1>",
        f'<div class="meta">prompt: <q id="prompt">{esc(prompt or "(none)")}</q> · {len(steps)} validation(s)'
        + (f" · from {esc(source)}" if source else "")
        + f" · written {when}</div>",
    ]
    if not steps:
        out.append('<p id="empty">No validation images yet (set validationPrompt and validationSteps).</p>')
    for step in sorted(steps, reverse=True):
        loss = (losses or {}).get(step)
        title = f"step {step}" + (f" · loss {loss:.4g}" if loss is not None else "")
        out.append(f'<section class="step" data-step="{step}"><h2>{esc(title)}</h2><div class="row">')
        for name, png in steps[step]:
            data = base64.b64encode(png).decode()
            out.append(
                f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(name)}</figcaption></figure>"
            )
        out.append("</div></section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def group(keys: Sequence[str]) -> dict[int, list[str]]:
    """step -> its image keys in image order, from keys relative to the output."""
    found: dict[int, list[tuple[int, str]]] = {}
    for key in keys:
        m = IMAGE_KEY.match(key)
        if m:
            found.setdefault(int(m.group(1)), []).append((int(m.group(2)), key))
    return {step: [k for _, k in sorted(items)] for step, items in found.items()}
