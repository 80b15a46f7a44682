"""What does the guard cost when it checks nothing? Guard (--defenses none) vs direct.

Starts the stand-in upstream and a guard in front of it as separate processes (as deployed:
sidecar and model server), then sends the same request mix at the same concurrency to both,
alternating rounds so machine noise hits both sides alike. Prints a table, writes
benchmarks/results/proxy_overhead.json and .png.

    python benchmarks/proxy_overhead.py [--requests 300] [--concurrency 1 16] [--token-delay 0.002]

The upstream answers with a per-token delay (default 2 ms, about 10 tokens) so that it behaves
like a model server rather than a CPU-bound echo; --token-delay 0 is the guard's worst case.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from guard.toy.processes import GUARD, free_port, running

RESULTS = Path(__file__).parent / "results"


def _image_url() -> str:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bodies(stream: bool, image: bool) -> dict[str, Any]:
    content: Any = "Describe the weather in three short words please"
    if image:
        content = [
            {"type": "text", "text": content},
            {"type": "image_url", "image_url": {"url": _image_url()}},
        ]
    body: dict[str, Any] = {
        "model": "echo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 32,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def _run(url: str, body: dict[str, Any], n: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    ttfts: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    # aiohttp for the load: an httpx client costs more CPU per request than the guard does,
    # and on 2 cores the load generator's cost would be charged to whichever side it slows.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                queue.get_nowait()
                start = time.perf_counter()
                async with client.post(url + "/v1/chat/completions", json=body) as r:
                    first = None
                    async for _ in r.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
                    if r.status != 200:
                        errors += 1
                end = time.perf_counter()
                latencies.append(end - start)
                ttfts.append((first or end) - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "ttfts": ttfts, "wall": wall, "errors": errors}


def _q(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="per scenario, side, round")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 16],
        help="1 shows the added latency alone; higher levels add queueing on a shared CPU",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    parser.add_argument("--token-delay", type=float, default=0.002)
    args = parser.parse_args()
    console = Console()
    up_port, guard_port = free_port(), free_port()
    exe = GUARD
    upstream = f"http://127.0.0.1:{up_port}"
    guard = f"http://127.0.0.1:{guard_port}"
    env_note = f"{os.cpu_count()} cores"
    scenarios = [(c, s, i) for c in args.concurrency for i in (False, True) for s in (False, True)]
    results: dict[str, dict[str, Any]] = {}
    with (
        running(
            [
                *exe,
                "toy",
                "upstream",
                "--port",
                str(up_port),
                "--token-delay",
                str(args.token_delay),
            ],
            upstream + "/v1/models",
        ),
        running(
            [
                *exe,
                "serve",
                "--upstream",
                upstream + "/v1",
                "--http-port",
                str(guard_port),
                "--grpc-port",
                "-1",
                "--defenses",
                "none",
            ],
            guard + "/readyz",
        ),
        Progress(console=console, transient=True) as progress,
    ):
        task = progress.add_task("measuring", total=len(scenarios) * 2 * args.rounds)
        for conc, stream, image in scenarios:
            name = f"c{conc} {'stream' if stream else 'json'}{'+image' if image else ''}"
            body = _bodies(stream, image)
            acc: dict[str, dict[str, Any]] = {
                side: {"latencies": [], "ttfts": [], "wall": 0.0, "errors": 0}
                for side in ("direct", "guard")
            }
            for _side, url in (("direct", upstream), ("guard", guard)):  # warm-up
                asyncio.run(_run(url, body, 2 * conc, conc))
            for _ in range(args.rounds):
                for side, url in (("direct", upstream), ("guard", guard)):
                    r = asyncio.run(_run(url, body, args.requests, conc))
                    for k in ("latencies", "ttfts"):
                        acc[side][k].extend(r[k])
                    acc[side]["wall"] += r["wall"]
                    acc[side]["errors"] += r["errors"]
                    progress.advance(task)
            results[name] = acc
    table = Table(
        title=f"Proxy overhead, --defenses none ({env_note}, token delay "
        f"{args.token_delay * 1000:.1f} ms, c = concurrent clients)"
    )
    for col in (
        "scenario",
        "direct req/s",
        "guard req/s",
        "ratio",
        "direct p50 ms",
        "guard p50 ms",
        "+p50 ms",
        "direct p99 ms",
        "guard p99 ms",
        "+p99 ms",
        "+TTFT p50 ms",
        "errors",
    ):
        table.add_column(col, justify="right")
    summary: dict[str, Any] = {"args": vars(args), "cores": os.cpu_count(), "scenarios": {}}
    for name, acc in results.items():
        d, g = acc["direct"], acc["guard"]
        d_rps, g_rps = len(d["latencies"]) / d["wall"], len(g["latencies"]) / g["wall"]
        row = {
            "direct_rps": d_rps,
            "guard_rps": g_rps,
            "ratio": g_rps / d_rps,
            "direct_p50_ms": 1000 * _q(d["latencies"], 0.5),
            "guard_p50_ms": 1000 * _q(g["latencies"], 0.5),
            "direct_p99_ms": 1000 * _q(d["latencies"], 0.99),
            "guard_p99_ms": 1000 * _q(g["latencies"], 0.99),
            "added_ttft_p50_ms": 1000 * (_q(g["ttfts"], 0.5) - _q(d["ttfts"], 0.5)),
            "errors": d["errors"] + g["errors"],
        }
        row["added_p50_ms"] = row["guard_p50_ms"] - row["direct_p50_ms"]
        row["added_p99_ms"] = row["guard_p99_ms"] - row["direct_p99_ms"]
        summary["scenarios"][name] = row
        table.add_row(
            name,
            f"{d_rps:.0f}",
            f"{g_rps:.0f}",
            f"{row['ratio']:.2f}",
            f"{row['direct_p50_ms']:.2f}",
            f"{row['guard_p50_ms']:.2f}",
            f"{row['added_p50_ms']:+.2f}",
            f"{row['direct_p99_ms']:.2f}",
            f"{row['guard_p99_ms']:.2f}",
            f"{row['added_p99_ms']:+.2f}",
            f"{row['added_ttft_p50_ms']:+.2f}",
            str(row["errors"]),
        )
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "proxy_overhead.json").write_text(json.dumps(summary, indent=2))
    _plot(results, RESULTS / "proxy_overhead.png")
    console.print(f"wrote {RESULTS / 'proxy_overhead.json'} and proxy_overhead.png")
    return 0


def _plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(results) // 2 if len(results) > 4 else len(results)
    rows = (len(results) + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    axes = grid.ravel()
    for ax, (name, acc) in zip(axes, results.items(), strict=True):
        for side, colour in (("direct", "tab:blue"), ("guard", "tab:orange")):
            xs = np.sort(np.array(acc[side]["latencies"]) * 1000)
            ax.plot(xs, np.linspace(0, 1, len(xs)), label=side, color=colour)
        ax.set_title(name)
        ax.set_xlabel("latency (ms)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    axes[0].legend()
    fig.suptitle("Request latency CDF: direct vs through the guard (--defenses none)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
