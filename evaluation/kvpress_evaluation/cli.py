"""``kvpress-eval`` (also ``python -m kvpress_evaluation``): evaluate presses on a benchmark from a YAML file and/or flags.

Examples::

    kvpress-eval --press knorm snapkv --ratios 0.25 0.5 --option lengths=[2048] --option n_examples=5
    kvpress-eval --config sweep.yaml --output-dir results/sweep --fraction 0.1
    torchrun --nproc-per-node 4 -m kvpress_evaluation --config sweep.yaml      # examples spread over 4 GPUs

Flags override the file's fields. Values given as YAML (``--option``, ``--press {...}``, ``--kv-quantization``) are
read with ``yaml.safe_load``: nothing is executed. Bad input exits with status 2 and a one-line error, before any
model is loaded; an interrupted run exits with status 130 and resumes when the same command runs again.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit; main reports one line instead
        raise _UsageError(message)


def _yaml_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise _UsageError(f"{text!r} is not a valid YAML value") from None


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), _yaml_value(value)


def _press(text: str):
    """A press name, or a YAML mapping such as ``{name: adakv, press: snapkv}``."""
    return _yaml_value(text) if text.lstrip().startswith("{") else text


def _epilog() -> str:
    from kvpress_evaluation import registry

    lines = ["benchmarks (--benchmark NAME, --option KEY=VALUE for its options, --list for the presses):"]
    for name in registry.BENCHMARKS:
        lines += ["  " + line for line in registry.describe_benchmark(name)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kvpress-eval",
        description="Evaluate KV-cache presses on a benchmark. Flags override the --config file's fields.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with EvalConfig fields")
    p.add_argument(
        "--list", action="store_true", help="print every press with its parameters and defaults, every benchmark "
        "with its options and tasks, and exit"
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", help="smollm2 (offline default), a local directory or a hub model name")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto: bfloat16 on CUDA, float32 elsewhere")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps; not set: cuda when available, else cpu")
    g.add_argument("--device-map", help="e.g. auto: spread a big model over the GPUs")
    g.add_argument("--attn-implementation", choices=["sdpa", "eager", "flash_attention_2"],
                   help="prefill attention; not set: sdpa, or eager when a press needs attention weights")
    g.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=None,
                   help="run a hub model's own code")
    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", help="ruler, longbench or needle")
    g.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                   help="a benchmark option, value in YAML (e.g. lengths=[2048,4096]); repeatable")
    g.add_argument("--fraction", type=float, help="evaluate this fraction of the examples (seeded)")
    g.add_argument("--n-examples", type=int, help="evaluate this many examples (seeded)")
    g.add_argument("--max-context-length", type=int, help="truncate contexts to this many tokens")
    g.add_argument("--max-new-tokens", type=int,
                   help="generation length of every example; not set: each benchmark's own per task")
    g.add_argument("--seed", type=int, help="seed of the example sampling and of seeded presses")
    g = p.add_argument_group("presses")
    g.add_argument("--press", type=_press, nargs="+", help="press names or YAML mappings; 'none' for no press")
    g.add_argument("--ratios", type=float, nargs="+", help="compression ratios to sweep")
    g.add_argument("--query-aware", action=argparse.BooleanOptionalAction, default=None,
                   help="compress the context together with the question")
    g.add_argument("--chat-template", dest="use_chat_template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the tokenizer's chat template; not set: when it has one")
    g.add_argument("--batch-size", type=int, help="contexts per pipeline call")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through a captured CUDA graph (CUDA only) or the eager loop (--no-cuda-graph); not set: "
                        "the graph wherever it applies on CUDA")
    g.add_argument("--sparse-prefill", metavar="PATTERNS",
                   help="sparse prefill pattern file (python -m kvpress.sparse_prefill): MInference's sparse attention")
    g.add_argument("--prefill-chunk-size", type=int,
                   help="prefill each context in chunks of at most this many tokens (bounded peak memory)")
    g.add_argument("--kv-quantization", type=_yaml_value,
                   help="store the cache quantized, a YAML mapping, e.g. '{bits: 4, group_size: 64}' (default: not "
                   "quantized)")  # fmt: skip
    g.add_argument("--kv-bits", type=int, help="quantize the cache with this many bits (2, 3, 4 or 8; default: not quantized)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", help="where run directories, summary.csv/md and plots are written")
    g.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None, help="draw the plots")
    g.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="messages shown on the console (default: WARNING)")
    _show_config_defaults(p)
    return p


def _show_config_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each flag's default, taken from the config model (flags themselves default to "not given")."""
    from kvpress_evaluation.config import EvalConfig

    for action in parser._actions:
        field = _FIELDS.get(action.dest)
        if field is None:
            continue
        default = EvalConfig.model_fields[field].get_default(call_default_factory=True)
        if field == "presses":
            default = " ".join(spec["name"] for spec in default)
        elif isinstance(default, list):
            default = " ".join(map(str, default))
        shown = "not set" if default is None else default
        action.help = f"{action.help or ''} (default: {shown})".strip()


