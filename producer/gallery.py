"""A self-contained HTML gallery (thumbnails embedded: presigned URLs expire) and a contact
sheet PNG for jobs, with each image's recipe."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from fleet.errors import FleetError

if TYPE_CHECKING:
    from producer.client import Client

THUMB = 256


@dataclass
class Entry:
    job_id: str
    index: int
    key: str
    image: Image.Image
    recipe: dict[str, Any]


def collect(client: Client, job_ids: list[str]) -> list[Entry]:
    """Every stored image of the given jobs, with the recipe from its manifest."""
    entries: list[Entry] = []
    for job_id in job_ids:
        st = client.status(job_id)
        if st.result is None or st.state != "succeeded":
            raise FleetError(f"job {job_id} has no images ({st.state})")
        manifest = client.store.get_json(st.result.manifest_key or "") or {}
        worker = manifest.get("worker", {})
        for record in st.result.images:
            data = client.store.get_bytes(record.key)
            if data is None:
                raise FleetError(f"{client.store.uri(record.key)} is missing")
            image = Image.open(io.BytesIO(data))
            image.load()
            recipe = {
                "prompt": manifest.get("prompt"),
                "negative": manifest.get("negative_prompt") or "",
                "seed": record.seed,
                "size": f"{record.width}x{record.height}",
                "steps": manifest.get("steps"),
                "guidance": manifest.get("guidance"),
                "scheduler": manifest.get("scheduler"),
                "model": manifest.get("model"),
                "device": worker.get("device"),
                "gpu": worker.get("gpu_name") or "",
            }
            entries.append(Entry(job_id, record.index, record.key, image, recipe))
    return entries


def thumbnail(image: Image.Image, side: int = THUMB) -> Image.Image:
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side))
    return thumb


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def render_html(entries: list[Entry], title: str = "diffusion-fleet gallery") -> str:
    cards = []
    for e in entries:
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in e.recipe.items()
            if v not in (None, "")
        )
        cards.append(
            f'<figure><img src="{data_uri(thumbnail(e.image))}" alt="{html.escape(e.key)}">'
            f"<figcaption><code>{html.escape(e.job_id)} #{e.index}</code>"
            f"<table>{rows}</table></figcaption></figure>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; }}
main {{ display: grid; gap: 1rem;
        grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); }}
figure {{ margin: 0; background: #fff; border: 1px solid #ddd;
          border-radius: 6px; padding: .5rem; }}
img {{ width: 100%; image-rendering: pixelated; }}
table {{ font-size: .8rem; border-collapse: collapse; }}
th {{ text-align: left; padding-right: .5rem; }}
</style></head>
<body><h1>{html.escape(title)}</h1><p>{len(entries)} image(s)</p><main>{"".join(cards)}</main>
<script>
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.total = imgs.length;
}});
</script></body></html>
"""


def contact_sheet(entries: list[Entry], columns: int = 4, side: int = THUMB) -> Image.Image:
    rows = max(1, -(-len(entries) // columns))
    sheet = Image.new("RGB", (columns * side, rows * side), (255, 255, 255))
    for i, e in enumerate(entries):
        thumb = thumbnail(e.image, side)
        x, y = (i % columns) * side, (i // columns) * side
        sheet.paste(thumb, (x + (side - thumb.width) // 2, y + (side - thumb.height) // 2))
    return sheet


def write_gallery(client: Client, job_ids: list[str], output: Path) -> tuple[Path, Path]:
    """Write ``output/index.html`` and ``output/contact-sheet.png``; return both paths."""
    entries = collect(client, job_ids)
    output.mkdir(parents=True, exist_ok=True)
    page = output / "index.html"
    page.write_text(render_html(entries))
    sheet = output / "contact-sheet.png"
    contact_sheet(entries).save(sheet)
    return page, sheet
