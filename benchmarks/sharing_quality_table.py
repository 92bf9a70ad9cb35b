"""The sharing study's rows (each a pretraining run and its probes, a random initialisation's
probes, or a supervised run), their cache, and the table and plot they make
(benchmarks/sharing_quality.py runs them)."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import common

PRETRAINED, RANDOM, SUPERVISED = "pretrained", "random", "supervised"  # the kinds of row
LOSSES = ("loss_mep_visual", "loss_mep_audio", "loss_pair")  # chance: ln 17 (16 negatives), ln 17, ln 2
# The gate before any comparison (digits): the ceiling, the floor's distance below it, and what the
# unshared model's pretraining must add to its floor, in points of held-out top-1.
CEILING, FLOOR_BELOW, PRETRAINING_GAIN = 85.0, 30.0, 20.0


def row_kind(row: dict) -> str:
    return SUPERVISED if row.get("supervised") else RANDOM if row["random"] else PRETRAINED


def row_key(row: dict) -> tuple[str, int, str]:
    return row["variant"], row["seed"], row_kind(row)


def cached_rows(done_file: Path, settings: dict) -> list[dict]:
    """The cached rows of these settings (probes from before the spread was measured are probed again)."""
    return [r for r in common.cached_rows(done_file, settings) if "spread" in r["probe"] or r.get("supervised")]


def output_name(args: argparse.Namespace) -> str:
    """sharing_quality[_<task>][_clips-<n>][_<key>-<value> ...][_quick]: the last part of each
    override's key."""
    parts = ["sharing_quality", *([args.task] if args.task != "rhythm" else [])]
    parts += [f"clips-{args.clips}"] if args.clips != 8 else []
    for override in args.overrides:
        key, _, value = override.partition("=")
        part = f"{key.rsplit('.', 1)[-1]}-{value}"
        if part not in parts:  # the visual and the audio CNN's `out_norm` name the file once
            parts.append(part)
    return "_".join(parts + (["quick"] if args.quick else []))


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def _mean(rows: list[dict], column: str) -> float | None:
    values = [r["probe"][column] for r in rows if column in r["probe"]]
    return statistics.mean(values) if values else None


def gate(rows: list[dict]) -> list[str]:
    """The gate's lines: the supervised ceiling, the random floor below it, and the unshared model's
    gain from pretraining (means over seeds, full probe of the main label)."""
    unshared = [r for r in rows if r["variant"] == "none"]
    ceiling, floor, pretrained = (
        _mean([r for r in unshared if row_kind(r) == k], "full") for k in (SUPERVISED, RANDOM, PRETRAINED)
    )
    if None in (ceiling, floor, pretrained):
        return ["The gate needs the rows of `none` pretrained, random and supervised (`--rows ... supervised`).", ""]
    assert ceiling is not None and floor is not None and pretrained is not None

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    return [
        "The gate (no sharing, full probe, held-out top-1, means over seeds):",
        "",
        f"- supervised ceiling {ceiling:.1f}% (target >= {CEILING:.0f}%): {verdict(ceiling >= CEILING)}",
        f"- random initialisation {floor:.1f}%, {ceiling - floor:.1f} points below the ceiling "
        f"(target >= {FLOOR_BELOW:.0f}): {verdict(ceiling - floor >= FLOOR_BELOW)}",
        f"- pretrained {pretrained:.1f}%, {pretrained - floor:+.1f} points over its random initialisation "
        f"(target >= +{PRETRAINING_GAIN:.0f}): {verdict(pretrained - floor >= PRETRAINING_GAIN)}",
        "",
    ]


def _still_to_run(missing: list) -> list[str]:
    """A line naming the rows an interrupted build has not run yet, per variant and kind."""
    runs: dict[tuple[str, str], list[int]] = {}
    for variant, seed, kind in missing:
        runs.setdefault((variant, kind), []).append(seed)
    named = "; ".join(f"{v} {kind} (seeds {', '.join(map(str, seeds))})" for (v, kind), seeds in runs.items())
    return [f"**Partial: {len(missing)} rows still to run** (the same command continues): {named}.", ""]


