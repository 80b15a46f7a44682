"""``make demo``: the guard in front of a stand-in upstream, driven by the official client.

It starts the stand-in OpenAI-compatible upstream and ``vlm-guard serve`` as separate
processes on loopback, sends a scripted scenario through the ``openai`` client both directly
and through the guard, and prints what happened. Rows whose defense is not built yet say so.
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

import httpx
import numpy as np
import openai
from PIL import Image
from rich.console import Console
from rich.table import Table

PENDING = {
    "adversarial (PGD) image": "purify stage not built yet (issue #4)",
    "triggered image": "backdoor stage not built yet (issue #5)",
    "cross-modal unsafe pair": "reasoner stage not built yet (issue #6)",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _process(args: list[str], ready_url: str, console: Console) -> Iterator[None]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
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
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


def _clean_image_url() -> str:
    from sklearn.datasets import load_digits

    digit = load_digits().images[7]  # an 8x8 digit, shipped with scikit-learn
    pixels = (digit / 16 * 255).astype(np.uint8)
    image = Image.fromarray(np.kron(pixels, np.ones((4, 4), np.uint8))).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(client: openai.OpenAI, url: str) -> tuple[str, str, float]:
    start = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model="echo",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What digit is in the image?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    )
    took = time.perf_counter() - start
    answer = raw.parse().choices[0].message.content or ""
    return answer, raw.headers.get("x-guard-decision", "-"), took


def main() -> int:
    console = Console()
    up, guard = _free_port(), _free_port()
    exe = [sys.executable, "-m", "guard"]
    with ExitStack() as stack:
        stack.enter_context(
            _process(
                [*exe, "toy", "upstream", "--port", str(up)],
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
        table = Table(title="vlm-guard demo (stand-in echo upstream, --defenses none)")
        for col in (
            "case",
            "direct answer",
            "through the guard",
            "decision",
            "ms direct",
            "ms guard",
        ):
            table.add_column(col)
        url = _clean_image_url()
        d_answer, _, d_took = _ask(direct, url)
        g_answer, decision, g_took = _ask(guarded, url)
        table.add_row(
            "clean image",
            d_answer,
            g_answer,
            decision,
            f"{d_took * 1000:.1f}",
            f"{g_took * 1000:.1f}",
        )
        for case, why in PENDING.items():
            table.add_row(case, "-", "-", why, "-", "-")
        console.print(table)
        console.print(
            "The echo upstream repeats the question and a digest of the pixels it received: "
            "the guard forwards exactly the pixels it checked, as a PNG data: URL."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
