"""Markdown table of `kvpress-eval` RULER sweeps: per press and ratio, the share of the uncompressed KV cache the
compressed contexts really held, the mean string-match score over tasks at each context length, and the run's average;
with ``--plot``, the average against the KV held, one line per press (the uncompressed run as a dashed line).

    python benchmarks/ruler_table.py results/ruler_smollm2_cpu > benchmarks/results/ruler_niah_smollm2_cpu/table.md
    python benchmarks/ruler_table.py results/ruler_catalogue --plot catalogue.png --baseline 53.1

Several output directories are merged (a run present in more than one is listed once, from the first).
"""

import argparse
import json
from pathlib import Path

ORDER = ("none", "streaming_llm", "knorm", "snapkv", "expected_attention", "observed_attention", "nacl", "adakv-snapkv")


def read_rows(roots: list[Path]) -> tuple[list[tuple], list[int]]:
    """``(press, ratio, kv held, {length: mean score}, average)`` of every finished run under ``roots``, in display
    order, and the context lengths seen."""
    rows, lengths, seen = [], set(), set()
    for root in roots:
        if not root.is_dir():
            raise SystemExit(f"no such output directory: {root}")
        for path in sorted(root.glob("*/metrics.json")):
            if path.parent.name in seen:
                continue
            seen.add(path.parent.name)
            rows.append(_row(json.loads(path.read_text()), lengths))
    rank = {name: i for i, name in enumerate(ORDER)}
    rows.sort(key=lambda r: (rank.get(r[0], len(ORDER)), r[0], r[1] if r[1] is not None else -1))
    return rows, sorted(lengths)


def _row(metrics: dict, lengths: set) -> tuple:
    """One run's row; adds the context lengths it scored to ``lengths``."""
    per_length = {}
    for task in metrics["tasks"].values():
        for key, value in task.items():
            if key.startswith("string_match@"):
                per_length.setdefault(int(key.split("@")[1]), []).append(value)
    lengths.update(per_length)
    means = {n: sum(v) / len(v) for n, v in per_length.items()}
    return metrics["press"], metrics["compression_ratio"], metrics.get("kv_memory"), means, metrics["average"]


def table(rows: list[tuple], lengths: list[int]) -> str:
    head = ["press", "ratio", "KV held", *(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths), "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for press, ratio, held, means, average in rows:
        cells = [press, "" if ratio is None else f"{ratio:.2f}", "" if held is None else f"{held:.0%}"]
        cells += [*(f"{means[n]:.1f}" if n in means else "" for n in lengths), f"{average:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[tuple], path: Path, baseline: float | None = None) -> Path:
    """Average score against the share of the KV cache held, one line per press, into the PNG ``path``; the
    uncompressed score (a ``none`` run, else ``baseline``) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[float, float]]] = {}
    for press, _, held, _, average in rows:
        if press == "none":
            baseline = average
        elif held is not None:
            curves.setdefault(press, []).append((100 * held, average))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("tab20")
    for i, (press, points) in enumerate(sorted(curves.items())):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", color=cmap(i % 20), label=press)
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", label="no compression")
    ax.set_xlabel("KV cache held (% of the uncompressed bytes)")
    ax.set_ylabel("average string match (%)")
    ax.invert_xaxis()  # more compression to the right
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="kvpress-eval output directories")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the scores against the KV held (PNG)")
    parser.add_argument(
        "--baseline",
        type=float,
        default=None,
        help="the uncompressed run's average, for the plot when no 'none' run is among the roots",
    )
    args = parser.parse_args(argv)
    rows, lengths = read_rows(args.roots)
    if args.plot is not None:
        plot(rows, args.plot, args.baseline)
    return table(rows, lengths)


if __name__ == "__main__":
    print(main())
