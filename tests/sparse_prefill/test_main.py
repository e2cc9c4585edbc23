"""``python -m kvpress.sparse_prefill``: on the offline SmolLM2, writes a pattern file for every layer and head."""

from kvpress.sparse_prefill import SparsePrefillConfig
from kvpress.sparse_prefill.__main__ import main


def test_the_command_writes_a_pattern_file_for_smollm2(tmp_path, capsys):
    out = tmp_path / "patterns.json"
    main(["--out", str(out), "--tokens", "256", "--block-size", "16", "--budget-blocks", "4", "--min-tokens", "64"])
    config = SparsePrefillConfig.load(out)
    assert sorted(config.layers) == list(range(30)) and all(len(heads) == 9 for heads in config.layers.values())
    assert config.block_size == 16 and config.min_tokens == 64
    printed = capsys.readouterr().out
    assert "30 layers, 4 blocks of 16 per query block" in printed and f"wrote {out}" in printed
