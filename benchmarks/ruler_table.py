"""Markdown table of a `kvpress-eval` RULER sweep: per press and ratio, the share of the uncompressed KV cache the
compressed contexts really held, the mean string-match score over tasks at each context length, and the run's average.

    python benchmarks/ruler_table.py results/ruler_smollm2_cpu > benchmarks/results/ruler_niah_smollm2_cpu/table.md
"""

import json
import sys
from pathlib import Path

ORDER = ("none", "streaming_llm", "knorm", "snapkv", "expected_attention", "observed_attention", "nacl", "adakv-snapkv")


def main(root: Path) -> str:
    rows, lengths = [], set()
    for path in sorted(root.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        per_length = {}
        for task in metrics["tasks"].values():
            for key, value in task.items():
                if key.startswith("string_match@"):
                    per_length.setdefault(int(key.split("@")[1]), []).append(value)
        lengths |= per_length.keys()
        means = {n: sum(v) / len(v) for n, v in per_length.items()}
        held = metrics.get("kv_memory")
        rows.append((metrics["press"], metrics["compression_ratio"], held, means, metrics["average"]))
    rank = {name: i for i, name in enumerate(ORDER)}
    rows.sort(key=lambda r: (rank.get(r[0], len(ORDER)), r[0], r[1]))
    lengths = sorted(lengths)
    head = ["press", "ratio", "KV held", *(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths), "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for press, ratio, held, means, average in rows:
        cells = [press, "" if ratio is None else f"{ratio:.2f}", "" if held is None else f"{held:.0%}"]
        cells += [*(f"{means[n]:.1f}" if n in means else "" for n in lengths), f"{average:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/ruler_table.py OUTPUT_DIR")
    print(main(Path(sys.argv[1])))
