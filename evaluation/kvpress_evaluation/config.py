"""`EvalConfig`: everything one ``kvpress-eval`` invocation runs, read from YAML and/or flags and validated up front.

Parsing never executes anything: YAML is read with ``yaml.safe_load`` and presses and benchmarks are looked up by name
in :mod:`kvpress_evaluation.registry`. Unknown fields are errors naming the field, and every check that can fail
(names, press arguments, benchmark options and data paths) runs here, before any model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from kvpress.cache.quantization_config import QuantizationConfig
from kvpress_evaluation import registry

SMOLLM2 = "smollm2"
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class RunSpec:
    """One press at one compression ratio: a run directory under ``output_dir``.

    Attributes:
        name: directory name, e.g. ``snapkv_0.50`` or ``snapkv_0.50_kv4`` (with a quantized cache; ``_kvquant4``,
            ``_gear4`` for those storages), ``none``.
        label: the press's label (``snapkv``, ``adakv-snapkv``, ``none``).
        press: the press spec with the ratio filled in (plain data for :func:`registry.build_press`).
        ratio: the swept compression ratio; 0 for ``none``; ``None`` for a press that sets its own budget.
        source: the configured spec the run comes from (ratio left to the sweep).
    """

    name: str
    label: str
    press: dict[str, Any]
    ratio: float | None
    source: dict[str, Any]


def ratio_text(ratio: float) -> str:
    """``0.5 -> "0.50"``, ``0.125 -> "0.125"``: two decimals unless more are needed to tell ratios apart."""
    return f"{ratio:.2f}" if round(ratio, 2) == ratio else f"{ratio:g}"


class EvalConfig(BaseModel):
    """One evaluation: a model, a benchmark, and presses swept over compression ratios.

    Attributes:
        model: ``smollm2`` (the offline SmolLM2-135M-Instruct), a local model directory or a hub model name.
        dtype: weights dtype; ``auto`` is bfloat16 on CUDA and float32 elsewhere.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; ``None`` picks CUDA when available. Under ``torchrun`` each
            process uses ``cuda:LOCAL_RANK``.
        device_map: passed to ``from_pretrained`` (e.g. ``auto`` to spread a big model over the GPUs); excludes
            ``device``.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``; ``None`` picks ``eager`` when a press
            needs attention weights, else ``sdpa``.
        trust_remote_code: run a hub model's own Python code (off unless asked for).
        benchmark: a name of :data:`registry.BENCHMARKS`.
        benchmark_options: that benchmark's options (validated with its ``Options`` model; stored with defaults).
        presses: press specs (see :mod:`kvpress_evaluation.registry`); YAML may give a single ``press`` instead.
        compression_ratios: the sweep, each in ``[0, 1)``; every press that takes a ratio runs once per ratio.
        fraction, n_examples: a subset of the benchmark's examples drawn with ``seed`` (at most one of the two).
        max_context_length: truncate contexts to this many tokens (the pipeline keeps the head).
        max_new_tokens: generation length of every example (default: each example's own).
        query_aware: compress the context together with the question (observation-window presses need it).
        use_chat_template: ``None`` uses the tokenizer's template when it has one.
        batch_size: contexts per pipeline call (stacked without padding); 1 with ``query_aware``.
        cuda_graph: decode through a captured CUDA graph (``True``: CUDA only) or the eager loop (``False``);
            ``None``: the graph wherever it applies on CUDA, else the eager loop (with a warning on CUDA).
        prefill_chunk_size: prefill each context in chunks of at most this many tokens, the press bringing the cache
            back to its budget after each (presses with ``chunked_prefill``); ``None``: one forward.
        sparse_prefill: a sparse prefill pattern file (``python -m kvpress.sparse_prefill``): each context's prefill
            runs MInference's sparse attention; ``None``: dense.
        kv_quantization: quantize the compressed cache (bits, group size, full-precision window, per-layer bits).
        output_dir: root of the run directories, ``summary.csv``/``summary.md`` and plots.
        seed: example subset, generated data and presses with a ``seed`` argument.
        plots: draw ``scores.png`` and the benchmark's own figures at the end.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = SMOLLM2
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str | None = None
    device_map: str | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    trust_remote_code: bool = False
    benchmark: str = "ruler"
    benchmark_options: dict[str, Any] = {}
    presses: list[dict[str, Any]] = [{"name": registry.NO_PRESS}]
    compression_ratios: list[float] = [0.5]
    fraction: float | None = None
    n_examples: int | None = None
    max_context_length: int | None = None
    max_new_tokens: int | None = None
    query_aware: bool = False
    use_chat_template: bool | None = None
    batch_size: int = 1
    cuda_graph: bool | None = None
    prefill_chunk_size: int | None = None
    sparse_prefill: str | None = None
    kv_quantization: QuantizationConfig | None = None
    output_dir: str = "results"
    seed: int = 42
    plots: bool = True

    # ---- field checks ---------------------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _single_press(cls, data: Any) -> Any:
        if isinstance(data, dict) and "press" in data:
            if "presses" in data:
                raise ValueError("press: give either press (one) or presses (a list), not both")
            data = dict(data)
            data["presses"] = [data.pop("press")]
        return data

    @field_validator("model", "output_dir")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        if value is not None and not _DEVICE.match(value):
            raise ValueError(f"must be cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("presses", mode="before")
    @classmethod
    def _normalize_presses(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError("must be a non-empty list of presses (names or mappings with 'name')")
        return [registry.normalize_press(spec, f"presses[{i}]") for i, spec in enumerate(value)]

    @field_validator("compression_ratios")
    @classmethod
    def _check_ratios(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("must hold at least one ratio in [0, 1)")
        for ratio in value:
            if not 0 <= ratio < 1:
                raise ValueError(f"each ratio must be in [0, 1), got {ratio}")
        if len(set(value)) != len(value):
            raise ValueError(f"ratios must be distinct, got {value}")
        return value

    @field_validator("fraction")
    @classmethod
    def _check_fraction(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"must be in (0, 1], got {value}")
        return value

    @field_validator("sparse_prefill")
    @classmethod
    def _check_patterns(cls, value: str | None) -> str | None:
        if value is not None:
            from kvpress.sparse_prefill import SparsePrefillConfig

            SparsePrefillConfig.load(value)  # a missing or invalid file fails here, naming it
        return value

    @field_validator("n_examples", "max_context_length", "max_new_tokens", "batch_size", "prefill_chunk_size")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be a positive int, got {value}")
        return value

    # ---- cross-field checks ---------------------------------------------------------------------------------------
    @model_validator(mode="after")
    def _check_combinations(self) -> EvalConfig:
        if self.device is not None and self.device_map is not None:
            raise ValueError("device_map: give either device or device_map, not both")
        if self.device_map is not None and self.model == SMOLLM2:
            raise ValueError("device_map: the offline smollm2 model is placed with device, not device_map")
        if self.fraction is not None and self.n_examples is not None:
            raise ValueError("n_examples: give either fraction or n_examples, not both")
        if self.batch_size > 1 and self.query_aware:
            raise ValueError("batch_size: query_aware compresses one prompt per question; use batch_size 1")
        if self.cuda_graph and self.device is not None and not self.device.startswith("cuda"):
            raise ValueError(f"cuda_graph: needs a CUDA device, got device={self.device!r}")
        # Validated options replace the raw ones, so the resolved config shows every default.
        options = registry.benchmark_options(self.benchmark, self.benchmark_options)
        self.benchmark_options = options.model_dump(mode="json")
        self._check_presses()
        return self

    def _check_presses(self) -> None:
        runs = self.runs()
        names = [run.name for run in runs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"presses: several presses give the runs {duplicates}; set a distinct 'label' on each")
        for run in runs:
            where = f"presses[{self.presses.index(run.source)}]"
            press = registry.build_press(run.press, seed=self.seed, where=where)
            if press is None:
                continue
            caps = press.capabilities
            if caps.needs_attention_weights and self.attn_implementation not in (None, "eager"):
                raise ValueError(
                    f"attn_implementation: press {run.label!r} reads attention weights, which only 'eager' "
                    f"attention returns; got {self.attn_implementation!r}"
                )
            if caps.needs_question and not self.query_aware:
                raise ValueError(
                    f"query_aware: press {run.label!r} needs the question in the compressed prompt; set query_aware: true"
                )

    # ---- derived values -------------------------------------------------------------------------------------------
    def runs(self) -> list[RunSpec]:
        """Every (press, ratio) run in order: presses first to last, ratios of the sweep inside each press."""
        q = self.kv_quantization
        # KIVI keeps the historical `_kv4`; the other storages name themselves (`_kvquant4`, `_gear4`).
        suffix = "" if q is None else f"_kv{q.bits}" if q.method == "kivi" else f"_{q.method}{q.bits}"
        runs = []
        for spec in self.presses:
            label = registry.press_label(spec)
            if spec["name"] == registry.NO_PRESS:
                runs.append(RunSpec(label + suffix, label, spec, 0.0, spec))
            elif not registry.takes_ratio(spec):
                runs.append(RunSpec(label + suffix, label, spec, None, spec))
            else:
                for ratio in self.compression_ratios:
                    name = f"{label}_{ratio_text(ratio)}{suffix}"
                    runs.append(RunSpec(name, label, registry.with_ratio(spec, ratio), ratio, spec))
        return runs

    def attention(self) -> str:
        """The attention implementation to load the model with."""
        if self.attn_implementation is not None:
            return self.attn_implementation
        for run in self.runs():
            press = registry.build_press(run.press, seed=self.seed)
            if press is not None and press.capabilities.needs_attention_weights:
                return "eager"
        return "sdpa"

    def for_run(self, run: RunSpec) -> EvalConfig:
        """This config narrowed to ``run``: the config that reproduces exactly that run directory."""
        ratio = run.ratio if run.ratio is not None else 0.0
        return self.model_copy(update={"presses": [run.source], "compression_ratios": [ratio]})

    def to_yaml(self) -> str:
        """The resolved config as YAML (every field, defaults included); :func:`load_config` reads it back equal."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> EvalConfig:
    """The config in YAML file ``path`` (optional) with ``overrides`` on top; ``benchmark_options`` and
    ``kv_quantization`` mappings are merged key by key. Raises ``ValueError`` (one line, naming the fields) or
    ``FileNotFoundError``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config: {str(path)!r} is not a file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"config: {path} is not valid YAML ({str(err).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config: {path} must hold a mapping of fields, got {type(loaded).__name__}")
        data = loaded
    for key, value in (overrides or {}).items():
        if key in ("benchmark_options", "kv_quantization") and isinstance(value, dict):
            base = data.get(key) if isinstance(data.get(key), dict) else {}
            data[key] = {**base, **value}
        elif key in ("press", "presses"):
            data.pop("press", None)
            data.pop("presses", None)
            data[key] = value
        else:
            data[key] = value
    return parse_config(data)


def parse_config(data: dict[str, Any]) -> EvalConfig:
    """Validate a mapping of fields; ``ValueError`` with every bad field named on one line."""
    try:
        return EvalConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"config: {registry.validation_message(err)}") from None
