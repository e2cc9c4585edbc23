"""ExpectedAttentionPress: Gaussian expected attention of future queries, against a float64 reference built from the
model's own queries (captured by hooks) and its own rotary module at the future positions."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Phi3Config

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.presses.expected_attention_press import ExpectedAttentionPress, average_future_rope
from kvpress.utils import attention_layers, pre_rope_query_states
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import full_layers as _full_layers
from tests.presses.press_harness import kept_positions as _kept_positions
from tests.presses.press_harness import prefill as _prefill
from tests.presses.press_harness import record_scores as _record

RATIOS = [0.0, 0.25, 0.5, 0.9]
_SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
    max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip


@functools.lru_cache(maxsize=None)
def _custom(kind: str, n_kv: int):
    """Tiny models beyond the shared ones: Llama with ``n_kv`` kv heads, or Phi3 with half its channels rotated."""
    torch.manual_seed(n_kv)
    if kind == "llama":
        config = LlamaConfig(**_SMALL, num_key_value_heads=n_kv, head_dim=16)
    else:
        config = Phi3Config(**_SMALL, num_key_value_heads=n_kv, partial_rotary_factor=0.5)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def _model_queries(model, ids) -> dict[int, torch.Tensor]:
    """Pre-RoPE queries ``(batch, heads, n, head_dim)`` of every layer, caught in the model's own forward by hooks on
    the module that produces them last (``q_norm``, else ``q_proj``, else the query slice of ``qkv_proj``)."""
    n_q = model.config.num_attention_heads
    batch, n = ids.shape
    caught, handles = {}, []
    for m in attention_layers(model):
        source = getattr(m, "q_norm", None) or getattr(m, "q_proj", None) or m.qkv_proj

        def hook(mod, args, out, i=m.layer_idx, d=m.head_dim):
            q = out[..., : n_q * d] if out.dim() == 3 else out
            q = q.reshape(batch, n, n_q, d).transpose(1, 2) if q.shape[1] == n else q  # (batch, n, ...) layouts
            caught[i] = q.detach().clone()

        handles.append(source.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return caught


def _future_rotations(model, layer_idx: int, n: int, T: int) -> torch.Tensor:
    """``(T, d, d)`` float64 RoPE matrices (``out = R @ x``) of positions ``n..n+T-1``, from the model's rotary."""
    d = attention_layers(model)[layer_idx].head_dim
    types = getattr(model.config, "layer_types", None)
    extra = {"layer_type": types[layer_idx]} if "Gemma3" in type(model).__name__ else {}
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = model.model.rotary_emb(x, torch.arange(n, n + T)[None], **extra)
    cos, sin = cos[0].double(), sin[0].double()
    rot, h = cos.shape[-1], cos.shape[-1] // 2
    R = torch.eye(d, dtype=torch.float64).repeat(T, 1, 1)
    R[:, :rot, :rot] = torch.diag_embed(cos)
    i = torch.arange(h)
    R[:, i, i + h] = -sin[:, :h]  # out[i] = cos x[i] - sin x[i+h]
    R[:, i + h, i] = sin[:, h:]  # out[i+h] = cos x[i+h] + sin x[i]
    return R


