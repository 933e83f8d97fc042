"""The report's pictures: matplotlib figures as inline SVG, thumbnails as data URIs.

Nothing here refers to anything outside the page: SVG text stays text (no font files),
clip paths get unique ids, and thumbnails are embedded JPEG bytes.
"""
from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from curate.store import Dataset  # noqa: E402
from curate.thumbs import make_thumbs  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": None, "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False})
BLUE, RED, GREEN = "#4477aa", "#cc6677", "#228833"


def svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def figure(name: str, fig, caption: str) -> str:
    return (f'<figure class="plot" data-plot="{name}">{svg(fig)}'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def bars(name: str, labels: list, values: list, title: str, xlabel: str, caption: str, horizontal: bool = False,
         color: str = BLUE, counted: str = "images") -> str:
    if horizontal:
        fig, ax = plt.subplots(figsize=(6.5, max(2.0, 0.16 * len(labels) + 0.8)))
        ax.barh([str(x) for x in labels][::-1], values[::-1], color=color)
        ax.tick_params(axis="y", labelsize=7)
    else:
        fig, ax = plt.subplots(figsize=(6.5, 2.8))
        ax.bar([str(x) for x in labels], values, color=color)
        if len(labels) > 12:
            ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.set(title=title, xlabel=xlabel if not horizontal else counted, ylabel=counted if not horizontal else "")
    (ax.xaxis if horizontal else ax.yaxis).set_major_locator(MaxNLocator(integer=True))
    return figure(name, fig, caption)


def histogram(name: str, series: dict[str, list[float]], title: str, xlabel: str, caption: str, bins: int = 40,
              log: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    for label, values in series.items():
        ax.hist(values, bins=bins, alpha=0.6 if len(series) > 1 else 1.0, label=label, log=log)
    if len(series) > 1:
        ax.legend(fontsize=7)
    ax.set(title=title, xlabel=xlabel, ylabel="images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return figure(name, fig, caption)


def scatter(name: str, x: list[float], y: list[float], title: str, caption: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.scatter(x, y, s=8, alpha=0.4, color=BLUE, linewidths=0)
    ax.set(xscale="log", yscale="log", title=title, xlabel="width (px)", ylabel="height (px)")
    return figure(name, fig, caption)


def thumbnails(ds: Dataset, items: list[dict], label=lambda item: "", title: str = "") -> str:
    """A row of thumbnails; an item with `boxes` gets them drawn over its picture (SVG, in image fractions)."""
    paths = make_thumbs(ds, [item["image_id"] for item in items])
    cells = []
    for item in items:
        path = paths.get(item["image_id"])
        if path is None:
            continue
        data = base64.b64encode(path.read_bytes()).decode()
        boxes = "".join(f'<rect x="{b["x0"]}" y="{b["y0"]}" width="{b["x1"] - b["x0"]}" height="{b["y1"] - b["y0"]}" '
                        'fill="none" stroke="#ff00ff" stroke-width="3" vector-effect="non-scaling-stroke"/>'
                        for b in item.get("boxes") or [])
        overlay = f'<svg viewBox="0 0 1 1" preserveAspectRatio="none">{boxes}</svg>' if boxes else ""
        cells.append(f'<div class="thumb"><div class="pic"><img alt="" src="data:image/jpeg;base64,{data}">{overlay}'
                     f'</div><span>{html.escape(str(label(item)))}</span></div>')
    head = f'<div class="row-title">{html.escape(title)}</div>' if title else ""
    return f'<div class="thumbs">{head}{"".join(cells)}</div>'
