"""Draw docs/distattention.svg: one request's KV spread over instances, and one layer's exchange.

    python docs/diagrams.py [--out docs/distattention.svg]

Panel (a) shows request R's KV cache as segments (runs of blocks on one instance, in position
order) among other requests' blocks and free blocks; panel (b) one layer of a step for R: the
query travels to the segments, `(o, lse)` partials come back and merge exactly on the owner.
The SVG is written without a date and with fixed element ids, so rerunning the script on an
unchanged file gives the same bytes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

BLOCK_SIZE = 16  # tokens per block in the picture
BLOCKS_PER_INSTANCE = 16
INSTANCES = ("instance 0: owner of R", "instance 1: creditor", "instance 2: creditor")
OTHER = "#c9c9c9"  # other requests' blocks
FREE = "#ffffff"
INK = "#222222"


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of R's positions on one instance, and the block ids holding it there."""

    instance: int
    start: int
    blocks: tuple[int, ...]
    color: str

    @property
    def end(self) -> int:
        return self.start + len(self.blocks) * BLOCK_SIZE


# R has 15 blocks of KV: its first blocks on its owner, then a lease on instance 1, then its
# owner again (blocks freed by a finished request), then a lease on instance 2 where its tail
# grows. The owner holds two segments of R, so a token of R gets two local partials.
SEGMENTS = (
    Segment(0, 0, (1, 2, 5, 6), "#4c72b0"),
    Segment(1, 64, (3, 4, 8, 9, 10), "#dd8452"),
    Segment(0, 144, (11, 12, 14), "#55a868"),
    Segment(2, 192, (6, 7, 13), "#c44e52"),
)
OTHERS = {0: (0, 3, 4, 7, 8, 9, 10), 1: (0, 1, 2, 5, 6, 11, 12), 2: (0, 1, 2, 3, 8, 9)}


def draw_layout(ax: Axes) -> None:
    """Panel (a): R's positions as segments, and the blocks of each instance's pool."""
    ax.set_xlim(-4.2, BLOCKS_PER_INSTANCE + 0.5)
    ax.set_ylim(-0.6, 5.6)
    ax.axis("off")
    ax.set_title("(a) Where one request's KV lives", loc="left", fontsize=12, color=INK)
    total = SEGMENTS[-1].end
    scale = BLOCKS_PER_INSTANCE / total
    ax.text(-4.1, 4.75, f"request R,\npositions 0..{total - 1}", va="center", fontsize=9)
    for i, seg in enumerate(SEGMENTS):
        x = seg.start * scale
        ax.add_patch(Rectangle((x, 4.45), (seg.end - seg.start) * scale, 0.6, facecolor=seg.color,
                               edgecolor="white", linewidth=1.5))
        ax.text(x + (seg.end - seg.start) * scale / 2, 4.75,
                f"segment {i + 1}: {seg.start}..{seg.end - 1}\non instance {seg.instance}",
                ha="center", va="center", fontsize=8, color="white")
    ax.text(total * scale, 4.2, "tail: the new token's K/V is written here", ha="right",
            va="top", fontsize=8, color=SEGMENTS[-1].color)
    for row, name in enumerate(INSTANCES):
        y = 2.9 - row * 1.25
        ax.text(-4.1, y + 0.4, name, va="center", fontsize=9)
        colors = {b: OTHER for b in OTHERS[row]}
        for seg in SEGMENTS:
            if seg.instance == row:
                colors.update(dict.fromkeys(seg.blocks, seg.color))
        for block in range(BLOCKS_PER_INSTANCE):
            ax.add_patch(Rectangle((block + 0.05, y), 0.9, 0.8,
                                   facecolor=colors.get(block, FREE), edgecolor="#777777",
                                   linewidth=0.8))
            ax.text(block + 0.5, y - 0.12, str(block), ha="center", va="top", fontsize=6,
                    color="#777777")
    legend = ((SEGMENTS[0].color, "R's blocks (colour = segment)"),
              (OTHER, "other requests' blocks"), (FREE, "free"))
    for i, (color, label) in enumerate(legend):
        x = 0.0 + i * 5.6
        ax.add_patch(Rectangle((x, -0.55), 0.5, 0.35, facecolor=color, edgecolor="#777777",
                               linewidth=0.8))
        ax.text(x + 0.7, -0.37, label, va="center", fontsize=8)


