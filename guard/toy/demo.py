"""``make demo``: the guard in front of the toy VLM, driven by the official openai client.

Builds the toy world if it is missing (cached under $VLM_GUARD_HOME/toy), starts two stand-in
upstreams — one serving the toy VLM, one serving the toy reasoner — and ``vlm-guard serve`` in
front of the VLM with all three stages: purify (the toy's diffusion model and the VLM's own
vision tower, τ from the build's calibration), reasoner (the toy reasoner in reasoning-json) and
backdoor (the VLM with the build's BYE profile), as separate processes on loopback. Then it
sends a scripted scenario directly and through the guard and prints a table, with each stage's
decision from the guard's gRPC ``Check``, and the reasoner's block as the audit log recorded it.
It also writes demo.png (clean / attacked / purified by the guard / triggered images).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import openai
import yaml
from PIL import Image
from rich.console import Console
from rich.table import Table

from guard.toy.attacks import PGDSettings, pgd_vlm
from guard.toy.backdoor import backdoor_config
from guard.toy.build import BuildOptions, build_world
from guard.toy.checks import purify_config
from guard.toy.data import DIGITS, eval_images, load_splits
from guard.toy.processes import GUARD, free_port, running
from guard.toy.ssui import all_pairs
from guard.toy.triggers import Trigger
from guard.toy.vlm import load_vlm
from guard.toy.vlm_parts import QUESTIONS, answer
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc

MODEL = "toy-vlm"
REASONER = "toy-reasoner"


def _url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(image)).decode()


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


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m guard.toy.demo", description="The vlm-guard demo on the toy world."
    ).parse_args(argv)
    # Off a terminal (CI logs, pipes) rich would wrap the table at 80 columns.
    console = Console() if Console().is_terminal else Console(width=180)
    world = BuildOptions()
    if not (world.out / "manifest.json").exists():
        console.print(
            f"building the toy world in {world.out} (first run only, about 19 min on 2 cores) …"
        )
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
    # Harmless image, harmless text: the result of the arithmetic decides (guard/toy/ssui.py).
    unsafe = next(p for p in all_pairs() if p.digit == label and p.unsafe and p.operation == "plus")
    benign = next(p for p in all_pairs() if p.digit == label and not p.unsafe and p.operand > 0)
    question = QUESTIONS[0]
    rows = [
        ("clean image", clean[0], question),
        (f"adversarial (PGD → '{DIGITS[wrong]}')", attacked[0], question),
        ("triggered image", triggered[0], question),
        (f"cross-modal pair, {benign.asks} = {benign.result}", clean[0], benign.text),
        (f"cross-modal pair, {unsafe.asks} = {unsafe.result}", clean[0], unsafe.text),
    ]
    up, judge, guard, grpc_port = free_port(), free_port(), free_port(), free_port()
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        config, audit = scratch / "guard.yaml", scratch / "audit.jsonl"
        config.write_text(
            yaml.safe_dump(
                {
                    "upstream": {"url": f"http://127.0.0.1:{up}/v1"},
                    "server": {"http_port": guard, "grpc_port": grpc_port},
                    "pipeline": {"defenses": ["purify", "reasoner", "backdoor"]},
                    "purify": purify_config(out),
                    "reasoner": {"url": f"http://127.0.0.1:{judge}/v1", "model": REASONER},
                    "backdoor": backdoor_config(out),
                    "audit": {"path": str(audit)},
                    "log_level": "warning",
                }
            )
        )
        served = [(up, out / "vlm", MODEL), (judge, out / "reasoner" / "final", REASONER)]
        with console.status("starting the stand-in upstreams and the guard …"):
            for port, weights, name in served:
                serve = ["toy", "upstream", "--port", str(port), "--model", str(weights)]
                stack.enter_context(
                    running([*GUARD, *serve, "--name", name], f"http://127.0.0.1:{port}/v1/models")
                )
            stack.enter_context(
                running(
                    [*GUARD, "serve", "--config", str(config)], f"http://127.0.0.1:{guard}/readyz"
                )
            )
        direct = openai.OpenAI(base_url=f"http://127.0.0.1:{up}/v1", api_key="none")
        guarded = openai.OpenAI(base_url=f"http://127.0.0.1:{guard}/v1", api_key="none")
        table = Table(
            title=f"vlm-guard demo — toy VLM, true digit: {DIGITS[label]} "
            "(defenses: purify, reasoner, backdoor)"
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
        for case, image, text in rows:
            d_answer, _, d_took = _ask(direct, image, text)
            g_answer, decision, g_took = _ask(guarded, image, text)
            stages = asyncio.run(_stage_decisions(grpc_port, image, text))
            table.add_row(
                f"{case}\n“{text}”",
                d_answer,
                g_answer,
                f"{decision} — {stages}",
                f"{d_took * 1000:.0f}",
                f"{g_took * 1000:.0f}",
            )
        purified = asyncio.run(_purified(grpc_port, attacked[0]))
        console.print(table)
        console.print(_reasoner_blocks(audit))
    _save_png(
        out.parent / "demo.png",
        [clean, attacked, purified[None], triggered],
        ["clean", "PGD attacked", "purified by the guard", "triggered"],
    )
    console.print(
        f"images: {out.parent / 'demo.png'}; toy world quality: "
        f"{'all floors met' if manifest['quality_ok'] else 'BELOW FLOORS'} "
        f"({out / 'manifest.json'})"
    )
    return 0


async def _stage_decisions(port: int, image: np.ndarray, text: str) -> str:
    """Each stage's decision on ``image`` and ``text``, from the guard's gRPC Check (the real
    stubs)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await pb_grpc.GuardStub(channel).Check(
            pb.CheckRequest(text=text, images=[pb.Image(data=_png(image))])
        )
    parts = []
    for d in reply.decisions:
        # protobuf's Struct has no .get()
        images = d.details["images"] if "images" in d.details else []  # noqa: SIM401
        if d.stage == "purify":
            steps = [str(int(im["steps"])) for im in images]
            score = f", score {d.score:.1f}" if d.HasField("score") else ""
            parts.append(f"{d.stage}: {d.action} (t* {', '.join(steps)}{score})")
        elif d.stage == "reasoner":
            parts.append(f"{d.stage}: {d.action}" + (f" ({d.category})" if d.category else ""))
        else:
            threshold = d.details["threshold"] if "threshold" in d.details else float("nan")
            seen = ", ".join(f"{im['view']} {im['score']:.3f}" for im in images)
            parts.append(f"{d.stage}: {d.action} (entropy {seen}; flags < {threshold:.3f})")
    return "; ".join(parts) or "no stages"


def _reasoner_blocks(audit: Path) -> str:
    """The reasoner's blocks of the HTTP requests (not of the gRPC Checks that explain each
    row), as the guard's audit log recorded them: category and reasoning."""
    lines = []
    for entry in map(json.loads, audit.read_text().splitlines()):
        for block in entry.get("blocking", []) if entry["transport"] == "http" else []:
            if block["stage"] == "reasoner":
                reasoning = str(block["details"].get("reasoning", ""))
                excerpt = reasoning if len(reasoning) <= 160 else reasoning[:157] + "…"
                lines.append(f"  {block['category']}: “{excerpt}”")
    return "audit log, reasoner blocks:\n" + ("\n".join(lines) or "  none")


async def _purified(port: int, image: np.ndarray) -> np.ndarray:
    """The pixels the guard forwards for ``image`` (gRPC Purify)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await pb_grpc.GuardStub(channel).Purify(
            pb.PurifyRequest(images=[pb.Image(data=_png(image))])
        )
    with Image.open(io.BytesIO(reply.images[0].png)) as purified:
        return np.asarray(purified.convert("RGB"))


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


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
