"""Which correction costs what in `decomposed_attention` decode (H100 diagnosis): one storage per feature, 32k tokens
per kv head, Llama-3.1-8B shape, 4 bits, group size 64; times against bf16 `varlen_attention` in the same run.

    python benchmarks/kernels/decomposed_features.py --out benchmarks/kernels/results/decomposed_features_h100.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bandwidth import D, kk  # noqa: E402
from quantized_decode_bandwidth import make_context, timer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda")
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    run = timer(device, 30, 5, flush)
    gen = torch.Generator(device=device).manual_seed(0)
    (q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale), lens = make_context(args.context, "uniform", device, gen)
    rope = kk.RotaryTable((1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(device), 1.0)
    seg_lens = torch.tensor(lens, device=device)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    levels = torch.linspace(0, 15, 16) ** 1.0
    features = {
        "none": {},
        "levels": {"k_levels": levels, "v_levels": levels},
        "outliers 1%": {"outlier_ratio": 0.01},
        "rank 4": {"rank": 4},
        "pre-rope": {"positions": positions, "rope": rope},
    }
    rows = []
    bf16_us, _ = run(lambda: kk.varlen_attention(q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale, check=False))
    rows.append({"feature": "bf16 varlen_attention", "us": bf16_us})
    print(f"bf16 {bf16_us:.1f} us", flush=True)
    for name, opts in features.items():
        ds = kk.decompose_segments(seg_k, seg_v, seg_lens, 4, 64, **opts)
        r = opts.get("rope")
        us, _ = run(lambda ds=ds, r=r: kk.decomposed_attention(q, ds, tail_k, tail_v, tail_lens, scale, rope=r,
                                                               check=False))  # fmt: skip
        rows.append({"feature": name, "us": us, "vs_bf16": us / bf16_us})
        print(f"{name:<12} {us:9.1f} us  {us / bf16_us:.2f}x bf16", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
