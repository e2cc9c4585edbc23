"""The keyword under which transformers hands a KV cache to a forward, read and written in one place.

transformers 5.24 renamed the cache argument of model, decoder-layer and attention forwards from ``past_key_values``
to ``cache`` (the old name stays a deprecated alias for a while). Every hook of this library reads the cache through
:func:`find_cache`, and every forward it runs passes the cache through :func:`cache_kwargs`, so both sides follow
whichever name the installed transformers uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import nn
from transformers import Cache

# Newest name first. A cache found under none of them is still found by type (see `find_cache`).
CACHE_KEYWORDS = ("cache", "past_key_values")

_keyword_of_forward: dict[type, str] = {}


def find_cache(arguments: Mapping) -> Cache | None:
    """The :class:`~transformers.Cache` in a forward's keyword arguments or in a model output, else ``None``.

    Looks under the known keywords first, then at every value, so a future rename of the keyword still finds it.
    """
    for name in CACHE_KEYWORDS:
        value = arguments.get(name)
        if isinstance(value, Cache):
            return value
    for value in arguments.values():
        if isinstance(value, Cache):
            return value
    return None


def cache_keyword(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its cache (``"cache"`` or ``"past_key_values"``)."""
    kind = type(model)
    name = _keyword_of_forward.get(kind)
    if name is None:
        parameters = inspect.signature(model.forward).parameters
        found = [n for n in CACHE_KEYWORDS if n in parameters]
        if not found:
            import transformers

            raise TypeError(
                f"{kind.__name__}.forward takes no cache argument (looked for {', '.join(CACHE_KEYWORDS)}; "
                f"transformers {transformers.__version__}); kvpress needs a decoder that takes a transformers Cache"
            )
        name = _keyword_of_forward[kind] = found[0]
    return name


def cache_kwargs(model: nn.Module, cache: Cache | None) -> dict:
    """``{keyword: cache}`` to pass to ``model(...)`` under the name its forward expects (no deprecation warning)."""
    return {cache_keyword(model): cache}
