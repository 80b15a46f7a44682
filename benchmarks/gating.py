"""Time to first token, sequential vs parallel gating (issue #6, item 2).

Starts the stand-in upstream (echo, streaming, a delay per token that stands for prefill and
decoding), a stand-in reasoner that answers "safe" after a fixed delay (an OpenAI-compatible
server, in this process), and two guards with the reasoner stage, one per gating mode, as
separate processes; then sends the same streamed requests directly and through each guard,
alternating, and reports time to the first content chunk and to the end of the answer.

    python benchmarks/gating.py [--requests 40] [--reasoner-delay 0.1 0.3] [--token-delay 0.05]

Writes benchmarks/results/gating.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
import yaml
from fastapi import FastAPI, Request
from rich.console import Console
from rich.table import Table

from guard.toy.processes import GUARD, free_port, running

RESULTS = Path(__file__).parent / "results"
SAFE = '{"reasoning": "harmless", "verdict": "safe", "category": "none"}'


def _reasoner(delay_s: float) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        await request.json()
        await asyncio.sleep(delay_s)  # the reasoner model's own latency
        message = {"role": "assistant", "content": SAFE}
        return {"object": "chat.completion", "choices": [{"index": 0, "message": message}]}

    return app


def _serve_in_thread(app: FastAPI, port: int) -> uvicorn.Server:
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def _ttft(url: str, body: dict[str, Any]) -> tuple[float, float]:
    """Seconds to the first content chunk and to the end of the stream."""
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and _has_text(line):
                first = time.perf_counter() - start
    return (first if first is not None else float("nan")), time.perf_counter() - start


def _has_text(line: str) -> bool:
    """A chunk that carries answer text (not the opening role chunk with empty content)."""
    choices = json.loads(line.removeprefix("data: ")).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="per side and setting")
    parser.add_argument("--reasoner-delay", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--token-delay", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=RESULTS / "gating.json")
    args = parser.parse_args()
    console = Console()
    body = {
        "model": "echo",
        "stream": True,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "say a few words about the weather"}],
    }
    results: dict[str, Any] = {}
    up = free_port()
    upstream = ["toy", "upstream", "--port", str(up), "--token-delay", str(args.token_delay)]
    with running([*GUARD, *upstream], f"http://127.0.0.1:{up}/v1/models"):
        for delay in args.reasoner_delay:
            reasoner_port = free_port()
            reasoner = _serve_in_thread(_reasoner(delay), reasoner_port)
            with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
                urls = {"direct": f"http://127.0.0.1:{up}"}
                urls.update(_guards(stack, tmp, up, reasoner_port))
                times: dict[str, list[tuple[float, float]]] = {k: [] for k in urls}
                for _ in range(args.requests):
                    for side, url in urls.items():  # alternate: noise hits every side alike
                        times[side].append(_ttft(url, body))
            reasoner.should_exit = True
            results[f"reasoner {delay * 1000:.0f} ms"] = {
                side: {
                    "ttft_p50_ms": round(1000 * float(np.median([t[0] for t in v])), 1),
                    "total_p50_ms": round(1000 * float(np.median([t[1] for t in v])), 1),
                }
                for side, v in times.items()
            }
    title = f"Time to first token, streamed, token delay {args.token_delay * 1000:.0f} ms"
    table = Table(title=title)
    for col in ("setting", "side", "TTFT p50 ms", "total p50 ms"):
        table.add_column(col)
    for setting, sides in results.items():
        for side, r in sides.items():
            table.add_row(setting, side, f"{r['ttft_p50_ms']:.1f}", f"{r['total_p50_ms']:.1f}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": {**vars(args), "out": str(args.out)}, "results": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"wrote {args.out}")
    return 0


def _guards(stack: ExitStack, tmp: str, upstream: int, reasoner: int) -> dict[str, str]:
    """Two guards with the reasoner stage, sequential and parallel gating, as processes."""
    urls = {}
    for gating in ("sequential", "parallel"):
        port = free_port()
        config = Path(tmp) / f"{gating}.yaml"
        section = {"url": f"http://127.0.0.1:{reasoner}/v1", "model": "judge", "cache_bytes": 0}
        config.write_text(
            yaml.safe_dump(
                {
                    "upstream": {"url": f"http://127.0.0.1:{upstream}/v1"},
                    "server": {"http_port": port, "grpc_port": None},
                    "pipeline": {"defenses": ["reasoner"], "gating": gating},
                    "reasoner": section,
                    "log_level": "warning",
                }
            )
        )
        ready = f"http://127.0.0.1:{port}/readyz"
        stack.enter_context(running([*GUARD, "serve", "--config", str(config)], ready))
        urls[gating] = f"http://127.0.0.1:{port}"
    return urls


if __name__ == "__main__":
    raise SystemExit(main())
