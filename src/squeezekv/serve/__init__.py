"""``squeezekv serve``: an OpenAI-compatible server whose multi-turn KV is reused across GPU / CPU / disk tiers
(CachedAttention / AttentionStore, Gao et al., USENIX ATC 2024, arXiv 2403.19708)."""

from typing import Any

from .engine import Engine, EngineConfig, GenRequest, QueueFull, RequestRejected
from .metrics import Metrics

__all__ = ["Engine", "EngineConfig", "GenRequest", "QueueFull", "RequestRejected", "Metrics", "create_app"]


def create_app(engine: Engine, **kwargs: Any) -> Any:  # imported lazily: FastAPI is an optional dependency
    """:func:`squeezekv.serve.app.create_app` (``api_keys=``, ``cache_scope=``)."""
    from .app import create_app as _create

    return _create(engine, **kwargs)
