"""The head-score probe: reproducible on the real model for a seed, and it finds heads rigged to read the needle."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kvpress.head_scores import answered, build_probe, main, probe_head_scores, reasoning_needle
from kvpress.presses.headkv_press import HeadKVPress
from tests.fixtures_pipeline import smollm2_tokenizer

HEAD_DIM = 16


def rigged_model(tokenizer, marker_ids: list[int], layer: int, kv_head: int):
    """A tiny random Llama in which every query head of ``kv_head`` in ``layer`` attends to the ``marker_ids`` tokens.

    Marker embeddings point along hidden dimension 0, which no other embedding uses; the rigged keys copy that
    dimension into channel 7 (the slowest RoPE pair, which a huge ``rope_theta`` leaves unrotated), and the rigged
    queries are a constant bias along channel 7, so their logits are large exactly at marker tokens.
    """
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=HEAD_DIM, vocab_size=len(tokenizer), max_position_embeddings=4096, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e12}, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0
        emb[marker_ids] = 0
        emb[marker_ids, 0] = 1
        attn = model.model.layers[layer].self_attn
        group = config.num_attention_heads // config.num_key_value_heads
        for q_head in range(kv_head * group, (kv_head + 1) * group):
            rows = slice(q_head * HEAD_DIM, (q_head + 1) * HEAD_DIM)
            attn.q_proj.weight[rows] = 0
            attn.q_proj.bias[rows] = 0
            attn.q_proj.bias[q_head * HEAD_DIM + 7] = 4.0
        row = kv_head * HEAD_DIM + 7
        attn.k_proj.weight[row] = 0
        attn.k_proj.weight[row, 0] = 4.0
        attn.k_proj.bias[row] = 0
    return model


def test_probe_finds_the_heads_rigged_to_read_the_needle():
    tokenizer = smollm2_tokenizer()
    tests = build_probe(tokenizer, [300, 500], depths=3, needles=1, seed=1)
    # The ages are the only digits of a prompt (the filler has none): digit tokens mark the needle passage.
    marker = sorted({int(i) for t in tests for i in t.ids[0] if any(c.isdigit() for c in tokenizer.decode([int(i)]))})
    assert marker
    model = rigged_model(tokenizer, marker, layer=1, kv_head=1)
    scores, answers = probe_head_scores(model, tokenizer, tests, max_new_tokens=3, keep_all=True, progress=False)
    assert len(answers) == len(tests) and all(len(v) == len(tests) for v in scores.values())
    means = {key: sum(v) / len(v) for key, v in scores.items()}
    ranked = sorted(means, key=means.get, reverse=True)
    assert set(ranked[:2]) == {"1-2", "1-3"}, means  # query heads 2 and 3 read kv head 1
    assert min(means["1-2"], means["1-3"]) > 2 * max(means[k] for k in ranked[2:])


def test_needles_ask_one_comparison():
    import random

    for seed in range(20):
        passage, sentence, question, answer, other = reasoning_needle(random.Random(seed))
        first, second = passage.split(". ")
        ages = [int(part.split(" is ")[1].split()[0]) for part in (first, second)]
        target = sentence.split(" is ")[0]
        older = first.split(" is ")[0] if ages[0] > ages[1] else second.split(" is ")[0]
        assert (target == older) == ("older" in question)
        assert answer in sentence and other in passage and other not in sentence
        assert answered(
            f"The {'older' if 'older' in question else 'younger'} one loves {answer}.", _Test(answer, other)
        )
        assert not answered(f"Both {answer} and {other}.", _Test(answer, other))


class _Test:
    def __init__(self, answer, other):
        self.answer, self.other = answer, other


@pytest.mark.slow
def test_real_model_scores_are_reproducible_for_a_seed(tmp_path):
    args = ["--lengths", "300", "--depths", "2", "--needles", "1", "--max-new-tokens", "4", "--all-tests"]
    first, second, other = (tmp_path / name for name in ("a.json", "b.json", "c.json"))
    main([*args, "--seed", "3", "--output", str(first)])
    main([*args, "--seed", "3", "--output", str(second)])
    main([*args, "--seed", "4", "--output", str(other)])
    a, b, c = (json.loads(p.read_text()) for p in (first, second, other))
    assert a == b and a["scores"] != c["scores"]
    assert len(a["scores"]) == 30 * 9 and a["tests"] == a["scored"] == 2 and a["settings"]["seed"] == 3
    assert 0 <= a["answered"] <= 2 and a["settings"]["all_tests"] is True
    # The file feeds HeadKVPress directly.
    assert HeadKVPress(0.5, scores=str(first)).importance.shape == (30, 9)