def _reference_scores(model, layer_idx, q, keys, values, press, moments=None) -> torch.Tensor:
    """Float64 expected attention of ``press``'s method, written out from its definition; ``moments``: given query
    ``(mean (heads, d), cov (heads, d, d))`` instead of those of ``q``."""
    n = keys.shape[-2]
    n_q, n_kv = q.shape[1], keys.shape[1]
    s = attention_layers(model)[layer_idx].scaling
    q = q[:, :, press.n_sink :].double()
    mu = q.mean(dim=2)
    c = q - mu[:, :, None]
    sigma = torch.einsum("bhmi,bhmj->bhij", c, c) / q.shape[2]
    if moments is not None:
        mu = moments[0].double().expand_as(mu)
        sigma = moments[1].double().expand_as(sigma)
    R = _future_rotations(model, layer_idx, n, press.n_future_positions).mean(dim=0)
    mu_bar = torch.einsum("ij,bhj->bhi", R, mu)
    sigma_bar = R @ sigma @ R.T
    k = keys.double().repeat_interleave(n_q // n_kv, dim=1)
    exponent = s * torch.einsum("bhnd,bhd->bhn", k, mu_bar)
    if press.use_covariance:
        exponent = exponent + 0.5 * s**2 * torch.einsum("bhnd,bhde,bhne->bhn", k, sigma_bar, k)
    p = exponent.softmax(dim=-1).view(q.shape[0], n_kv, n_q // n_kv, n).mean(dim=2)
    scores = (p + press.epsilon) * values.double().norm(dim=-1) if press.use_vnorm else p + press.epsilon
    scores[..., : press.n_sink] = float("inf")
    return scores


def _check_against_reference(model, ids, press):
    batch, n = ids.shape
    queries = _model_queries(model, ids)
    seen = _record(press)
    cache = _prefill(model, press, ids)
    assert sorted(seen) == _full_layers(model)
    k = round(n * (1 - press.compression_ratio))
    for i, rec in seen.items():
        ref = _reference_scores(model, i, queries[i], rec.keys, rec.values, press)
        torch.testing.assert_close(rec.scores.double(), ref, rtol=2e-4, atol=1e-7)
        expected = ref.topk(k, dim=-1).indices.sort(-1).values
        assert torch.equal(_kept_positions(cache.layers[i].keys, rec.keys), expected)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("batch", [1, 3])
def test_cache_holds_exact_budget(arch, ratio, batch):
    model = tiny_model(arch)
    n = 50  # 0.9 keeps 5 tokens: the 4 sinks and 1 more
    cache = _prefill(model, ExpectedAttentionPress(ratio), random_ids(n, batch, seed=batch))
    for i in _full_layers(model):
        assert cache.layers[i].keys.shape[-2] == cache.layers[i].values.shape[-2] == round(n * (1 - ratio))


@pytest.mark.parametrize(
    "batch, n, options",
    [
        (1, 27, {}),
        (3, 40, {"n_future_positions": 1, "n_sink": 0}),
        (2, 33, {"use_covariance": False, "n_sink": 2, "n_future_positions": 64}),
        (2, 21, {"use_vnorm": False, "epsilon": 0.01}),
        (1, 30, {"epsilon": 0.05, "n_sink": 6}),
    ],
)
def test_scores_match_float64_reference(arch, batch, n, options):
    _check_against_reference(tiny_model(arch), random_ids(n, batch, seed=n), ExpectedAttentionPress(0.5, **options))


@pytest.mark.parametrize("kind, n_kv", [("llama", 1), ("llama", 4), ("phi3", 1), ("phi3", 2)])
def test_gqa_ratios_and_partial_rotary(kind, n_kv):
    model = _custom(kind, n_kv)
    _check_against_reference(model, random_ids(35, 2, seed=n_kv), ExpectedAttentionPress(0.6, n_future_positions=300))


def test_pre_rope_query_states_match_the_model(arch):
    model = tiny_model(arch)
    ids = random_ids(19, 2)
    queries = _model_queries(model, ids)
    hidden = {}

    def keep_input(mod, args, kwargs):
        hidden[mod.layer_idx] = kwargs["hidden_states"]

    handles = [m.register_forward_pre_hook(keep_input, with_kwargs=True) for m in attention_layers(model)]
    with torch.no_grad():
        model.model(input_ids=ids)
        for h in handles:
            h.remove()
        for m in attention_layers(model):
            torch.testing.assert_close(pre_rope_query_states(m, hidden[m.layer_idx]), queries[m.layer_idx])


@pytest.mark.parametrize("model_key", ["llama", "phi3", "gemma3", "phi3-partial"])
@pytest.mark.parametrize("start, n, T", [(0, 2, 512), (0, 40, 7), (100, 25, 1000)])
def test_average_future_rope_matches_rotary_module(model_key, start, n, T):
    model = _custom("phi3", 2) if model_key == "phi3-partial" else tiny_model(model_key)
    extra = {"layer_type": "full_attention"} if model_key == "gemma3" else {}
    x = torch.zeros(1)
    seen = model.model.rotary_emb(x, torch.arange(start, start + n)[None].expand(2, n), **extra)
    future = model.model.rotary_emb(x, torch.arange(start + n, start + n + T)[None], **extra)
    cos, sin = average_future_rope(seen, T)
    assert cos.shape == sin.shape == (2, 1, seen[0].shape[-1])
    torch.testing.assert_close(cos, future[0].double().mean(1, keepdim=True).expand_as(cos), rtol=0, atol=2e-5)
    torch.testing.assert_close(sin, future[1].double().mean(1, keepdim=True).expand_as(sin), rtol=0, atol=2e-5)


def test_average_future_rope_from_bfloat16_angles():
    """Low-precision cos/sin still give the right frequencies: the per-step advance is averaged over the prompt."""
    rotary = tiny_model("llama").model.rotary_emb
    x = torch.zeros(1, dtype=torch.bfloat16)
    cos, sin = average_future_rope(rotary(x, torch.arange(200)[None]), 512)
    future = rotary(x.float(), torch.arange(200, 712)[None])
    torch.testing.assert_close(cos, future[0].double().mean(1, keepdim=True), rtol=0, atol=1e-2)
    torch.testing.assert_close(sin, future[1].double().mean(1, keepdim=True), rtol=0, atol=1e-2)


def test_sinks_always_kept():
    model = tiny_model("qwen3")
    ids = random_ids(40, 2)
    seen = _record(press := ExpectedAttentionPress(0.85, n_sink=5))
    cache = _prefill(model, press, ids)
    for i, rec in seen.items():
        kept = _kept_positions(cache.layers[i].keys, rec.keys)
        assert torch.equal(kept[..., :5], torch.arange(5).expand(2, 2, 5))


def test_ratio_zero_is_identical_to_no_press(arch):
    model = tiny_model(arch)
    ids = random_ids(25, batch=2)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids, **cache_kwargs(model.model, ref))
    cache = _prefill(model, ExpectedAttentionPress(0.0), ids)
    for a, b in zip(cache.layers, ref.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_budget_smaller_than_sinks_raises():
    with pytest.raises(ValueError, match=r"n_sink=4 exceeds the 3 tokens kept out of 30"):
        _prefill(tiny_model("llama"), ExpectedAttentionPress(0.9), random_ids(30))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_future_positions": 0}, "n_future_positions must be a positive int"),
        ({"n_future_positions": 2.0}, "n_future_positions must be a positive int"),
        ({"n_sink": -1}, "n_sink must be a non-negative int"),
        ({"n_sink": True}, "n_sink must be a non-negative int"),
        ({"use_covariance": 1}, "use_covariance must be True or False"),
        ({"use_vnorm": "yes"}, "use_vnorm must be True or False"),
        ({"epsilon": -1e-3}, "epsilon must be a finite number >= 0"),
        ({"epsilon": float("inf")}, "epsilon must be a finite number >= 0"),
        ({"compression_ratio": 1.0}, "compression_ratio must be a number in"),
    ],
)
def test_bad_parameters_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpectedAttentionPress(**kwargs)


