"""Figures are drawn without a display, and importing kvpress never imports matplotlib."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, torch
import kvpress
assert "matplotlib" not in sys.modules, "the core library imported matplotlib"
from kvpress.visualization import *
from tests.conftest import tiny_model
model = tiny_model("llama")
ids = torch.randint(3, 128, (1, 30))
report, _ = record_compression(model, kvpress.AdaKVPress(kvpress.SnapKVPress(0.5, window_size=4)), ids)
figures = [
    plot_kept_tokens(report, spans={"needle": (3, 7)}),
    plot_scores(report, layer=0),
    plot_head_budgets(report),
    plot_attention_map(attention_maps(model, ids, layers=[0])[0]),
]
import matplotlib
print(matplotlib.get_backend())
for i, fig in enumerate(figures):
    fig.savefig(f"{sys.argv[1]}/figure{i}.png")
"""


def test_figures_are_saved_without_a_display(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().lower() == "agg"
    for i in range(4):
        png = (tmp_path / f"figure{i}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
