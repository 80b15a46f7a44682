"""The rich tables and summary lines printed at the end of a run, in the order printed."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.purification.common import MIX_ATTACKED, Defense, Outcome
from guard.defenses.diffcap.profile import PurifyProfile


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def print_defenses(
    console: Console,
    defenses: list[Defense],
    results: dict[str, dict[str, Outcome]],
    rows: dict[str, dict[str, Any]],
    attack_keys: list[str],
    pgd_steps: int,
) -> None:
    """The main table: accuracy under each attack and the cost, one row per defense."""
    n = len(results["none"]["clean"].correct)
    table = Table(
        title=f"Toy VLM under white-box L∞ PGD ({pgd_steps} steps, step ε/4), {n} test "
        f"images: accuracy % after each defense; u/t = untargeted/targeted, 8/16 = ε·255"
    )
    cols = ["defense", "clean", "u8", "u16", "t8", "t16", "t8 ASR", "t16 ASR", "robust"]
    cols += ["UNet/img clean", "UNet/img att.", "enc/img clean", "enc/img att.", "img/s"]
    for col in cols:
        table.add_column(col, justify="left" if col == "defense" else "right")
    for d in defenses:
        row, oc = rows[d.key], results[d.key]
        table.add_row(
            d.label,
            _pct(row["clean_accuracy"]),
            *(_pct(float(oc[k].correct.mean())) for k in attack_keys),
            *(
                _pct(float(oc[k].hit_target.mean()))  # type: ignore[union-attr]
                for k in attack_keys
                if oc[k].hit_target is not None
            ),
            _pct(row["robust_accuracy"]),
            _num(row["unet_evals_clean"]),
            _num(row["unet_evals_attacked"]),
            _num(row["encoder_evals_clean"]),
            _num(row["encoder_evals_attacked"]),
            _rate(row["images_per_s_clean"]),
            end_section=d.key in ("jpeg75", "diffcap_open_clip_ddpm"),
        )
    console.print(table)


def print_t_star(
    console: Console,
    profiles: dict[str, PurifyProfile],
    pictures: dict[str, dict[str, Any]],
    same: dict[str, bool],
    attack_keys: list[str],
    k_max: int,
) -> None:
    """τ per encoder (one line each), then DiffCAP's t* on clean vs attacked images."""
    for name, p in profiles.items():
        console.print(
            f"τ ({name}) = {p.tau:.6f}: {100 * p.quantile:.0f}% of {p.images} clean validation "
            f"images stop within {p.target_steps} noise steps (their t*: mean "
            f"{p.clean_mean:.1f}, p50 {p.clean_quantiles['p50']:.0f}, "
            f"p90 {p.clean_quantiles['p90']:.0f})"
            + (
                f"; drift_tau {p.drift_tau:.6f} (escalates ≤ {100 * p.drift_quantile:.0f}%)"
                if p.drift_tau is not None and p.drift_quantile is not None
                else ""
            )
            + (
                f"; confirm_tau {p.confirm_tau:.6f} {p.confirm_steps} steps on (escalates ≤ "
                f"{100 * p.confirm_quantile:.0f}% more)"
                if p.confirm_tau is not None and p.confirm_quantile is not None
                else ""
            )
            + (f"; t* same for DDPM and DDIM: {same[name]}" if name in same else "")
        )
    tstar = Table(
        title="DiffCAP t* per image (noise steps; t_max cap "
        f"{k_max}): clean vs attacked; 'early' = attacked images stopped at t* ≤ clean p50"
    )
    for col in (
        "encoder",
        "τ",
        "condition",
        "mean",
        "p10",
        "p50",
        "p90",
        "early %",
        "acc early",
        "acc late",
    ):
        tstar.add_column(col, justify="left" if col in ("encoder", "condition") else "right")
    for name in profiles:
        # t* does not depend on the sampler (noising comes first, from the same seeds).
        pic = next(v for k, v in pictures.items() if k.startswith(f"diffcap_{name}_"))
        tau = f"{profiles[name].tau:.6f}"
        c = pic["clean"]
        tstar.add_row(
            name,
            tau,
            "clean",
            _num(c["mean"]),
            _num(c["p10"], 0),
            _num(c["p50"], 0),
            _num(c["p90"], 0),
            "",
            "",
            "",
        )
        for key in attack_keys:
            a = pic["attacks"][key]
            s = a["t_star"]
            tstar.add_row(
                "",
                "",
                key,
                _num(s["mean"]),
                _num(s["p10"], 0),
                _num(s["p50"], 0),
                _num(s["p90"], 0),
                _pct(a["stopped_at_or_below_clean_p50"]),
                _pct(a["accuracy_early"]),
                _pct(a["accuracy_late"]),
                end_section=key == attack_keys[-1],
            )
    console.print(tstar)


