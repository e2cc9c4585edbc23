"""SimLayerKVPress: a layer is lazy when its last queries' attention share on the initial and recent tokens reaches
the threshold (float64 reference); lazy layers keep only those tokens, the others everything."""

import pytest
import torch

from kvpress.presses.simlayerkv_press import SimLayerKVPress
from kvpress.utils import attention_layers
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import full_layers, prefill, queries_f64


def shares_f64(model, ids, n_last: int, n_initial: int, n_recent: int) -> dict[int, torch.Tensor]:
    """Per full-attention layer, ``(batch,)`` float64 share of the last queries' attention on the kept positions."""
    inputs = {}

    def capture(module, args, kwargs, output):
        inputs[module.layer_idx] = (module, kwargs["hidden_states"], kwargs["position_embeddings"], output)

    handles = [m.register_forward_hook(capture, with_kwargs=True) for m in attention_layers(model)]
    cache = prefill(model, SimLayerKVPress(1.0, n_last, n_recent, n_initial), ids)  # threshold 1: nothing lazy
    for handle in handles:
        handle.remove()
    out = {}
    for i in full_layers(model):
        module, hidden, (cos, sin), _ = inputs[i]
        keys = cache.layers[i].keys.double()
        n = keys.shape[2]
        q = queries_f64(module, hidden, cos, sin)[:, :, -n_last:]
        k = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
        logits = q @ k.transpose(-1, -2) * module.scaling
        for r in range(n_last):  # causal inside the last block
            logits[:, :, r, n - n_last + r + 1 :] = float("-inf")
        p = logits.softmax(-1)
        kept = [t for t in range(n) if t < n_initial or t >= n - n_recent]
        out[i] = p[..., kept].sum(-1).mean(dim=(1, 2)).detach()
    return out


@pytest.mark.parametrize(("batch", "n", "n_last", "n_initial", "n_recent"), [(1, 40, 1, 4, 8), (2, 33, 3, 2, 10)])
def test_lazy_layers_keep_the_initial_and_recent_tokens(arch, batch, n, n_last, n_initial, n_recent):
    model = tiny_model(arch)
    ids = random_ids(n, batch, seed=n)
    shares = shares_f64(model, ids, n_last, n_initial, n_recent)
    layer_share = {i: float(s.min()) for i, s in shares.items()}
    values = sorted(layer_share.values())
    # Every layer lazy, none, and (tiny models differ between layers) some on each side.
    thresholds = [values[0] - 1e-5, values[-1] + 1e-5] + ([(values[0] + values[-1]) / 2] if len(values) > 1 else [])
    full = prefill(model, SimLayerKVPress(1.0, n_last, n_recent, n_initial), ids)  # nothing lazy: every token
    for threshold in thresholds:
        cache = prefill(model, SimLayerKVPress(threshold, n_last, n_recent, n_initial), ids)
        for i, share in layer_share.items():
            lazy = share >= threshold
            assert cache.layers[i].keys.shape[2] == (n_initial + n_recent if lazy else n)
            if lazy:
                keys = full.layers[i].keys
                kept = torch.cat([keys[:, :, :n_initial], keys[:, :, n - n_recent :]], dim=2)
                torch.testing.assert_close(cache.layers[i].keys, kept, rtol=0, atol=0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"lazy_threshold must be a number in \[0, 1\], got 1.5"):
        SimLayerKVPress(1.5)
    with pytest.raises(ValueError, match="n_recent must be an int >= 1"):
        SimLayerKVPress(0.9, n_recent=0)
