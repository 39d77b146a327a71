"""``squeezekv serve``: an OpenAI-compatible server whose multi-turn KV is reused across GPU / CPU / disk tiers
(CachedAttention / AttentionStore, Gao et al., USENIX ATC 2024, arXiv 2403.19708)."""

from .engine import Engine, EngineConfig, GenRequest, QueueFull
from .metrics import Metrics

__all__ = ["Engine", "EngineConfig", "GenRequest", "QueueFull", "Metrics", "create_app"]


def create_app(engine: Engine):  # imported lazily: FastAPI is an optional dependency (extra "serve")
    from .app import create_app as _create

    return _create(engine)
