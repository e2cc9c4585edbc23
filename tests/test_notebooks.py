"""The quick-start notebook runs top to bottom and shows what it claims: answers, cache sizes, a plot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from kvpress.needle import PASSKEY_ANSWER

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    """Everything a code cell printed or returned as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert not [out for cell in code for out in cell.get("outputs", []) if out.output_type == "error"]
    # Loading the model draws no progress bar and no widget warning (a 98 MB file loads in seconds).
    stderr = "".join(o.text for c in code for o in c.get("outputs", []) if o.get("name") == "stderr")
    for noise in ("Converting and de-quantizing", "Loading weights", "IProgress", "TqdmWarning"):
        assert noise not in stderr

    # The comparison table: one row per press, "| name | cache MiB | share of no press | passkey | answer".
    table = next(_text(cell) for cell in code if "cache MiB" in _text(cell))
    rows = {}
    for line in table.splitlines()[2:]:
        name, mib, share, found, answer = (field.strip() for field in line.strip("| ").split(" | ", 4))
        rows[name] = (float(mib), float(share.rstrip("%")) / 100, found, answer)
    assert set(rows) == {"no press", "Knorm 0.5", "SnapKV 0.5", "StreamingLLM 0.5", "SnapKV 0.5 + Knorm 0.5"}

    # The uncompressed model and query-aware SnapKV both read the passkey back.
    for name in ("no press", "SnapKV 0.5"):
        assert rows[name][2] == "yes" and PASSKEY_ANSWER in rows[name][3]
    # Memory: a ratio of 0.5 halves the cache, the composition keeps a quarter (query-aware rows also hold the
    # ~20 question tokens, hence the tolerance). The no-press cache is 30 layers x 2 x 3 kv heads x 64 x 4 bytes
    # per token for the ~2000 context tokens.
    no_press = rows["no press"][0]
    assert 2000 * 30 * 2 * 3 * 64 * 4 / 2**20 <= no_press <= 2100 * 30 * 2 * 3 * 64 * 4 / 2**20
    for name, expected in [("Knorm 0.5", 0.5), ("StreamingLLM 0.5", 0.5), ("SnapKV 0.5", 0.5)]:
        assert rows[name][0] / no_press == pytest.approx(expected, abs=0.01)
    assert rows["SnapKV 0.5 + Knorm 0.5"][0] / no_press == pytest.approx(0.25, abs=0.01)
    for mib, share, _, _ in rows.values():
        assert share == pytest.approx(mib / no_press, abs=0.001)

    # The bar plot was drawn, and the report of the hand-attached press matches its budget.
    assert any("image/png" in out.get("data", {}) for cell in code for out in cell.get("outputs", []))
    report = _text(code[-1])
    removed = float(re.search(r"([\d.]+)% of tokens removed", report).group(1))
    assert removed == pytest.approx(50.0, abs=0.1)
    kept, total = map(int, re.search(r"keeps (\d+) of (\d+) tokens", report).groups())
    assert kept == round(total * 0.5)


SPEED_NOTEBOOK = NOTEBOOK.parent / "speed_and_memory.ipynb"


def test_notebooks_run_from_the_command_line(tmp_path):
    """The test extra brings what runs a notebook from a shell: ``jupyter nbconvert --execute``."""
    out = tmp_path / "speed.ipynb"
    done = subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(SPEED_NOTEBOOK),
         "--output", str(out)],
        cwd=NOTEBOOK.parent, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    executed = nbformat.read(out, as_version=4)
    assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))


