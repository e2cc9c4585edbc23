"""Presses: one compression method per file."""

from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.attention_eviction_press import AttentionEvictionPress
from kvpress.presses.base_press import BasePress
from kvpress.presses.block_press import BlockPress
from kvpress.presses.cam_press import CAMPress
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.chunk_press import ChunkPress
from kvpress.presses.chunkkv_press import ChunkKVPress
from kvpress.presses.compactor_press import CompactorPress
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.critical_adakv_press import CriticalAdaKVPress
from kvpress.presses.criticalkv_press import CriticalKVPress
from kvpress.presses.cross_layer_press import CrossLayerPress
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
from kvpress.presses.report import CompressionReport
from kvpress.presses.scissorhands_press import ScissorhandsPress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress
from kvpress.presses.simlayerkv_press import SimLayerKVPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.streaming_llm_press import StreamingLLMPress
from kvpress.presses.think_press import ThinKPress
from kvpress.presses.tova_press import TOVAPress

__all__ = [
    "QFilterPress",
    "SimLayerKVPress",
    "BlockPress",
    "ChunkKVPress",
    "CriticalAdaKVPress",
    "CriticalKVPress",
    "CrossLayerPress",
    "CURPress",
    "AdaKVPress",
    "AttentionEvictionPress",
    "BasePress",
    "CAMPress",
    "Capabilities",
    "ChunkPress",
    "CompactorPress",
    "ComposedPress",
    "CompressionReport",
    "DecodingPress",
    "DuoAttentionPress",
    "ExpectedAttentionPress",
    "FinchPress",
    "H2OPress",
    "HeadKVPress",
    "KeyDiffPress",
    "KeyRerotationPress",
    "KnormPress",
    "KVComposePress",
    "KVzipPress",
    "LagKVPress",
    "LeverageScorePress",
    "MemoryBudgetPress",
    "MiniCachePress",
    "NACLPress",
    "NonCausalAttnPress",
    "ObservedAttentionPress",
    "PerLayerCompressionPress",
    "PrefillDecodingPress",
    "PyramidKVPress",
    "QuestPress",
    "RandomPress",
    "ScissorhandsPress",
    "ScorerPress",
    "ScorerWrapperPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "TOVAPress",
    "ThinKPress",
]
