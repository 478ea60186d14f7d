"""PNG pictures people would rather look at: the entropy plan, reward curves and sample grids
(animated WebP for video samples).

All writers are atomic (rendered in memory, written to a temp file, renamed) and use matplotlib's Agg backend, so
they work headless and inside ComfyUI's process.
"""

from __future__ import annotations

import io

import numpy as np

from .atomic import atomic_write_bytes


def _figure(width=8.0, height=3.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _save(plt, fig, path) -> None:
    buf = io.BytesIO()  # rendered first: a full disk is then named with the exact bytes needed
    try:
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_entropy_plan(plan, path) -> None:
    """Entropy bars per step, the tau line, merged spans shaded, SDE vs ODE steps marked."""
    plt, fig = entropy_plan_figure(plan)
    _save(plt, fig, path)


def entropy_plan_figure(plan):
    """(pyplot, figure) of the plan chart. The legend sits below the axes and the y range leaves room above
    the tallest bar, merged-score line and tau, so the legend never covers a bar and no `l=` label is clipped."""
    plt, fig = _figure(8.0, 4.2)
    ax = fig.add_subplot(111)
    idx = [s.index for s in plan.steps]
    colors = ["#d1495b" if s.kind == "sde" else "#8d99ae" for s in plan.steps]
    ax.bar(idx, [s.entropy for s in plan.steps], color=colors, edgecolor="black", linewidth=0.4, zorder=3)
    crowded = len(plan.steps) > 24  # then only merged steps get an l= label, and every k-th step a tick
    for s in plan.steps:
        if s.kind == "sde" and s.merge > 1:
            ax.axvspan(s.index - 0.45, s.index + s.merge - 0.55, color="#edae49", alpha=0.18, zorder=1)
            ax.plot([s.index, s.index + s.merge - 1], [s.merged_entropy] * 2, color="#00798c", lw=2, zorder=4)
        if s.kind == "sde" and (s.merge > 1 or not crowded):
            ax.annotate(f"l={s.merge}", (s.index, s.entropy), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points", zorder=5)
    top = max([s.entropy for s in plan.steps] + [s.merged_entropy for s in plan.steps if s.kind == "sde" and s.merge > 1]
              + [plan.tau])
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)  # headroom for the l= labels above the tallest bar
    ax.set_xlim(min(idx) - 0.7, max(idx) + 0.7)
    if plan.tau > 0:
        ax.axhline(plan.tau, color="black", ls="--", lw=1, label=f"tau = {plan.tau:g}")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color="#d1495b", label="SDE (branch, trained)"), Patch(color="#8d99ae", label="ODE")]
    if any(s.kind == "sde" and s.merge > 1 for s in plan.steps):
        handles += [Patch(color="#edae49", alpha=0.3, label="merged span"),
                    Line2D([], [], color="#00798c", lw=2, label="merged step score")]
    if plan.tau > 0:
        handles.append(ax.get_lines()[-1])
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(handles),
              frameon=False)
    ax.set_xlabel("step i (sigma_i from 1 to 0)")
    ax.set_ylabel("entropy score exp(h)")
    ax.set_title(f"E-GRPO entropy plan  (eta={plan.eta:g}, tau={plan.tau:g}, T={plan.num_steps})", fontsize=10)
    ax.set_xticks(idx[:: -(-len(idx) // 20)] if crowded else idx)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    return plt, fig


def plot_reward_curves(curves: dict[str, list[tuple[float, float]]], path, xlabel="iteration", ylabel="reward",
                       bands: dict[str, list[tuple[float, float, float]]] | None = None, title: str = "") -> None:
    """One line per named curve [(x, y), ...]; optional confidence bands [(x, lo, hi), ...]."""
    plt, fig = _figure(7, 4)
    ax = fig.add_subplot(111)
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=name)
    for name, pts in (bands or {}).items():
        if pts:
            xs, lo, hi = zip(*pts)
            ax.fill_between(xs, lo, hi, alpha=0.2, label=f"{name} 95% CI")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


VIDEO_FPS = 16  # frame rate of animated WebP samples (Wan's; any rate shows the motion)


def image_grid(rows: list, path, row_labels: list[str] | None = None, scale: int = 4) -> None:
    """Save a grid of images (each row: a tensor [N, C, H, W] in [0, 1]) as one PNG, nearest-upscaled.
    Rows of videos [N, F, C, H, W] make an animated WebP of F grids (path must end in .webp)."""
    video = rows[0].ndim == 5
    if video != str(path).endswith(".webp"):
        raise ValueError(f"{path}: a grid of {'videos' if video else 'images'} is saved as "
                         f"{'.webp (animated)' if video else '.png'}")
    if not video:
        img = _grid_picture([r.detach().float().cpu() for r in rows], row_labels, scale)
        buf = io.BytesIO()  # rendered first: a full disk is then named with the exact bytes needed
        img.save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        return
    frames = [_grid_picture([r[:, f].detach().float().cpu() for r in rows], row_labels, scale) for f in range(rows[0].shape[1])]
    # lossless: the samples show what the reward saw. libwebp stores identical consecutive frames once
    # with their durations summed (the clip keeps its length); a grid whose frames are all the same is
    # written as one still picture.
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / VIDEO_FPS),
                   loop=0, lossless=True)
    atomic_write_bytes(path, buf.getvalue())


def _grid_picture(rows: list, row_labels: list[str] | None, scale: int):
    """One PIL picture: the rows of images [N, C, H, W] side by side, upscaled, labelled at the left."""
    from PIL import Image, ImageDraw

    tiles = []
    for r in rows:
        a = (r.clamp(0, 1).numpy() * 255).round().astype(np.uint8)  # [N, C, H, W]
        a = np.repeat(a, 3, axis=1) if a.shape[1] == 1 else a[:, :3]
        a = np.pad(a, ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=255)  # a white gap between images
        tiles.append(np.concatenate(list(a.transpose(0, 2, 3, 1)), axis=1))  # [H, N*(W+1), 3]
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 2), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    img = Image.fromarray(np.concatenate(tiles, axis=0))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if row_labels:
        pad = 8 * max(len(s) for s in row_labels) + 10
        canvas = Image.new("RGB", (img.width + pad, img.height), "white")
        canvas.paste(img, (pad, 0))
        draw = ImageDraw.Draw(canvas)
        step = img.height / len(row_labels)
        for i, label in enumerate(row_labels):
            draw.text((4, int(i * step + step / 2 - 5)), label, fill="black")
        img = canvas
    return img
