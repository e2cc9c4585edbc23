"""Run this folder's tests through the Triton kernels: the CPU interpreter here, compiled kernels on a GPU machine.

Triton decides between compiling and interpreting when ``@triton.jit`` runs: for our kernels when
``kvpress_kernels`` is imported, and for Triton's own jitted helpers (``tl.sum``, ``tl.max``, ``tl.cumsum``, ...)
when ``triton.language`` is imported. ``tests/conftest.py`` imports ``kvpress`` - hence ``triton`` and
``kvpress_kernels`` - before this file runs, so setting ``TRITON_INTERPRET`` here would come too late. When that
happened, this file re-executes ``triton.language.standard`` and our kernel modules once (``importlib.reload``
re-runs a module in its existing namespace, so functions that other packages imported from it pick up the
interpreted kernels; its classes are put back, so they keep their identity) and rebinds the ``triton.language`` names that came from ``standard``. On a CPU-only machine
nothing is ever compiled, so no compiled Triton code is affected. If the session's first import of triton already
saw ``TRITON_INTERPRET=1`` (e.g. it is exported in the shell), nothing is reloaded.

``KVPRESS_FORCE_TRITON=1`` (route CPU tensors to the kernels) is set only while this folder's test modules run, so
other test folders keep the torch references.
"""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_KERNEL_MODULES = (
    "compaction",
    "append",
    "varlen_attention",
    "quantization",
    "quantized_segments",
    "quantized_attention",
    "merged_attention",
    "decomposed_segments",
    "decomposed_attention",
    "paged_kv",
    "page_selection",
    "page_attention",
    "block_sparse_attention",
)


def _reload_if_compiled() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in sys.modules:
        return  # triton not imported yet: it will read TRITON_INTERPRET itself
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.sum, InterpretedFunction):
        before = dict(vars(tl.standard))
        importlib.reload(tl.standard)
        for name, obj in list(vars(tl).items()):
            if name in before and obj is before[name]:
                setattr(tl, name, getattr(tl.standard, name))
    kernels = sys.modules.get("kvpress_kernels.compaction")
    if kernels is not None and not isinstance(kernels._compact_kernel, InterpretedFunction):
        for name in _KERNEL_MODULES:
            module = sys.modules[f"kvpress_kernels.{name}"]
            classes = {k: v for k, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__}
            importlib.reload(module)
            # Keep the classes (e.g. QuantizedSegments) that other packages already imported: a reload would make
            # new ones, and objects built by those packages would then fail isinstance checks in the kernels.
            vars(module).update(classes)
        importlib.reload(sys.modules["kvpress_kernels"])


_reload_if_compiled()


@pytest.fixture(autouse=True, scope="module")
def _force_triton():
    previous = os.environ.get("KVPRESS_FORCE_TRITON")
    os.environ["KVPRESS_FORCE_TRITON"] = "1"
    yield
    if previous is None:
        os.environ.pop("KVPRESS_FORCE_TRITON", None)
    else:
        os.environ["KVPRESS_FORCE_TRITON"] = previous