def test_speed_and_memory_notebook_plots_the_saved_results(tmp_path):
    """Runs on CPU from the saved GPU results (its rerun cell only acts on a CUDA machine when asked)."""
    import json

    nb = nbformat.read(SPEED_NOTEBOOK, as_version=4)
    # A probe cell run after the notebook's own: the colour of every line of the batch-1 panels, and the figure legend.
    at = next(i for i, cell in enumerate(nb.cells) if "decode ms/token, CUDA graph" in cell.source) + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell(
        "import json as _json\n"
        "print('PROBE' + _json.dumps({'panels': [{l.get_label(): l.get_color() for l in ax.get_lines()} for ax in axes[:4]],"
        " 'legend': [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else [],"
        " 'variants': variants}))"
    ))  # fmt: skip
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    probe = json.loads(_text(nb.cells.pop(at)).split("PROBE", 1)[1])
    # Each variant keeps one colour across the panels (also where a panel lacks a variant), the colours differ, and
    # one legend names every variant.
    colours = {}
    for panel in probe["panels"]:
        for label, colour in panel.items():
            assert colours.setdefault(label, colour) == colour, f"{label} changes colour between panels"
    assert set(colours) == set(probe["variants"]) and len(set(colours.values())) == len(colours)
    assert len(probe["panels"][3]) < len(probe["variants"])  # the CUDA-graph panel lacks the dense cache
    assert probe["legend"] == probe["variants"]
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert not [out for cell in code for out in cell.get("outputs", []) if out.output_type == "error"]
    saved = json.loads((NOTEBOOK.parents[1] / "benchmarks" / "results" / "speed_memory_h100.json").read_text())
    table = next(_text(cell) for cell in code if "ms/token" in _text(cell))
    rows = [line.split() for line in table.splitlines()[2:] if line.strip()]
    assert len(rows) == len(saved["results"])
    for row, result in zip(rows, saved["results"]):
        assert int(row[0]) == result["context"] and int(row[1]) == result["batch"]
        # Printed with one or two decimals: equal up to that rounding.
        assert float(row[-2]) == pytest.approx(result["decode_ms_median"], abs=0.051)
        if result.get("decode_ms_graph_median") is not None:
            assert float(row[-1]) == pytest.approx(result["decode_ms_graph_median"], abs=0.051)
        assert float(row[-5]) == pytest.approx(result["kv_gib"], abs=0.0051)
    pngs = [out for cell in code for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(pngs) == 2  # batch-1 curves and the batch-4 bars


PRESS_KEEPS_NOTEBOOK = NOTEBOOK.parent / "what_a_press_keeps.ipynb"


@pytest.mark.slow
def test_what_a_press_keeps_notebook_shows_why_snapkv_loses_digits():
    nb = nbformat.read(PRESS_KEEPS_NOTEBOOK, as_version=4)
    resources = {"metadata": {"path": str(NOTEBOOK.parent)}}
    NotebookClient(nb, timeout=900, kernel_name="python3", resources=resources).execute()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert not [out for cell in code for out in cell.get("outputs", []) if out.output_type == "error"]
    text = "\n".join(_text(cell) for cell in code)
    passkey = re.search(r"passkey (\d{7}), \d+ prompt tokens", text).group(1)

    # The example: the uncompressed model and SnapKV with window 8 read the passkey; window 32 cuts it short.
    answers = dict(re.findall(r"^(no press|SnapKV window \d+):\s+'(.*)'$", text, re.M))
    assert passkey in answers["no press"] and passkey in answers["SnapKV window 8"]
    assert passkey not in answers["SnapKV window 32"] and passkey[:3] in answers["SnapKV window 32"]

    # Copy heads: a few heads put most of their attention on the passkey while the answer is written.
    masses = [float(m) for m in re.findall(r"kv-head \d\): ([\d.]+) of its attention on the passkey", text)]
    assert len(masses) == 6 and masses[0] > 0.5

    # Tables: one row per press with the answer and the digits each copy head kept ('_' where dropped).
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("| ").split(" | ")]
        if len(cells) == 9 and cells[0] != "press" and not cells[0].startswith("---"):
            rows[cells[0]] = cells
    for name in ("window 8", "window 16", "window 32", "window 64", "window 32, kernel 31", "window 32, group max",
                 "AdaKV(SnapKV window 8)"):  # fmt: skip
        assert name in rows and all(re.fullmatch(r"[\d_]{7}", c) for c in rows[name][3:]), rows.get(name)
    assert passkey in rows["window 8"][1] and passkey in rows["window 32, kernel 31"][1]
    assert float(rows["window 64"][2].rstrip("%")) > float(rows["window 8"][2].rstrip("%"))  # recency grows

    # The causal check: without one digit, and nothing else, the model no longer reads the passkey back.
    dropped = dict(re.findall(r"cache without digits ([\d_]{7}): '(.*)'", text))
    assert passkey in dropped[passkey]
    assert (
        passkey not in dropped[passkey[:4] + "_" + passkey[5:]]
        and passkey[:4] in dropped[passkey[:4] + "_" + passkey[5:]]
    )

    # The saved benchmark over fresh contexts is shown, and every picture was drawn.
    assert "| snapkv w=8 k=7 |" in text
    pngs = [out for cell in code for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(pngs) == 5  # three-document maps, kept tokens, copy heads, scores, AdaKV budgets
