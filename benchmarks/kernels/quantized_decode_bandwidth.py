"""Decode (Q = 1) time of `quantized_varlen_attention` at 2/4/8 bits against `varlen_attention` on the bf16 cache of
the same token count.

Shapes (as decode_bandwidth.py): batch 1, 8 kv heads, G = 4 (32 query heads), head_dim 128, bfloat16 model dtype;
32k and 128k context tokens per kv head, uniform or head-variable with the same total; a 64-token bf16 tail.
Quantized context: group size --group-size (default 64) for keys (tokens per channel) and values (channels per token).

Every case first checks the kernel output against its torch reference (quantized: dequantize + reference attention;
bf16: reference_varlen_attention), then times it: CUDA events around one call, L2 flushed, the GPU kept busy while
the host enqueues (launch overhead excluded), median of --iters; plus CUDA-graph replay. Effective bandwidth = bytes
the kernel must read (packed codes + scales + zeros + int32 metadata, or bf16 K/V; plus the visible tail) / time.

    python benchmarks/kernels/quantized_decode_bandwidth.py [--sweep] [--out PATH] [--compare FILE]
    python benchmarks/kernels/quantized_decode_bandwidth.py --smoke     # tiny sizes, CPU (Triton interpreter)

--compare FILE times another version of kernels/quantized_attention.py (e.g. ``git show
HEAD~1:kernels/quantized_attention.py > /tmp/old.py``) on the same inputs, loaded as a module of kvpress_kernels.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    # Route CPU tensors through the Triton kernels; the interpreter must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("KVPRESS_FORCE_TRITON", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Same folder: shapes, timers and the kernels import are shared with decode_bandwidth.py.
from decode_bandwidth import (
    DTYPE,
    HKV,
    REPO,
    TAIL,
    TAIL_CAP,
    VARIABLE_SHARES,
    D,
    G,
    copy_bandwidth_gbs,
    kk,
    time_graph_us,
    time_kernel_us,
)

DEFAULT_OUT = REPO / "benchmarks" / "kernels" / "results" / "quantized_decode_bandwidth_h100.json"
SMOKE_OUT = REPO / "benchmarks" / "kernels" / "results" / "quantized_decode_bandwidth_smoke.json"
CONTEXTS, SMOKE_CONTEXTS = (32768, 131072), (40, 200)
MAX_ERR = 2e-2  # bf16 output vs the torch reference on the same (dequantized) tokens


def head_lengths(context: int, layout: str) -> list[int]:
    if layout == "uniform":
        return [context] * HKV
    lens = [max(1, round(s * context)) for s in VARIABLE_SHARES]
    lens[-1] += HKV * context - sum(lens)
    return lens


def make_context(context, layout, device, gen):
    """bf16 ragged context, tail and query: ((q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale), lens)."""
    lens = head_lengths(context, layout)
    n = sum(lens)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(DTYPE)

    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    tail = min(TAIL, TAIL_CAP)
    tail_lens = torch.tensor([tail], dtype=torch.int32, device=device)
    args = (randn(1, HKV * G, 1, D), randn(n, D), randn(n, D), cu, randn(1, HKV, TAIL_CAP, D),
            randn(1, HKV, TAIL_CAP, D), tail_lens, D**-0.5)  # fmt: skip
    return args, lens


def timer(device, iters, warmup, flush):
    """(eager us, graph us or None) of fn: CUDA events (see decode_bandwidth.py) or, on CPU, wall clock."""

    def run(fn):
        if device.type != "cuda":
            fn()
            samples = []
            for _ in range(max(1, iters)):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(samples), None
        eager = time_kernel_us(fn, iters, warmup, flush)
        try:
            graph = time_graph_us(fn, iters, flush)
        except Exception as exc:  # noqa: BLE001  (graphs are informative only)
            print("graph capture failed:", exc)
            graph = None
        return eager, graph

    return run


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def load_compare(path: Path):
    """A quantized_attention.py version as module kvpress_kernels._compare (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location(f"{kk.__name__}._compare", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def bench_case(context, layout, bits_list, group_size, device, gen, run, config=None, compare=None):
    """Rows for the bf16 cache and each bit width on one context layout (plus the --compare kernel's time)."""
    args, lens = make_context(context, layout, device, gen)
    q, seg_k, seg_v, _, tail_k, tail_v, tail_lens, scale = args
    tail_bytes = HKV * int(tail_lens[0]) * D * 2 * tail_k.element_size()
    rows = []

    ref = kk.reference_varlen_attention(*args)
    err = max_err(kk.varlen_attention(*args), ref)
    us, graph_us = run(lambda: kk.varlen_attention(*args, check=False))
    nbytes = seg_k.numel() * seg_k.element_size() * 2 + tail_bytes
    case = {"context_per_head": context, "layout": layout, "head_lengths": lens}
    bf16 = {**case, "cache": "bf16", "bits": 16, "group_size": None, "bytes_read": nbytes, "kernel_us": us,
            "graph_us": graph_us, "gbs": nbytes / (us * 1e-6) / 1e9, "max_abs_err_vs_reference": err,
            "correct": err < MAX_ERR}  # fmt: skip
    rows.append(bf16)

    seg_lens = torch.tensor(lens, device=device)
    for bits in bits_list:
        segs = kk.quantize_segments(seg_k, seg_v, seg_lens, bits, group_size)
        qargs = (q, segs, tail_k, tail_v, tail_lens, scale)
        out = kk.quantized_varlen_attention(*qargs, config=config)
        err = max_err(out, kk.reference_quantized_varlen_attention(*qargs))
        err_full = max_err(out, ref)  # quantization error itself (vs the bf16 cache), informative
        us, graph_us = run(lambda: kk.quantized_varlen_attention(*qargs, check=False, config=config))  # noqa: B023
        nbytes = segs.nbytes() + tail_bytes
        graph_speedup = bf16["graph_us"] / graph_us if graph_us and bf16["graph_us"] else None
        row = {
            **case,
            "cache": f"int{bits}",
            "bits": bits,
            "group_size": group_size,
            "bytes_read": nbytes,
            "kernel_us": us,
            "graph_us": graph_us,
            "gbs": nbytes / (us * 1e-6) / 1e9,
            "speedup_vs_bf16": bf16["kernel_us"] / us,
            "graph_speedup_vs_bf16": graph_speedup,
            "max_abs_err_vs_reference": err,
            "max_abs_err_vs_bf16_cache": err_full,
            "correct": err < MAX_ERR,
        }
        if compare is not None:
            old = compare.quantized_varlen_attention
            row["compare_max_abs_diff"] = max_err(old(*qargs), out)  # the other version at its own defaults
            row["compare_kernel_us"], _ = run(lambda: old(*qargs, check=False))  # noqa: B023
            row["speedup_vs_compare"] = row["compare_kernel_us"] / us
        del out
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


SWEEP_CONFIGS = ((128, 2, 2), (128, 2, 3), (64, 2, 2), (128, 1, 2), (128, 4, 2), (64, 4, 2))  # block_n, warps, stages
SWEEP_PROGRAMS_PER_SM = (4, 8, 16)


def sweep(device, gen, run, group_size, bits=4, contexts=CONTEXTS):
    """Launch configurations of the 4-bit kernel on the uniform and variable cases of every context. Each row holds
    the time of every case and ``rel``, the mean over cases of time / best time of that case; sorted by ``rel``."""
    cases = []
    for context in contexts:
        for layout in ("uniform", "variable"):
            args, lens = make_context(context, layout, device, gen)
            q, seg_k, seg_v, _, tail_k, tail_v, tail_lens, scale = args
            segs = kk.quantize_segments(seg_k, seg_v, torch.tensor(lens, device=device), bits, group_size)
            cases.append((f"{layout}_{context}", (q, segs, tail_k, tail_v, tail_lens, scale)))
            del seg_k, seg_v, args
    rows = []
    for bn, nw, ns in SWEEP_CONFIGS:
        for pps in SWEEP_PROGRAMS_PER_SM:
            cfg = kk.AttentionConfig(block_n=bn, num_warps=nw, num_stages=ns, programs_per_sm=pps)
            row = {"config": dataclasses.asdict(cfg)}
            try:
                for name, qargs in cases:
                    us, _ = run(lambda: kk.quantized_varlen_attention(*qargs, check=False, config=cfg))  # noqa: B023
                    row[name] = us
            except Exception as exc:  # noqa: BLE001  (e.g. out of shared memory or registers for big tiles)
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print("sweep", {k: v for k, v in row.items() if k != "config"}, cfg, flush=True)
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        r["rel"] = statistics.mean(r[name] / min(o[name] for o in ok) for name, _ in cases)
    return sorted(ok, key=lambda r: r["rel"]) + [r for r in rows if "error" in r]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, action="append", help="JSON output path (repeatable)")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="+", help="tokens per kv head (default 32k 128k; smoke: tiny)")
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations (4-bit, every context)")
    parser.add_argument("--compare", type=Path, help="another quantized_attention.py to time on the same inputs")
    parser.add_argument("--block-n", type=int, help="quantized kernel: key slots per tile (default: its own)")
    parser.add_argument("--num-warps", type=int, help="quantized kernel: warps per program (default: its own)")
    parser.add_argument("--num-stages", type=int, help="quantized kernel: pipeline stages (default: its own)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU through the Triton interpreter")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke for a tiny CPU run)")
    contexts = args.contexts or (SMOKE_CONTEXTS if args.smoke else CONTEXTS)
    iters, warmup = (1, 0) if args.smoke else (args.iters, args.warmup)
    outs = args.out or [SMOKE_OUT if args.smoke else DEFAULT_OUT]
    import triton

    info = {"device": "cpu (Triton interpreter)" if device.type != "cuda" else torch.cuda.get_device_name(device)}
    flush = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
        copy_gbs, _ = copy_bandwidth_gbs(50, flush)
        info.update(sms=props.multi_processor_count, copy_bandwidth_gbs=copy_gbs)
        print(f"{props.name}: copy bandwidth {copy_gbs:.0f} GB/s")
    run = timer(device, iters, warmup, flush)
    gen = torch.Generator(device=device).manual_seed(0)

    compare = load_compare(args.compare) if args.compare else None
    config = kk.AttentionConfig(block_n=args.block_n, num_warps=args.num_warps, num_stages=args.num_stages)
    sweep_rows = sweep(device, gen, run, args.group_size) if args.sweep and not args.smoke else None
    results = []
    for context in contexts:
        for layout in ("uniform", "variable"):
            results += bench_case(context, layout, args.bits, args.group_size, device, gen, run, config, compare)

    print(f"\n{'context':>8} {'layout':>9} {'cache':>6} {'MB read':>8} {'kernel us':>10} {'GB/s':>7} {'vs bf16':>8} "
          f"{'graph us':>9} {'err/ref':>8} {'err/bf16':>9} {'compare us':>11}")  # fmt: skip
    for r in results:
        graph = f"{r['graph_us']:9.1f}" if r["graph_us"] is not None else f"{'-':>9}"
        speed = f"{r['speedup_vs_bf16']:7.2f}x" if "speedup_vs_bf16" in r else f"{'-':>8}"
        full = f"{r['max_abs_err_vs_bf16_cache']:9.1e}" if "max_abs_err_vs_bf16_cache" in r else f"{'-':>9}"
        print(f"{r['context_per_head']:>8} {r['layout']:>9} {r['cache']:>6} {r['bytes_read'] / 1e6:8.2f} "
              f"{r['kernel_us']:10.1f} {r['gbs']:7.1f} {speed} {graph} "
              f"{r['max_abs_err_vs_reference']:8.1e} {full} {r.get('compare_kernel_us') or 0:11.1f}")  # fmt: skip
    bad = [r for r in results if not r["correct"]]
    report = dict(
        **info, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        shape={"batch": 1, "kv_heads": HKV, "group": G, "head_dim": D, "dtype": str(DTYPE), "q_len": 1,
               "tail": TAIL, "tail_capacity": TAIL_CAP, "quant_group_size": args.group_size},
        smoke=args.smoke, iters=iters, all_correct=not bad, config=dataclasses.asdict(config),
        compare=str(args.compare) if args.compare else None,
        results=results, sweep=sweep_rows,
    )  # fmt: skip
    for path in outs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print("wrote", path)
    if bad:
        sys.exit(f"{len(bad)} case(s) differ from their reference by more than {MAX_ERR}")


if __name__ == "__main__":
    main()
