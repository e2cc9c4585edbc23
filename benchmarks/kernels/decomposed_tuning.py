"""Launch choices of `decomposed_attention` decode on the GPU: level-table lookup (one load per code or an
in-register gather), outliers per one-hot dot, key-tile size, warps and programs per SM, for 4-bit KVQuant and GEAR storage against
bf16 `varlen_attention`, in one run (Llama-3.1-8B shape, storage as decomposed_decode.py).

    python benchmarks/kernels/decomposed_tuning.py --out benchmarks/kernels/results/decomposed_tuning_h100.json
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bandwidth import D, kk, time_kernel_us  # noqa: E402
from decomposed_decode import storage  # noqa: E402
from quantized_decode_bandwidth import make_context, max_err  # noqa: E402

module = sys.modules[kk.decomposed_attention.__module__]  # the launcher's knobs (the package exports the function)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768])
    parser.add_argument("--methods", nargs="+", default=["kvquant", "gear"])
    parser.add_argument("--tiles", nargs="+", default=["64x2", "64x4"], help="block_n x num_warps")
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[4])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--gather-both", action="store_true", help="also time one load per code for level tables")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda")
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    rope = kk.RotaryTable((1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(device), 1.0)
    rows = []
    for context in args.contexts:
        (q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale), lens = make_context(context, "uniform", device, gen)
        bf16 = time_kernel_us(lambda: kk.varlen_attention(q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale,
                                                          check=False), args.iters, 5, flush)  # fmt: skip
        print(f"{context:>7} bf16 {bf16:8.1f} us", flush=True)
        rows.append({"context_per_head": context, "method": "bf16", "us": bf16})
        for method in args.methods:
            ds = storage(method, seg_k, seg_v, torch.tensor(lens, device=device), 4, 64, rope)
            r = rope if ds.positions is not None else None
            want = kk.reference_decomposed_attention(q, ds, tail_k, tail_v, tail_lens, scale, rope=r)
            gathers = [True, False] if ds.k_levels is not None and args.gather_both else [True]
            for gather, pps, chunk, tile in itertools.product(gathers, args.programs_per_sm, args.chunks, args.tiles):
                block_n, warps = (int(x) for x in tile.split("x"))
                module._LUT_GATHER, module._OUTLIER_CHUNK = gather, chunk
                cfg = kk.AttentionConfig(block_n=block_n, num_warps=warps, programs_per_sm=pps)

                def fn(ds=ds, r=r, cfg=cfg):
                    return kk.decomposed_attention(q, ds, tail_k, tail_v, tail_lens, scale, rope=r, check=False,
                                                   config=cfg)  # fmt: skip

                err = max_err(fn(), want)
                us = time_kernel_us(fn, args.iters, 5, flush)
                row = {"context_per_head": context, "method": method, "lut_gather": gather, "programs_per_sm": pps,
                       "outlier_chunk": chunk, "block_n": block_n, "num_warps": warps}  # fmt: skip
                rows.append({**row, "us": us, "vs_bf16": us / bf16, "max_abs_err_vs_reference": err})
                name = f"gather={gather!s:<5} pps={pps:<3} chunk={chunk:<3} tile={tile:<5}"
                print(f"{context:>7} {method:<8} {name} {us:8.1f} us ({us / bf16:.2f}x bf16) err {err:.1e}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
