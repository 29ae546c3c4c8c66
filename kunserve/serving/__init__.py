"""Online serving: the ``EngineClient`` protocol, an in-process async engine, the OpenAI-compatible
HTTP server and Prometheus metrics. FastAPI / uvicorn are imported only by ``api_server``."""

from kunserve.serving.async_engine import AsyncEngine
from kunserve.serving.protocol import EngineClient, EngineUnavailableError

__all__ = ["AsyncEngine", "EngineClient", "EngineUnavailableError"]