_FIELDS = {
    "model": "model", "dtype": "dtype", "device": "device", "device_map": "device_map",
    "attn_implementation": "attn_implementation", "trust_remote_code": "trust_remote_code",
    "benchmark": "benchmark", "fraction": "fraction", "n_examples": "n_examples",
    "max_context_length": "max_context_length", "max_new_tokens": "max_new_tokens", "seed": "seed",
    "press": "presses", "ratios": "compression_ratios", "query_aware": "query_aware",
    "use_chat_template": "use_chat_template", "batch_size": "batch_size", "cuda_graph": "cuda_graph",
    "prefill_chunk_size": "prefill_chunk_size", "sparse_prefill": "sparse_prefill",
    "output_dir": "output_dir", "plots": "plots",
}


def overrides(args: argparse.Namespace) -> dict:
    """The config fields the flags set (flags not given set nothing)."""
    out = {field: getattr(args, dest) for dest, field in _FIELDS.items() if getattr(args, dest) is not None}
    if args.option:
        out["benchmark_options"] = dict(args.option)
    quant = args.kv_quantization
    if quant is not None and not isinstance(quant, dict):
        raise _UsageError(f"--kv-quantization must be a YAML mapping, got {quant!r}")
    if args.kv_bits is not None:
        quant = {**(quant or {}), "bits": args.kv_bits}
    if quant is not None:
        out["kv_quantization"] = quant
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0, 2 on bad input, 130 when interrupted)."""
    try:
        from kvpress_evaluation.config import load_config
    except ImportError as err:  # PyYAML comes with the eval extra
        return _fail(f"kvpress-eval needs the eval extra: pip install 'kvpress[eval]' ({err})")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except (_UsageError, argparse.ArgumentTypeError) as err:
        return _fail(err)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        from kvpress.presses.registry import PRESSES, describe_press
        from kvpress_evaluation import registry

        print("presses (--press NAME, or a YAML mapping of the parameters: '{name: adakv, press: snapkv}'; --ratios "
              "sets compression_ratio, or a wrapper's inner one, for each run):")
        print(f"  {registry.NO_PRESS:<20} no compression")
        for name in PRESSES:
            print(f"  {describe_press(name)}")
        print("benchmarks (--benchmark NAME; --option KEY=VALUE sets an option):")
        for name in registry.BENCHMARKS:
            for line in registry.describe_benchmark(name):
                print(f"  {line}")
        return 0
    try:
        config = load_config(args.config, overrides(args))
        from kvpress_evaluation.runner import evaluate

        evaluate(config)
    except (_UsageError, ValueError, FileNotFoundError) as err:
        return _fail(err)
    except KeyboardInterrupt:
        print("kvpress-eval: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _fail(err: BaseException) -> int:
    message = " ".join(str(err).split())
    print(f"kvpress-eval: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
