"""Names the evaluation accepts: every press of :mod:`kvpress.presses`, and the benchmarks.

Presses are described by plain data (parsed YAML, never code): a name, or a mapping with ``name`` and the press's
keyword arguments. Wrappers take their inner press under ``press`` and :class:`~kvpress.presses.ComposedPress` a
list under ``presses``, so ``{"name": "adakv", "press": {"name": "snapkv", "window_size": 64}}`` or
``{"name": "composed", "presses": ["knorm", "streaming_llm"]}`` build nested presses. ``label`` (optional) names the
press in run directories and tables. Benchmarks are imported only when asked for, so a missing one fails alone.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from pydantic import ValidationError

from kvpress.presses.base_press import BasePress
from kvpress.presses.registry import PRESSES
from kvpress_evaluation.benchmark import Benchmark

NO_PRESS = "none"

BENCHMARKS: dict[str, str] = {
    "ruler": "kvpress_evaluation.ruler.benchmark:RulerBenchmark",
    "longbench": "kvpress_evaluation.longbench.benchmark:LongBenchBenchmark",
    "needle": "kvpress_evaluation.needle.benchmark:NeedleBenchmark",
}

# Keys of a press spec that are not keyword arguments of the press.
_RESERVED = ("name", "label")
# Fields holding inner presses: one spec, or a list of specs.
_INNER, _INNER_LIST = "press", "presses"
# Wrappers whose own arguments set the budget (the inner press's is ignored): the field the sweep sets, as
# ``1 - ratio``, or None when a single ratio cannot express it (per-layer ratios, a decoding press's target_size).
_OWN_BUDGET = {"per_layer": None, "memory_budget": "budget_fraction", "decoding": None,
               "duo_attention": "head_compression_ratio"}
_BUDGET_FIELDS = ("budget_fraction", "budget_bytes", "compression_ratios", "head_compression_ratio")


# ---- presses --------------------------------------------------------------------------------------------------------
def _accepted_presses() -> str:
    return ", ".join([NO_PRESS, *PRESSES])


def _fields(cls: type[BasePress]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def normalize_press(spec: Any, where: str = "press") -> dict[str, Any]:
    """``spec`` (a name or a mapping) as a mapping with ``name`` and nested specs normalized, checked against the
    press classes' fields; raises ``ValueError`` naming ``where`` (the spec's place in the config)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ValueError(  # noqa: TRY004  (bad input is a ValueError throughout the library)
            f"{where} must be a press name or a mapping with 'name', got {type(spec).__name__}"
        )
    name = spec.get("name")
    if name == NO_PRESS:
        extra = sorted(set(spec) - set(_RESERVED))
        if extra:
            raise ValueError(f"{where}: press 'none' takes no arguments, got {extra}")
        return dict(spec)
    if name not in PRESSES:
        raise ValueError(f"{where}.name: unknown press {name!r}; accepted: {_accepted_presses()}")
    if "label" in spec and (not isinstance(spec["label"], str) or not spec["label"].strip()):
        raise ValueError(f"{where}.label must be a non-empty string, got {spec['label']!r}")
    fields = _fields(PRESSES[name])
    out = dict(spec)
    for key, value in spec.items():
        if key in _RESERVED:
            continue
        if key not in fields:
            raise ValueError(f"{where}: {key!r} is not an argument of press {name!r}; accepted: {', '.join(fields)}")
        if key == _INNER:
            out[key] = normalize_press(value, f"{where}.press")
            if out[key]["name"] == NO_PRESS:
                raise ValueError(f"{where}.press: press {name!r} wraps a press, not 'none'")
        elif key == _INNER_LIST:
            if not isinstance(value, list) or not value:
                raise ValueError(f"{where}.presses must be a non-empty list of presses, got {value!r}")
            out[key] = [normalize_press(v, f"{where}.presses[{i}]") for i, v in enumerate(value)]
            if any(p["name"] == NO_PRESS for p in out[key]):
                raise ValueError(f"{where}.presses: 'none' cannot be composed")
    for key in (_INNER, _INNER_LIST):
        if key in fields and key not in spec:
            raise ValueError(f"{where}: press {name!r} needs {key!r} (the press(es) it wraps)")
    return out


def _ratio_target(spec: dict[str, Any]) -> tuple[list, str] | None:
    """``(keys to the spec, field)`` that the swept ratio sets, or ``None``: the outermost press with an unset
    ``compression_ratio`` (through wrappers and compositions), or a budget wrapper's own unset budget."""
    name = spec["name"]
    if name == NO_PRESS:
        return None
    if name in _OWN_BUDGET:
        field = _OWN_BUDGET[name]
        if field is None or any(key in spec for key in _BUDGET_FIELDS):
            return None
        return [], field
    if "compression_ratio" in _fields(PRESSES[name]):
        return None if "compression_ratio" in spec or spec.get("target_size") is not None else ([], "compression_ratio")
    if _INNER in spec:
        inner = _ratio_target(spec[_INNER])
        return None if inner is None else ([_INNER, *inner[0]], inner[1])
    for i, inner_spec in enumerate(spec.get(_INNER_LIST, [])):
        inner = _ratio_target(inner_spec)
        if inner is not None:
            return [_INNER_LIST, i, *inner[0]], inner[1]
    return None