def box(ax: Axes, x: float, y: float, w: float, h: float, text: str, color: str,
        fontsize: float = 8.5) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor=INK, linewidth=0.9, alpha=0.95))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, color=INK)


def arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], label: str = "",
          color: str = INK, rad: float = 0.0, label_at: tuple[float, float] | None = None) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=color,
                                 linewidth=1.3, connectionstyle=f"arc3,rad={rad}"))
    if label:
        x, y = label_at or ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
        ax.text(x, y, label, ha="center", va="center", fontsize=7.5, color=color,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0})


def tint(color: str) -> str:
    """A light version of a colour, for box fills."""
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{int(c + (255 - c) * 0.7):02x}" for c in (r, g, b))


def draw_exchange(ax: Axes) -> None:
    """Panel (b): one layer of a step for R's new token."""
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 6.2)
    ax.axis("off")
    ax.set_title("(b) One layer of a step: the query travels, partials come back",
                 loc="left", fontsize=12, color=INK)
    s1, s2, _, s4 = SEGMENTS
    ax.text(1.9, 5.85, "instance 0 (owner)", ha="center", fontsize=9, weight="bold")
    ax.text(8.0, 5.85, "creditors", ha="center", fontsize=9, weight="bold")
    box(ax, 0.2, 4.75, 3.4, 0.8, "QKV projection + RoPE\nq, k, v of R's new token", "#eeeeee")
    box(ax, 0.2, 3.35, 3.4, 0.95,
        "local partials over segments 1, 3\n"
        r"$(o_1, \mathrm{lse}_1)$, $(o_3, \mathrm{lse}_3)$" "\n(launched before the exchange)",
        tint(s1.color))
    box(ax, 6.3, 4.2, 3.4, 1.05,
        "instance 1: partial over segment 2\n"
        r"$(o_2, \mathrm{lse}_2)$" "\n(its hosted rows of every owner,\nin one batched call)",
        tint(s2.color))
    box(ax, 6.3, 2.45, 3.4, 1.05,
        "instance 2: store k, v in segment 4,\n"
        r"then the partial $(o_4, \mathrm{lse}_4)$",
        tint(s4.color))
    box(ax, 0.2, 1.25, 3.4, 1.35,
        "exact merge on the owner\n"
        r"$\mathrm{lse} = \log \sum_j e^{\mathrm{lse}_j}$" "\n"
        r"$o = \sum_j e^{\mathrm{lse}_j - \mathrm{lse}}\, o_j$",
        "#f3e9c6", fontsize=9)
    box(ax, 0.2, 0.15, 3.4, 0.6, "O projection, MLP, next layer", "#eeeeee")
    arrow(ax, (1.9, 4.75), (1.9, 4.3))
    arrow(ax, (1.9, 3.35), (1.9, 2.6))
    arrow(ax, (1.9, 1.25), (1.9, 0.75))
    arrow(ax, (3.6, 5.15), (6.3, 4.85), "all_to_all 1: q", rad=-0.05, label_at=(4.95, 5.25))
    arrow(ax, (3.6, 4.95), (6.3, 3.2), "all_to_all 1: q, and k, v\n(the tail lives there)",
          rad=0.1, label_at=(4.75, 4.05))
    arrow(ax, (6.3, 4.35), (3.6, 2.25), r"all_to_all 2: $(o_2, \mathrm{lse}_2)$", rad=0.1,
          label_at=(5.05, 3.0), color="#6b4f2a")
    arrow(ax, (6.3, 2.6), (3.6, 1.7), r"all_to_all 2: $(o_4, \mathrm{lse}_4)$", rad=-0.05,
          label_at=(5.0, 1.9), color="#6b4f2a")
    ax.text(6.3, 1.35,
            "Per layer and creditor only a few KB move (queries out, partials back);\n"
            "a stored KV block never moves, except in an explicit migration.\n"
            "A step in which nobody exchanges skips both all_to_alls.",
            ha="left", va="top", fontsize=8, color="#555555")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("distattention.svg")))
    args = parser.parse_args()
    plt.rcParams["svg.hashsalt"] = "infinite-llm"  # fixed element ids
    plt.rcParams["svg.fonttype"] = "none"  # text stays text
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 10),
                                      gridspec_kw={"height_ratios": [1.0, 1.15]})
    draw_layout(top)
    draw_exchange(bottom)
    fig.tight_layout()
    fig.savefig(args.out, metadata={"Date": None})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
