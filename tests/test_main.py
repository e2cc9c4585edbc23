"""``python -m kvpress``: command-line parsing, and the demo's printed memory figures against the cache shapes."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from kvpress.__main__ import DEFAULT_PRESSES, QUERY_AWARE, build_press, demo_presses, main, parse_args
from kvpress.presses.registry import PRESSES


def test_defaults_and_repeated_presses():
    args = parse_args([])
    assert args.press == list(DEFAULT_PRESSES) and args.ratio == 0.5 and args.context_tokens == 2000
    args = parse_args(["--press", "snapkv", "--press", "knorm", "--press", "snapkv", "--ratio", "0.25"])
    assert args.press == ["snapkv", "knorm"] and args.ratio == 0.25
    press = build_press("snapkv", 0.25)
    assert press.compression_ratio == 0.25 and "snapkv" in QUERY_AWARE


def test_press_names_are_the_registry_names():
    """One press, one name: the demo offers registry names (the ones kvpress-eval and YAML configs take)."""
    names = demo_presses()
    assert set(names) <= set(PRESSES) and set(QUERY_AWARE) | set(DEFAULT_PRESSES) <= set(names)
    assert "streaming_llm" in names and parse_args(["--press", "streaming_llm"]).press == ["streaming_llm"]
    # Every scorer press that needs no eager attention and no inner press is offered, built at the asked ratio.
    assert {"random", "knorm", "tova", "expected_attention", "pyramidkv"} <= set(names)
    assert "observed_attention" not in names and "adakv" not in names
    for name in names:
        assert isinstance(build_press(name, 0.3), PRESSES[name]) and build_press(name, 0.3).compression_ratio == 0.3


@pytest.mark.parametrize(
    "argv, name",
    [
        (["--ratio", "1.0"], "--ratio"),
        (["--ratio", "-0.1"], "--ratio"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--context-tokens", "10"], "--context-tokens"),
        (["--depth", "2"], "--depth"),
        (["--press", "nonexistent"], "--press"),
    ],
)
def test_bad_arguments_exit_naming_the_option(argv, name, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert name in capsys.readouterr().err


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "kvpress", "--help"], capture_output=True, text=True, check=True)
    for option in ("--press", "--ratio", "--max-new-tokens", "--context-tokens"):
        assert option in out.stdout


@pytest.mark.slow
def test_demo_prints_answers_and_real_cache_sizes(capsys):
    main(["--press", "knorm", "--press", "snapkv", "--context-tokens", "400", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(none \(query-aware\)|none|knorm|snapkv)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%", line)
        if m:
            rows[m.group(1)] = (int(m.group(2).replace(",", "")), float(m.group(3)), float(m.group(4)), float(m.group(5)))
    assert set(rows) == {"none", "none (query-aware)", "knorm", "snapkv"}
    # SmolLM2: 30 layers x (keys + values) x 3 kv heads x 64 channels x 4 bytes (float32) per cached token.
    per_token = 30 * 2 * 3 * 64 * 4
    for name, (n_bytes, mib, _, _) in rows.items():
        assert n_bytes % per_token == 0 and mib == pytest.approx(n_bytes / 2**20, abs=0.006)
    n_context = rows["none"][0] // per_token
    assert 400 < n_context < 450  # the filler plus the chat template's prefix
    n_prompt = rows["none (query-aware)"][0] // per_token  # context and question
    assert rows["knorm"][0] == round(n_context * 0.5) * per_token
    assert rows["snapkv"][0] == round(n_prompt * 0.5) * per_token
    for name, base in [("knorm", "none"), ("snapkv", "none (query-aware)")]:
        saved = rows[base][0] - rows[name][0]
        assert rows[name][2] == pytest.approx(saved / 2**20, abs=0.006)
        assert rows[name][3] == pytest.approx(100 * saved / rows[base][0], abs=0.06)
    assert out.count("  answer:   ") == 4
    assert "'none (query-aware)' is the uncompressed baseline of the query-aware presses" in out
    lost = [name for name in ("knorm", "snapkv") if re.search(rf"^{name}\s.*\bno$", out, re.M)]
    if lost:
        assert f"Lost the needle at ratio 0.5: {', '.join(lost)}. That is what this comparison measures" in out
    else:
        assert "Lost the needle" not in out
