"""Draw the metaworld embodiment's views for a few tasks into one labelled PNG grid.

    .venv/bin/python bench/render_views.py [--out docs/metaworld-views.png] [--step 40]

Each row is a task mid-episode under its scripted expert (no noise); each column a view,
upscaled without smoothing so the 64x64 pixels the models see stay visible.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rise.embodiment import PRESETS
from rise.sim.metaworld_sim import MetaWorldSim, expert_policy

TASKS = ["pick-place", "push", "drawer-open", "peg-insert-side", "assembly"]
SCALE = 4
LABEL_WIDTH, HEADER_HEIGHT, GAP = 170, 30, 4


def render_mid_episode(task: str, step: int, seed: int) -> dict[str, np.ndarray]:
    embodiment = PRESETS["metaworld"]
    sim = MetaWorldSim(task, embodiment, max_steps=step + 1)
    expert = expert_policy(task)
    frame = sim.reset(seed)
    for _ in range(step):
        frame = sim.step(np.clip(expert.get_action(frame.raw_obs), -1, 1))
    sim.close()
    return frame.views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/metaworld-views.png"))
    parser.add_argument("--step", type=int, default=40, help="Expert steps before the snapshot.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")

    embodiment = PRESETS["metaworld"]
    size = embodiment.image_height * SCALE
    font = ImageFont.load_default(size=18)
    width = LABEL_WIDTH + len(embodiment.views) * (size + GAP)
    height = HEADER_HEIGHT + len(TASKS) * (size + GAP)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for col, view in enumerate(embodiment.views):
        draw.text((LABEL_WIDTH + col * (size + GAP) + 6, 6), view, fill="black", font=font)
    for row, task in enumerate(TASKS):
        top = HEADER_HEIGHT + row * (size + GAP)
        draw.text((6, top + size // 2 - 10), task, fill="black", font=font)
        views = render_mid_episode(task, args.step, args.seed)
        for col, view in enumerate(embodiment.views):
            image = Image.fromarray(views[view]).resize((size, size), Image.Resampling.NEAREST)
            sheet.paste(image, (LABEL_WIDTH + col * (size + GAP), top))
    draw.text((6, 6), f"step {args.step}, 64x64", fill="gray", font=font)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({width}x{height})")


if __name__ == "__main__":
    main()
