"""Open-loop load through the guard vs direct, overload shedding, and memory on image bombs.

Starts the stand-in upstream (echo, a per-token delay so a request takes about as long as a
short generation) and a guard in front of it (--defenses none, admission at a known capacity)
as separate processes on loopback. Then:

1. below the knee: constant-rate, open-loop arrivals (each request starts on schedule, whether
   or not earlier ones are done) at fixed rates, direct and through the guard, alternating;
   p50 / p99 latency and errors per rate;
2. at 2× the guard's capacity: the share of requests shed with 429 / 503 (+ Retry-After),
   and whether any other status or a lost request appears;
3. bombs: PNGs that declare 400 MP, 49 MP (147 MB decoded) and a large allowed image, sent
   concurrently; the guard's peak resident memory (VmHWM) before and after, and the statuses.

    python benchmarks/load.py [--seconds 8] [--rates 10 20 40] [--inflight 8]

Bounded in count and time. Writes benchmarks/results/load.json and load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from guard.toy.processes import GUARD, free_port, running

RESULTS = Path(__file__).parent / "results"


def _png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(url: str) -> dict[str, Any]:
    content = [{"type": "text", "text": "What is in this picture?"}]
    content.append({"type": "image_url", "image_url": {"url": url}})  # type: ignore[dict-item]
    return {"model": "echo", "messages": [{"role": "user", "content": content}], "max_tokens": 16}


async def _open_loop(
    url: str, body: dict[str, Any], rate: float, seconds: float, limit_s: float
) -> dict[str, Any]:
    """Requests at a constant rate for ``seconds``; every one is awaited to its end."""
    results: list[tuple[int, float]] = []

    async def one(session: aiohttp.ClientSession) -> None:
        start = time.perf_counter()
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                await r.read()
                results.append((r.status, time.perf_counter() - start))
        except (aiohttp.ClientError, TimeoutError):
            results.append((0, time.perf_counter() - start))  # lost: no HTTP answer

    limits = aiohttp.TCPConnector(limit=0)
    client_timeout = aiohttp.ClientTimeout(total=limit_s)
    async with aiohttp.ClientSession(connector=limits, timeout=client_timeout) as session:
        n = int(rate * seconds)
        begin = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session)))
        await asyncio.gather(*tasks)
    ok = [s for status, s in results if status == 200]
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "rate": rate,
        "sent": n,
        "answered": len(results),
        "statuses": statuses,
        "p50_ms": round(1000 * float(np.percentile(ok, 50)), 1) if ok else None,
        "p99_ms": round(1000 * float(np.percentile(ok, 99)), 1) if ok else None,
    }


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def _bombs(url: str, count: int) -> dict[str, dict[str, int]]:
    images = {
        "400 MP declared (20000×20000)": Image.new("RGB", (20000, 20000)),
        "49 MP, 147 MB decoded (7000×7000)": Image.new("RGB", (7000, 7000)),
        "allowed, 18 MB decoded (2500×2500)": Image.new("RGB", (2500, 2500)),
    }
    out: dict[str, dict[str, int]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for name, image in images.items():
            body = _body(_png_url(image))

            async def one(payload: dict[str, Any] = body) -> int:
                async with session.post(url + "/v1/chat/completions", json=payload) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one() for _ in range(count)))
            out[name] = {str(s): statuses.count(s) for s in set(statuses)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per rate and side")
    parser.add_argument("--rates", type=float, nargs="+", default=[10, 20, 40])
    parser.add_argument("--inflight", type=int, default=8, help="the guard's max_inflight")
    parser.add_argument("--queue", type=int, default=8, help="the guard's max_queue")
    parser.add_argument("--token-delay", type=float, default=0.01)
    parser.add_argument("--bombs", type=int, default=8, help="concurrent requests per bomb")
    parser.add_argument(
        "--pixel-budget",
        type=int,
        default=150_000_000,
        help="the guard's images.max_inflight_pixels (its default)",
    )
    args = parser.parse_args()
    console = Console()
    up, guard = free_port(), free_port()
    cfg = {
        "server": {
            "host": "127.0.0.1",
            "http_port": guard,
            "grpc_port": None,
            "max_inflight": args.inflight,
            "max_queue": args.queue,
            "queue_timeout_s": 2,
        },
        "upstream": {"url": f"http://127.0.0.1:{up}/v1"},
        "images": {"max_inflight_pixels": args.pixel_budget},
        "pipeline": {"defenses": []},
        "log_level": "error",
    }
    report: dict[str, Any] = {"settings": vars(args)}
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "guard.yaml"
        config.write_text(yaml.safe_dump(cfg))
        serve_up = ["toy", "upstream", "--port", str(up), "--token-delay", str(args.token_delay)]
        with (
            running([*GUARD, *serve_up], f"http://127.0.0.1:{up}/v1/models"),
            running(
                [*GUARD, "serve", "--config", str(config)], f"http://127.0.0.1:{guard}/readyz"
            ) as guard_proc,
        ):
            base = {"direct": f"http://127.0.0.1:{up}", "guard": f"http://127.0.0.1:{guard}"}
            body = _body(_png_url(Image.fromarray(np.full((64, 64, 3), 128, np.uint8))))
            # One request alone: the service time that sets the guard's capacity.
            solo = asyncio.run(_open_loop(base["guard"], body, 2, 3, 30))
            service_s = (solo["p50_ms"] or 100) / 1000
            capacity = args.inflight / service_s
            report["service_ms"], report["capacity_rps"] = solo["p50_ms"], round(capacity, 1)
            rows: list[dict[str, Any]] = []
            with Progress(console=console) as progress:
                task = progress.add_task("open-loop rates", total=2 * len(args.rates) + 2)
                for rate in args.rates:
                    for side in ("direct", "guard"):
                        row = asyncio.run(_open_loop(base[side], body, rate, args.seconds, 30))
                        rows.append({"side": side, **row})
                        progress.advance(task)
                overload = asyncio.run(_open_loop(base["guard"], body, 2 * capacity, 5, 30))
                progress.advance(task)
                before = _peak_rss_mib(guard_proc.pid)
                bombs = asyncio.run(_bombs(base["guard"], args.bombs))
                after = _peak_rss_mib(guard_proc.pid)
                progress.advance(task)
    report.update(
        rates=rows,
        overload=overload,
        bombs={"statuses": bombs, "peak_rss_mib_before": before, "peak_rss_mib_after": after},
    )
    _print(console, report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(report, indent=1) + "\n")
    _plot(rows, RESULTS / "load.png")
    return 0


def _print(console: Console, report: dict[str, Any]) -> None:
    table = Table(title="Open-loop load on loopback (--defenses none, 64×64 PNG, echo upstream)")
    for col in ("side", "rate /s", "sent", "answered", "statuses", "p50 ms", "p99 ms"):
        table.add_column(col)
    for r in report["rates"]:
        table.add_row(
            r["side"], f"{r['rate']:g}", str(r["sent"]), str(r["answered"]),
            json.dumps(r["statuses"]), str(r["p50_ms"]), str(r["p99_ms"]),
        )  # fmt: skip
    console.print(table)
    o = report["overload"]
    shed = sum(v for k, v in o["statuses"].items() if k in ("429", "503"))
    console.print(
        f"capacity ≈ {report['capacity_rps']} req/s (max_inflight / {report['service_ms']} ms); "
        f"at 2× ({o['rate']:.0f} req/s): {o['sent']} sent, {o['answered']} answered, "
        f"statuses {o['statuses']}, shed {100 * shed / max(1, o['sent']):.0f}%"
    )
    b = report["bombs"]
    console.print(
        f"bombs (pixel budget {report['settings']['pixel_budget'] / 1e6:g} MP): "
        f"{b['statuses']}; guard peak RSS {b['peak_rss_mib_before']:.0f} → "
        f"{b['peak_rss_mib_after']:.0f} MiB"
    )


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for side, color in (("direct", "tab:blue"), ("guard", "tab:orange")):
        mine = [r for r in rows if r["side"] == side]
        rates = [r["rate"] for r in mine]
        ax.plot(rates, [r["p50_ms"] for r in mine], "o-", color=color, label=f"{side} p50")
        ax.plot(rates, [r["p99_ms"] for r in mine], "s--", color=color, label=f"{side} p99")
    ax.set_xlabel("offered load (requests/s, open loop)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency vs rate: direct vs through the guard")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