# ---- precomputed query statistics (python -m kvpress.query_stats) ---------------------------------------------------
def _random_moments(model, seed: int) -> dict:
    """``{layer: (mean, cov)}`` with a random positive semi-definite covariance, for every full layer."""
    gen = torch.Generator().manual_seed(seed)
    heads = model.config.num_attention_heads
    out = {}
    for m in attention_layers(model):
        d = m.head_dim
        a = torch.randn(heads, d, d, generator=gen) / d
        out[m.layer_idx] = (torch.randn(heads, d, generator=gen), a @ a.transpose(-1, -2))
    return out


@pytest.mark.parametrize("use_covariance", [True, False])
def test_precomputed_statistics_replace_the_prompts_own(arch, use_covariance, tmp_path):
    from kvpress.presses.expected_attention_press import write_query_stats

    model = tiny_model(arch)
    moments = {i: v for i, v in _random_moments(model, 3).items() if i in _full_layers(model)}
    path = tmp_path / "stats.pt"
    write_query_stats(path, moments, model="tiny")
    press = ExpectedAttentionPress(0.5, use_covariance=use_covariance, stats=str(path))
    ids = random_ids(30, 2, seed=4)
    queries = _model_queries(model, ids)
    seen = _record(press)
    _prefill(model, press, ids)
    for i, rec in seen.items():
        ref = _reference_scores(model, i, queries[i], rec.keys, rec.values, press, moments=moments[i])
        torch.testing.assert_close(rec.scores.double(), ref, rtol=2e-4, atol=1e-7)
        own = _reference_scores(model, i, queries[i], rec.keys, rec.values, press)
        assert not torch.allclose(ref[..., press.n_sink :], own[..., press.n_sink :], rtol=1e-3)  # the file counts


def test_the_command_writes_the_moments_of_the_pre_rope_queries(tmp_path):
    from kvpress.presses.expected_attention_press import read_query_stats
    from kvpress.query_recording import calibration_texts
    from kvpress.query_stats import main
    from tests.fixtures_pipeline import smollm2_tokenizer, text_model

    model, tok = text_model("qwen3"), smollm2_tokenizer()  # qwen3: the query norm comes before the moments
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "stats.pt"
    main(["--model", str(tmp_path / "model"), "--output", str(out), "--texts", "2", "--length", "60", "--n-sink", "4",
          "--device", "cpu"])  # fmt: skip
    stats = read_query_stats(out)
    caught = [_model_queries(model, ids) for ids in calibration_texts(tok, 2, 60, 0)]
    for i in _full_layers(model):
        q = torch.cat([c[i][0, :, 4:] for c in caught], dim=1).double()  # (heads, N, d), sinks left out
        mean = q.mean(1)
        cov = (q - mean[:, None]).transpose(-1, -2) @ (q - mean[:, None]) / q.shape[1]
        torch.testing.assert_close(stats[i][0].double(), mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats[i][1].double(), cov, rtol=1e-4, atol=1e-6)
    assert ExpectedAttentionPress(0.5, stats=str(out)).validate(model) is None


def test_statistics_of_another_model_or_format_are_named(tmp_path):
    from kvpress.presses.expected_attention_press import write_query_stats

    with pytest.raises(ValueError, match="stats: cannot read"):
        ExpectedAttentionPress(0.5, stats=str(tmp_path / "missing.pt"))
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a query-statistics file"):
        ExpectedAttentionPress(0.5, stats=str(tmp_path / "other.pt"))
    small = tiny_model("llama")
    write_query_stats(tmp_path / "s.pt", {0: (torch.zeros(2, 8), torch.zeros(2, 8, 8))})
    with pytest.raises(ValueError, match=r"stats: layer 0 needs a \(4, 16\) mean"):
        with ExpectedAttentionPress(0.5, stats=str(tmp_path / "s.pt"))(small):
            pass
