"""What the app holds between requests: its settings, the engine (None while loading), the metrics."""

from __future__ import annotations

from dataclasses import dataclass

from engine.async_llm import AsyncLLM
from server.config import ServerSettings
from server.errors import unavailable
from server.metrics import Metrics


@dataclass
class ServerState:
    settings: ServerSettings
    engine: AsyncLLM | None = None
    metrics: Metrics | None = None

    def ready_engine(self) -> AsyncLLM:
        if self.engine is None:
            raise unavailable("the model is still loading")
        if self.engine.is_dead:
            raise unavailable("the engine has stopped after an internal error; restart the server")
        return self.engine