def takes_ratio(spec: dict[str, Any]) -> bool:
    """Whether the swept compression ratio applies to the normalized ``spec``. Presses that set their own budget
    (``compression_ratio``, ``target_size``, per-layer ratios or a byte budget given, or nothing to set, as ThinK's
    channel ratio) and ``none`` run once."""
    return _ratio_target(spec) is not None


def with_ratio(spec: dict[str, Any], ratio: float) -> dict[str, Any]:
    """A copy of the normalized ``spec`` with the swept ``ratio`` set: ``compression_ratio=ratio`` on the outermost
    press that has one unset (wrappers pass it to the press they wrap; a composition gives it to its first such press),
    or ``budget_fraction=1 - ratio`` on a memory-budget wrapper (the kept share of the full cache's bytes), or
    ``head_compression_ratio=ratio`` on DuoAttention (the share of streaming heads)."""
    target = _ratio_target(spec)
    if target is None:
        raise ValueError(
            f"press {press_label(spec)!r} takes no swept compression_ratio (it sets its own budget or has none); "
            "accepted: a press, or a wrapped press, whose compression_ratio and target_size are unset"
        )
    path, field = target
    out = _deep_copy(spec)
    holder = out
    for key in path:
        holder = holder[key]
    holder[field] = 1.0 - ratio if field == "budget_fraction" else ratio
    return out


def _deep_copy(spec):
    if isinstance(spec, dict):
        return {k: _deep_copy(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_deep_copy(v) for v in spec]
    return spec


def build_press(spec: Any, seed: int | None = None, where: str = "press") -> BasePress | None:
    """The press described by ``spec`` (a name or a mapping, see the module docstring); ``None`` for ``none``.

    ``seed`` fills the ``seed`` argument of presses that have one and were given none, so runs are reproducible;
    ``where`` names the spec in error messages.
    """
    spec = normalize_press(spec, where)
    return _build(spec, seed, where)


def _build(spec: dict[str, Any], seed: int | None, where: str) -> BasePress | None:
    if spec["name"] == NO_PRESS:
        return None
    cls = PRESSES[spec["name"]]
    kwargs = {k: v for k, v in spec.items() if k not in _RESERVED}
    if _INNER in kwargs:
        kwargs[_INNER] = _build(kwargs[_INNER], seed, f"{where}.press")
    if _INNER_LIST in kwargs:
        kwargs[_INNER_LIST] = [_build(p, seed, f"{where}.presses[{i}]") for i, p in enumerate(kwargs[_INNER_LIST])]
    if "seed" in _fields(cls) and kwargs.get("seed") is None and seed is not None:
        kwargs["seed"] = seed
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} ({spec['name']}): {err}") from None


def press_label(spec: Any) -> str:
    """Short name of a press spec for run directories and tables: its ``label``, else the names of the presses
    (``adakv-snapkv``, ``composed-knorm+tova``)."""
    spec = normalize_press(spec)
    if "label" in spec:
        return spec["label"]
    if _INNER in spec:
        return f"{spec['name']}-{press_label(spec[_INNER])}"
    if _INNER_LIST in spec:
        return f"{spec['name']}-" + "+".join(press_label(p) for p in spec[_INNER_LIST])
    return spec["name"]


# ---- benchmarks -----------------------------------------------------------------------------------------------------
def benchmark_class(name: str) -> type[Benchmark]:
    """The benchmark class registered under ``name``, imported now; ``ValueError`` if unknown or not importable."""
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark: unknown benchmark {name!r}; accepted: {', '.join(BENCHMARKS)}")
    module_name, class_name = BENCHMARKS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"benchmark {name!r} is not available ({module_name} cannot be imported: {err})") from None
    return getattr(module, class_name)


def describe_benchmark(name: str) -> list[str]:
    """Lines describing benchmark ``name``: its options with their defaults (``required`` where there is none), and
    the task names it accepts."""
    cls = benchmark_class(name)
    options = []
    for key, field in cls.Options.model_fields.items():
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        options.append(f"{key}={default}")
    lines = [f"{name:<10} options: {', '.join(options)}"]
    if cls.task_names:
        lines.append(f"{'':<10} tasks: {', '.join(cls.task_names)}")
    return lines


def benchmark_options(name: str, options: dict[str, Any] | None):
    """``options`` validated with benchmark ``name``'s ``Options`` model; ``ValueError`` naming the bad fields."""
    cls = benchmark_class(name)
    try:
        return cls.Options.model_validate(options or {})
    except ValidationError as err:
        raise ValueError(f"benchmark_options ({name}): {validation_message(err)}") from None


def build_benchmark(name: str, options: dict[str, Any] | None) -> Benchmark:
    """Benchmark ``name`` built from its ``options`` mapping (validated; paths are checked, no data is read)."""
    return benchmark_class(name)(benchmark_options(name, options))


def validation_message(err: ValidationError) -> str:
    """A pydantic error on one line: ``field.sub: message; other: message``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    return "; ".join(parts)
