"""search_patterns: the coverage it ranks patterns by, against float64 loops; each head gets its best pattern; the
command writes a file sparse_prefill reads."""

import json

import torch

from kvpress.sparse_prefill import HeadPattern, SparsePrefillConfig, sparse_prefill
from kvpress.sparse_prefill.attention import head_block_mask
from kvpress.sparse_prefill.search import KINDS, pattern_coverage, sample_rows, search_patterns
from tests.conftest import random_ids, tiny_model


def test_coverage_is_the_softmax_mass_on_the_pattern_blocks():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 70, 16, generator=gen), torch.randn(2, 2, 70, 16, generator=gen)
    config = SparsePrefillConfig(layers={}, block_size=16, last_q=8)
    patterns = [HeadPattern.with_budget(kind, 2, 16) for kind in KINDS]
    rows = sample_rows(70, 8, 10)
    got = pattern_coverage(q, k, 0.3, patterns, config, rows)
    assert got.shape == (3, 4)
    for p, pattern in enumerate(patterns):
        blocks = head_block_mask([pattern] * 4, q, k, 0.3, config)
        for h in range(4):
            total = 0.0
            for b in range(2):
                for r in rows.tolist():
                    w = torch.softmax(q[b, h, r].double() @ k[b, h // 2, : r + 1].double().T * 0.3, -1)
                    seen = [j for j in range(r + 1) if blocks[b, h, r // 16, j // 16]]
                    total += float(w[seen].sum())
            assert abs(float(got[p, h]) - total / (2 * len(rows))) < 1e-5
    assert rows[-8:].tolist() == list(range(62, 70))  # the last queries are always measured


def test_each_head_takes_its_best_pattern_and_the_file_runs(tmp_path):
    model = tiny_model("qwen3")
    ids = random_ids(160, seed=4)
    config, coverage = search_patterns(model, ids, budget_blocks=3, block_size=16, rows=32, min_tokens=64)
    assert sorted(config.layers) == sorted(coverage)
    for idx, heads in config.layers.items():
        assert [KINDS.index(p.kind) for p in heads] == coverage[idx].argmax(0).tolist()
        assert heads[0] == HeadPattern.with_budget(heads[0].kind, 3, 16)
    config.save(tmp_path / "p.json")
    with sparse_prefill(model, tmp_path / "p.json") as report, torch.no_grad():
        model(input_ids=ids)
    assert report.sparse_calls == len(config.layers) and report.density < 1
    assert json.loads((tmp_path / "p.json").read_text())["block_size"] == 16
