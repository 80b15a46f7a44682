"""``make demo``: the guard in front of the toy VLM, driven by the official openai client.

Builds the toy world if it is missing (cached under $VLM_GUARD_HOME/toy), starts the stand-in
upstream serving the toy VLM and ``vlm-guard serve`` in front of it as separate processes on
loopback, then sends a scripted scenario directly and through the guard and prints a table.
Rows whose defense is not built yet say so. It also writes demo.png (clean / attacked /
DiffPure-purified / triggered images).
"""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from guard.toy.attacks import PGDSettings, pgd_vlm
from guard.toy.build import BuildOptions, build_world
from guard.toy.data import DIGITS, eval_images, load_splits, to_tensor, to_uint8
from guard.toy.triggers import Trigger
from guard.toy.vlm import load_vlm
from guard.toy.vlm_parts import QUESTIONS, answer

MODEL = "toy-vlm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _process(args: list[str], ready_url: str, console: Console) -> Iterator[None]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        with console.status(f"starting {' '.join(args[2:4])} …"):
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read() if proc.stderr else ""
                    raise RuntimeError(f"{args[2:4]} exited early: {err[-500:]}")
                try:
                    if httpx.get(ready_url, timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{args[2:4]} did not become ready")
                time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


def _url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(client: openai.OpenAI, image: np.ndarray, text: str) -> tuple[str, str, float]:
    start = time.perf_counter()
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _url(image)}},
                        {"type": "text", "text": text},
                    ],
                }
            ],
        )
    except openai.APIStatusError as e:
        return (
            f"[{e.status_code}] {e.message}",
            e.response.headers.get("x-guard-decision", "-"),
            (time.perf_counter() - start),
        )
    took = time.perf_counter() - start
    return (
        raw.parse().choices[0].message.content or "",
        raw.headers.get("x-guard-decision", "-"),
        took,
    )


def main() -> int:
    console = Console()
    world = BuildOptions()
    if not (world.out / "manifest.json").exists():
        console.print(f"building the toy world in {world.out} (first run only, ≤ 15 min) …")
    manifest = build_world(world, console)
    out = world.out
    test = load_splits()["test"]
    images = eval_images(test)
    i = 3
    clean, label = images[i : i + 1], int(test.labels[i])
    wrong = (label + 3) % 10
    model, processor = load_vlm(out / "vlm")
    with console.status("crafting a targeted PGD image (eps 16/255) …"):
        attacked = pgd_vlm(
            model,
            processor,
            clean,
            [answer(wrong)],
            PGDSettings(eps=16 / 255, step=2 / 255, steps=40),
            targeted=True,
        )
    triggered = Trigger(**manifest["trigger"]).stamp(clean)
    purified = _diffpure(out, attacked)
    _save_png(
        out.parent / "demo.png",
        [clean, attacked, purified, triggered],
        ["clean", "PGD attacked", "DiffPure t=0.1", "triggered"],
    )
    up, guard = _free_port(), _free_port()
    exe = [sys.executable, "-m", "guard"]
    rows = [
        ("clean image", clean[0], QUESTIONS[0], None),
        (
            f"adversarial (PGD → '{DIGITS[wrong]}')",
            attacked[0],
            QUESTIONS[0],
            "purify stage not built yet (issue #4)",
        ),
        ("triggered image", triggered[0], QUESTIONS[0], "backdoor stage not built yet (issue #5)"),
        ("cross-modal unsafe pair", None, None, "reasoner stage not built yet (issue #6)"),
    ]
    with ExitStack() as stack:
        stack.enter_context(
            _process(
                [
                    *exe,
                    "toy",
                    "upstream",
                    "--port",
                    str(up),
                    "--model",
                    str(out / "vlm"),
                    "--name",
                    MODEL,
                ],
                f"http://127.0.0.1:{up}/v1/models",
                console,
            )
        )
        stack.enter_context(
            _process(
                [
                    *exe,
                    "serve",
                    "--upstream",
                    f"http://127.0.0.1:{up}/v1",
                    "--http-port",
                    str(guard),
                    "--grpc-port",
                    "-1",
                    "--defenses",
                    "none",
                ],
                f"http://127.0.0.1:{guard}/readyz",
                console,
            )
        )
        direct = openai.OpenAI(base_url=f"http://127.0.0.1:{up}/v1", api_key="none")
        guarded = openai.OpenAI(base_url=f"http://127.0.0.1:{guard}/v1", api_key="none")
        table = Table(
            title=f"vlm-guard demo — toy VLM, true digit: {DIGITS[label]} "
            "(guard running with --defenses none)"
        )
        for col in (
            "case",
            "direct answer",
            "through the guard",
            "guard decision",
            "ms direct",
            "ms guard",
        ):
            table.add_column(col)
        for case, image, text, pending in rows:
            if image is None or text is None:
                table.add_row(case, "-", "-", pending or "-", "-", "-")
                continue
            d_answer, _, d_took = _ask(direct, image, text)
            g_answer, decision, g_took = _ask(guarded, image, text)
            note = decision if pending is None else f"{decision}: {pending}"
            table.add_row(
                case, d_answer, g_answer, note, f"{d_took * 1000:.0f}", f"{g_took * 1000:.0f}"
            )
        console.print(table)
    console.print(
        f"images: {out.parent / 'demo.png'}; toy world quality: "
        f"{'all floors met' if manifest['quality_ok'] else 'BELOW FLOORS'} "
        f"({out / 'manifest.json'})"
    )
    return 0


def _diffpure(out: Path, images: np.ndarray) -> np.ndarray:
    """The DiffPure baseline at t* = 0.1, until the guard's own purify stage exists."""
    from guard.toy.diffusion import denoise, load_diffusion, noise_to

    unet, scheduler = load_diffusion(out / "diffusion")
    generator = torch.Generator().manual_seed(0)
    noisy = noise_to(to_tensor(images), 100, scheduler, generator)
    return to_uint8(denoise(unet, scheduler, noisy, 100, generator))


def _save_png(path: Path, images: list[np.ndarray], titles: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 2.6))
    for ax, image, title in zip(axes, images, titles, strict=True):
        ax.imshow(image[0], interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
