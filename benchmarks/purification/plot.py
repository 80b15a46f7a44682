"""purification.png: example images through each defense, and accuracy against cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.purification.common import Condition, Defense, Outcome


def plot(
    path: Path,
    defenses: list[Defense],
    results: dict[str, dict[str, Outcome]],
    rows: dict[str, dict[str, Any]],
    conditions: list[Condition],
    truth: list[str],
) -> None:
    """Top: up to two examples (ones PGD fools first), clean, attacked and after each defense.
    Bottom: each defense's clean and robust accuracy against its UNet evaluations per image
    on the 90/10 mix."""
    # matplotlib is a dev extra (pyproject): only needed here, at the very end of a run.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacked = next(c for c in conditions if c.key == "untargeted_8")
    # Examples the attack matters for: read right when clean, wrong when attacked.
    none = results["none"]
    fooled = none["clean"].correct & ~none["untargeted_8"].correct
    order = [*np.flatnonzero(fooled), *np.flatnonzero(~fooled)]
    examples = [int(i) for i in order[: min(2, len(truth))]]
    shown = [d for d in defenses if d.family != "none"]
    cols = 2 + len(shown)
    fig = plt.figure(figsize=(max(12.0, 1.15 * cols), 2.6 * len(examples) + 5.5))
    grid = fig.add_gridspec(len(examples) + 1, cols, height_ratios=[1] * len(examples) + [3.2])

    def word(text: str) -> str:
        return text.removeprefix("The digit is ").rstrip(".") or "''"

    for r, i in enumerate(examples):
        panels: list[tuple[str, np.ndarray, str, int | None]] = [
            ("clean", conditions[0].images[i], results["none"]["clean"].answers[i], None)
        ]
        panels.append(
            ("PGD u ε=8", attacked.images[i], results["none"]["untargeted_8"].answers[i], None)
        )
        for d in shown:
            o = results[d.key]["untargeted_8"]
            t = None if o.t_star is None else int(o.t_star[i])
            panels.append((d.label, o.images[i], o.answers[i], t))
        for c, (title, image, said, t) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ok = said == truth[i]
            suffix = "" if t is None else f"\nt*={t}"
            ax.set_title(title.replace(" (", "\n("), fontsize=6.5)
            ax.set_xlabel(f"{word(said)}{suffix}", fontsize=7, color="green" if ok else "red")
    ax = fig.add_subplot(grid[len(examples), :])
    colours = {"none": "black", "jpeg": "tab:gray", "diffpure": "tab:blue", "diffcap": "tab:red"}
    markers = {None: "^", "ddpm": "o", "ddim": "s"}
    for d in defenses:
        row = rows[d.key]
        x = row["unet_evals_mix"]
        colour = colours[d.family]
        if d.family == "diffcap" and d.encoder == "open_clip":
            colour = "tab:orange"
        marker = markers[d.sampler]
        ax.plot([x, x], [row["robust_accuracy"], row["clean_accuracy"]], color=colour, lw=0.6)
        ax.scatter(x, row["robust_accuracy"], color=colour, marker=marker, s=50, zorder=3)
        ax.scatter(
            x, row["clean_accuracy"], facecolors="none", edgecolors=colour, marker=marker, s=50
        )
        ax.annotate(
            d.label,
            (x, row["robust_accuracy"]),
            fontsize=6.5,
            xytext=(4, 4 if d.encoder == "open_clip" else -8),  # the two DiffCAPs sit close
            textcoords="offset points",
        )
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("mean UNet evaluations per image (90% clean / 10% attacked mix)")
    ax.set_ylabel("VLM accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.scatter([], [], color="k", marker="o", label="robust (mean of 4 PGD attacks), DDPM")
    ax.scatter([], [], color="k", marker="s", label="robust, DDIM")
    ax.scatter([], [], facecolors="none", edgecolors="k", marker="o", label="clean")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("accuracy vs cost (red: DiffCAP/VLM tower, orange: DiffCAP/CLIP, blue: DiffPure)")
    fig.suptitle(
        "Toy VLM under white-box PGD (ε=8/255, untargeted): clean / attacked / purified "
        "(label: the VLM's answer, green = right)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
