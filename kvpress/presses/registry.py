"""The press names every command and config file accepts (``python -m kvpress``, ``kvpress-eval``, YAML configs).

One name per press. :func:`press_parameters` lists what each press takes, with its default, so a command can show
it (``kvpress-eval --list``) instead of leaving it to error messages.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.base_press import BasePress
from kvpress.presses.block_press import BlockPress
from kvpress.presses.cam_press import CAMPress
from kvpress.presses.chunk_press import ChunkPress
from kvpress.presses.chunkkv_press import ChunkKVPress
from kvpress.presses.compactor_press import CompactorPress
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.critical_adakv_press import CriticalAdaKVPress
from kvpress.presses.criticalkv_press import CriticalKVPress
from kvpress.presses.cur_press import CURPress
from kvpress.presses.decoding_press import DecodingPress
from kvpress.presses.duo_attention_press import DuoAttentionPress
from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.presses.finch_press import FinchPress
from kvpress.presses.h2o_press import H2OPress
from kvpress.presses.headkv_press import HeadKVPress
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.presses.keydiff_press import KeyDiffPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.kvcompose_press import KVComposePress
from kvpress.presses.kvzip_press import KVzipPress
from kvpress.presses.lagkv_press import LagKVPress
from kvpress.presses.leverage_score_press import LeverageScorePress
from kvpress.presses.memory_budget_press import MemoryBudgetPress
from kvpress.presses.minicache_press import MiniCachePress
from kvpress.presses.nacl_press import NACLPress
from kvpress.presses.non_causal_attn_press import NonCausalAttnPress
from kvpress.presses.observed_attention_press import ObservedAttentionPress
from kvpress.presses.per_layer_compression_press import PerLayerCompressionPress
from kvpress.presses.prefill_decoding_press import PrefillDecodingPress
from kvpress.presses.pyramidkv_press import PyramidKVPress
from kvpress.presses.qfilter_press import QFilterPress
from kvpress.presses.quest_press import QuestPress
from kvpress.presses.random_press import RandomPress
from kvpress.presses.scissorhands_press import ScissorhandsPress
from kvpress.presses.simlayerkv_press import SimLayerKVPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.streaming_llm_press import StreamingLLMPress
from kvpress.presses.think_press import ThinKPress
from kvpress.presses.tova_press import TOVAPress

PRESSES: dict[str, type[BasePress]] = {
    "random": RandomPress,
    "knorm": KnormPress,
    "streaming_llm": StreamingLLMPress,
    "snapkv": SnapKVPress,
    "observed_attention": ObservedAttentionPress,
    "tova": TOVAPress,
    "expected_attention": ExpectedAttentionPress,
    "pyramidkv": PyramidKVPress,
    "think": ThinKPress,
    "nacl": NACLPress,
    "keydiff": KeyDiffPress,
    "lagkv": LagKVPress,
    "leverage_score": LeverageScorePress,
    "non_causal_attn": NonCausalAttnPress,
    "compactor": CompactorPress,
    "cur": CURPress,
    "qfilter": QFilterPress,
    "kvcompose": KVComposePress,
    "kvzip": KVzipPress,
    "duo_attention": DuoAttentionPress,
    "finch": FinchPress,
    "minicache": MiniCachePress,
    "adakv": AdaKVPress,
    "criticalkv": CriticalKVPress,
    "critical_adakv": CriticalAdaKVPress,
    "headkv": HeadKVPress,
    "composed": ComposedPress,
    "per_layer": PerLayerCompressionPress,
    "key_rerotation": KeyRerotationPress,
    "chunk": ChunkPress,
    "chunkkv": ChunkKVPress,
    "simlayerkv": SimLayerKVPress,
    "block": BlockPress,
    "memory_budget": MemoryBudgetPress,
    "decoding": DecodingPress,
    "prefill_decoding": PrefillDecodingPress,
    "h2o": H2OPress,
    "scissorhands": ScissorhandsPress,
    "cam": CAMPress,
    "quest": QuestPress,
}

REQUIRED = inspect.Parameter.empty  # the default of a parameter that has none


def press_class(name: str) -> type[BasePress]:
    """The press registered under ``name``; ``ValueError`` naming the accepted names otherwise."""
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; accepted: {', '.join(PRESSES)}")
    return PRESSES[name]


def press_name(press: BasePress | type[BasePress]) -> str:
    """The registry name of a press (or press class)."""
    cls = press if isinstance(press, type) else type(press)
    for name, registered in PRESSES.items():
        if registered is cls:
            return name
    raise ValueError(f"{cls.__name__} is not a registered press; registered: {', '.join(PRESSES)}")


def press_parameters(name: str) -> dict[str, Any]:
    """``{parameter: default}`` of press ``name``'s constructor, in order; :data:`REQUIRED` for a required one."""
    out = {}
    for field in dataclasses.fields(press_class(name)):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            out[field.name] = field.default_factory()
        else:
            out[field.name] = REQUIRED
    return out


def describe_press(name: str) -> str:
    """One line: ``name  Class(param=default, ...): summary`` (required parameters without ``=``)."""
    cls = press_class(name)
    params = ", ".join(p if d is REQUIRED else f"{p}={d!r}" for p, d in press_parameters(name).items())
    paragraph = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
    summary = paragraph.split(". ")[0].rstrip(".")
    return f"{name:<20} {cls.__name__}({params}): {summary}"