def print_mix(console: Console, mix: dict[str, Any], rows: dict[str, dict[str, Any]]) -> None:
    """DiffCAP against the best fixed t* on the 90/10 mix, and the goals of issue #4."""
    summary = Table(
        title=f"Realistic traffic ({100 * (1 - MIX_ATTACKED):.0f}% clean / "
        f"{100 * MIX_ATTACKED:.0f}% attacked) and goals (issue #4)"
    )
    for col in (
        "DiffCAP",
        "best fixed t*",
        "robust Δ pts",
        "clean drop pts",
        "UNet/img mix",
        "fixed UNet/img",
        "ratio",
        "goals met",
    ):
        summary.add_column(col, justify="left" if col in ("DiffCAP", "best fixed t*") else "right")
    for key, m in mix.items():
        summary.add_row(
            rows[key]["label"],
            rows[m["best_fixed"]]["label"],
            f"{100 * m['robust_gap']:+.1f}",
            f"{100 * m['clean_accuracy_drop_vs_none']:+.1f}",
            _num(m["unet_evals_mix"]),
            _num(m["best_fixed_unet_evals_mix"]),
            _num(m["unet_ratio"], 2),
            f"{sum(m['goals'].values())}/3",
        )
    console.print(summary)


def print_batching(console: Console, batching: dict[str, Any]) -> None:
    table = Table(
        title=f"Serving through PurifyStage ({batching['defense']}): {batching['images']} "
        f"requests, {batching['attacked']} attacked, closed-loop clients, cache off"
    )
    for column in ("mode", "clients", "img/s", "× one at a time", "images per call"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for kind in ("clean", "attacked"):
        table.add_column(f"{kind} p50 / p95 ms", justify="right")
    for mode in ("one_at_a_time", "whole_batches_16", "stepping_16"):
        m = batching[mode]
        table.add_row(
            mode,
            str(m["clients"]),
            _num(m["images_per_s"]),
            _num(m.get("speedup"), 2) if "speedup" in m else "1",
            _num(m["mean_batch_size"]),
            *(f"{m[k]['p50_ms']:.0f} / {m[k]['p95_ms']:.0f}" for k in ("clean", "attacked")),
        )
    console.print(table)


def print_adaptive(console: Console, adaptive: dict[str, Any], args: argparse.Namespace) -> None:
    title = (
        f"Adaptive attack: EOT-PGD through noise + DDIM ({args.adaptive_ddim_steps} steps), "
        f"ε=8/255, {args.adaptive_steps} steps × {args.eot_draws} draws, "
        f"{adaptive['images']} images"
    )
    console.print(_attack_table(title, adaptive["defenses"]))
    evasion = adaptive.get("drift_evasion")
    if evasion is not None:
        title = (
            f"Adaptive attack on the drift rule of {evasion['against']}: PGD keeping x̂₀ at the "
            f"first check close to the image under φ, ε=8/255, {args.evasion_steps} steps × "
            f"{args.eot_draws} draws, {adaptive['images']} images"
        )
        console.print(_attack_table(title, evasion["defenses"]))


def _attack_table(title: str, defenses: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=title)
    for col in ("defense", "acc. attacked %", "acc. plain PGD u8 %", "t* p50", "escalated %"):
        table.add_column(col, justify="left" if col == "defense" else "right")
    for entry in defenses.values():
        table.add_row(
            entry["label"],
            _pct(entry["accuracy_adaptive"]),
            _pct(entry["accuracy_pgd_same_images"]),
            _num(entry["t_star"]["p50"], 0) if entry["t_star"] else "—",
            _pct(entry["escalated"]) if entry.get("escalated") is not None else "—",
        )
    return table
