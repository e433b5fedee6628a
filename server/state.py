"""What the app holds between requests: its settings, the engine (None while loading), the metrics, and the
requests it has admitted."""

from __future__ import annotations

from engine.async_llm import AsyncLLM
from server.admission import ERROR, Admission, shutting_down
from server.config import ServerSettings
from server.errors import INTERNAL, ApiError, unavailable
from server.metrics import Metrics


class ServerState:
    def __init__(self, settings: ServerSettings, engine: AsyncLLM | None = None, metrics: Metrics | None = None):
        self.settings, self.metrics = settings, metrics
        self.admission = Admission()
        self._engine: AsyncLLM | None = None
        self.engine = engine

    @property
    def engine(self) -> AsyncLLM | None:
        return self._engine

    @engine.setter
    def engine(self, llm: AsyncLLM | None) -> None:
        """When the engine loop dies, every request the server holds ends with an error at once, those still
        being prepared included."""
        self._engine = llm
        if llm is not None:
            llm.on_death(lambda e: self.admission.interrupt_all_threadsafe(engine_died(), ERROR))

    def ready_engine(self) -> AsyncLLM:
        if self.admission.draining:
            raise shutting_down()
        if self.engine is None:
            raise unavailable("the model is still loading")
        if self.engine.is_dead:
            raise unavailable("the engine has stopped after an internal error; restart the server")
        return self.engine


def engine_died() -> ApiError:
    return ApiError(500, INTERNAL, "internal error: the engine stopped; the server exits so that its supervisor "
                                   "restarts it")