def paired(rows: list[dict], variants: list[str], columns: list[str]) -> list[str]:
    """Each pretrained variant minus unshared (`none`) pretrained, seed by seed (the same seed: the
    same data order), on the seeds both ran: the mean difference, then each seed's. Seeds move the
    few-shot probes more than most variants do; paired, the differences are what is left."""
    pretrained = {(r["variant"], r["seed"]): r for r in rows if row_kind(r) == PRETRAINED}
    lines = []
    for variant in (v for v in variants if v != "none"):
        seeds = sorted(s for v, s in pretrained if v == variant and ("none", s) in pretrained)
        if not seeds:
            continue
        pairs = [(pretrained[variant, s]["probe"], pretrained["none", s]["probe"]) for s in seeds]
        cells = []
        for column in columns:
            diffs = [mine[column] - base[column] for mine, base in pairs if column in mine and column in base]
            each = ", ".join(f"{d:+.1f}" for d in diffs)
            cells.append(f"{statistics.mean(diffs):+.1f} ({each})" if diffs else "-")
        lines.append(f"| {variant} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    header = [
        "\nPretrained minus unshared (`none`), paired by seed: the mean difference in points, then each seed's.\n",
        "| variant | seeds | " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    return header + lines


def render(
    rows: list[dict], args: argparse.Namespace, params: dict[str, int], task: Any, missing: list | None = None
) -> str:
    """The table (mean ± sd over seeds), the gate's lines above it (digits), and the rows of
    `missing` ((variant, seed, kind)) still to run."""
    extra = [f"full {label}" for label in task.labels[1:]] + [f"seconds {m}" for m, _ in task.clip_labels]
    columns = ["full", *(f"{k}-shot" for k in task.shots), *extra]
    lines = [
        f"# Sharing quality on the {args.task} task"
        + (f", every variant with {', '.join(f'`{o}`' for o in args.overrides)}" if args.overrides else "")
        + "\n",
        f"{args.steps} pretraining steps x batch {args.batch}, {args.videos} videos ({task.classes} classes), held-out "
        f"{args.test_videos}; transformers hidden {args.hidden}, {args.layers} layers; seeds "
        f"{', '.join(map(str, args.seeds))}; probe top-1 % (mean ± sd over seeds; chance {100 / task.classes:.1f}%)"
        + (
            "; `seconds visual` / `seconds audio`: each second's digit shown / spoken, probed from that "
            "second's clip embedding (does the CNN read / hear digits?). "
            if task.clip_labels
            else ". "
        )
        + f"{common.machine_line()}.\n",
        *(gate(rows) if args.task == "digits" else []),
        *(_still_to_run(missing) if missing else []),
        "| variant | transformer params | vs none | " + " | ".join(columns) + " | fused BOS spread | final MEP "
        "visual / audio, pair loss | collapse called | pretrain min |",
        "|---|---:|---:|" + "---:|" * len(columns) + "---:|---:|---:|---:|",
    ]
    none = params.get("none")
    names = {RANDOM: "random init, {}", PRETRAINED: "{}", SUPERVISED: "supervised, {} (held-out top-1)"}
    for kind, name in names.items():
        for variant in args.variants:
            mine = [r for r in rows if r["variant"] == variant and row_kind(r) == kind]
            if not mine:
                continue
            ratio = f"{params[variant] / none:.2f}" if none else "-"
            cells = [_stats([r["probe"][c] for r in mine if c in r["probe"]]) for c in columns]
            spreads = [r["probe"]["spread"]["fused BOS"] for r in mine if "spread" in r["probe"]]
            cells.append(f"{statistics.mean(spreads):.3f}" if spreads else "-")
            losses = [r["losses"] for r in mine if r.get("losses")]
            cells.append(
                " / ".join(f"{statistics.mean(x[k] for x in losses if k in x):.2f}" for k in LOSSES) if losses else "-"
            )
            # the runs whose collapse watch fired (`pemt.collapse`), of those it is known for
            watched = [r for r in mine if "collapse" in r]
            cells.append(f"{sum(bool(r['collapse']) for r in watched)} of {len(watched)}" if watched else "-")
            minutes = statistics.mean(r["pretrain_s"] for r in mine) / 60
            lines.append(
                f"| {name.format(variant)} | {params[variant] / 1e6:.2f}M | {ratio} | "
                + " | ".join(cells)
                + f" | {minutes:.1f} |"
            )
    lines += paired(rows, args.variants, [c for c in columns if not c.startswith("seconds ")])
    curves = [r for r in rows if len(r.get("held_out_by_step", {})) > 1 and r["variant"] in args.variants]
    if curves:
        lines.append("\nHeld-out top-1 % of the supervised runs at each evaluation (step: top-1):\n")
    for row in sorted(curves, key=row_key):
        points = sorted((int(step), top1) for step, top1 in row["held_out_by_step"].items())
        lines.append(f"- {row['variant']}, seed {row['seed']}: " + ", ".join(f"{s}: {t:.1f}" for s, t in points))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], args: argparse.Namespace, params: dict[str, int], task: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    columns = (f"{task.shots[0]}-shot", f"{task.shots[-1]}-shot", "full")
    fig, axes = plt.subplots(1, len(columns), figsize=(15, 4))
    for ax, column in zip(axes, columns):
        for kind, marker in ((PRETRAINED, "o"), (RANDOM, "x"), (SUPERVISED, "^")):
            for offset, variant in enumerate(args.variants):
                mine = [
                    r["probe"][column]
                    for r in rows
                    if r["variant"] == variant and row_kind(r) == kind and column in r["probe"]
                ]
                if mine:
                    ax.errorbar(
                        # variants of one size side by side, not on top of each other
                        params[variant] / 1e6 * 1.04**offset,
                        statistics.mean(mine),
                        yerr=statistics.stdev(mine) if len(mine) > 1 else 0,
                        marker=marker,
                        capsize=3,
                        label=f"{'' if kind == PRETRAINED else kind + ' '}{variant}",
                    )
        ax.set(xscale="log", xlabel="transformer parameters (M)", ylabel=f"{column} probe top-1 (%)", title=column)
        ax.xaxis.set_major_locator(LogLocator(base=2))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
