"""``AsyncEngine``: an in-process ``EngineClient`` that steps one ``LLMEngine`` in a thread.

asyncio callers and the engine thread meet in two places only: a locked inbox of commands
(add / abort) that wakes the thread through a condition variable, and per-request streams fed
with ``loop.call_soon_threadsafe``. The engine itself is never touched from the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from typing import AsyncIterator

import attrs

from kunserve.config import EngineConfig
from kunserve.outputs import RequestOutput
from kunserve.runtime.engine import LLMEngine
from kunserve.sampling_params import SamplingParams
from kunserve.serving.protocol import EngineUnavailableError, check_context_length

log = logging.getLogger(__name__)

_ABORT_STEPS = 3  # steps a shutting-down engine gets to hand back abort outputs
_BACKGROUND_STEP_S = 0.01  # pace of steps with no request in flight (drop groups moving data or idling to restore)


class _Stream:
    """The asyncio side of one request: holds the newest undelivered output (or an error).

    Invariant: touched only on its event loop's thread. A finished output or an error is never
    overwritten, so the end of a request always reaches the consumer; intermediate outputs may
    merge when the consumer lags (each carries the full text and token ids so far).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._item: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(self._item, BaseException) or (
            isinstance(self._item, RequestOutput) and self._item.finished
        ):
            return
        self._item = item
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        self._ready.clear()
        item, self._item = self._item, None
        if isinstance(item, BaseException):
            raise item
        return item


@attrs.frozen
class _Add:
    """Inbox command: start a request already validated in the caller."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    stream: _Stream
    arrival_time: float


@attrs.frozen
class _Abort:
    """Inbox command: abort a request; unknown or finished ids are ignored."""

    request_id: str


class AsyncEngine:
    """Drives one ``LLMEngine`` (or an engine-like ``ClusterDriver``: same add_request / step /
    abort_request / snapshot surface) from a dedicated thread for asyncio callers.

    Invariants: only the engine thread calls the engine's mutating methods (``add_request``,
    ``step``, ``abort_request``); ``tokenize`` / ``validate_prompt`` are read-only and run in
    the caller. Every request accepted by ``generate`` gets exactly one end: a finished output
    or an exception — also on abort, shutdown, or a crashed step. The thread sleeps on a
    condition variable when it has nothing to do.
    """

    def __init__(self, engine: LLMEngine, drain_timeout: float = 0.0):
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort] = []
        self._accepting = True  # guarded by _cond
        self._stop_at: float | None = None  # guarded by _cond: abort what is left after this
        self._error: BaseException | None = None
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._outbox: list[tuple[_Stream, RequestOutput | BaseException]] = []  # engine thread only
        self._finished = Counter({"stop": 0, "length": 0, "abort": 0, "error": 0})
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._stats: dict = {}
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="kunserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, **kwargs) -> "AsyncEngine":
        return cls(LLMEngine(config), **kwargs)

    # -- EngineClient -------------------------------------------------------------------------
    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, the last with ``finished=True``; raises ValueError for bad
        input before anything is queued. Closing the iterator early aborts the request."""
        token_ids = self._validate(prompt, params)
        stream = _Stream(asyncio.get_running_loop())
        self._submit(_Add(request_id, token_ids, params, stream, time.time()))
        ended = False  # True once the engine side is done with this request
        try:
            while not ended:
                try:
                    output = await stream.get()
                except Exception:
                    ended = True  # errors come only for requests the engine no longer holds
                    raise
                ended = output.finished
                yield output
        finally:
            if not ended:  # the consumer left (disconnect, cancel): free the request's blocks
                self._submit_abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._submit_abort(request_id)

    def metrics_snapshot(self) -> dict:
        return self._stats  # replaced whole by the engine thread, never mutated: safe to share

    def is_healthy(self) -> bool:
        return self._error is None and self._accepting and self._thread.is_alive()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Refuse new requests; let in-flight ones run up to ``drain_timeout`` seconds (default:
        the constructor's), then abort the rest (each gets a finish_reason "abort" output)."""
        drain = self.drain_timeout if drain_timeout is None else drain_timeout
        with self._cond:
            self._accepting = False
            if self._stop_at is None:
                self._stop_at = time.monotonic() + drain
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    # -- caller side --------------------------------------------------------------------------
    def _validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        token_ids = self.engine.tokenize(prompt)
        self.engine.validate_prompt(token_ids)
        check_context_length(len(token_ids), params.max_tokens, self.max_model_len)
        return token_ids

    def _submit(self, command: _Add) -> None:
        with self._cond:
            if not self._accepting:
                reason = f"engine failed: {self._error}" if self._error else "engine is shutting down"
                raise EngineUnavailableError(reason)
            self._inbox.append(command)
            self._cond.notify()

    def _submit_abort(self, request_id: str) -> None:
        with self._cond:
            self._inbox.append(_Abort(request_id))
            self._cond.notify()

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException as e:  # a crashed step must not leave clients waiting forever
            log.exception("engine step failed; failing all requests")
            self._die(e)

    def _iterate(self) -> bool:
        """Apply queued commands, then step once; False when the thread should exit."""
        with self._cond:
            while (not self._inbox and self._stop_at is None and not self.engine.has_unfinished_requests()
                   and not self._background_work()):
                self._cond.wait()
            commands, self._inbox = self._inbox, []
            stop_at = self._stop_at
        for command in commands:
            self._apply(command)
        if stop_at is not None and (time.monotonic() >= stop_at or not self.engine.has_unfinished_requests()):
            self._abort_all()
            self._flush()
            return False
        if self.engine.has_unfinished_requests():
            self._dispatch(self.engine.step())
        elif self._background_work():
            time.sleep(_BACKGROUND_STEP_S)  # idle but for regrouping: do not spin every rank
            self._dispatch(self.engine.step())
        self._flush()
        return True

    def _background_work(self) -> bool:
        """A cluster with drop groups steps without requests too (their KV / weights move in
        rounds, and they are restored once idle long enough)."""
        check = getattr(self.engine, "has_background_work", None)
        return bool(check and check())

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            output = self.engine.abort_request(command.request_id)
            if output is not None:
                self._dispatch([output])
            return
        if command.request_id in self._streams:
            self._outbox.append((command.stream, ValueError(f"request id {command.request_id!r} is already in use")))
            return
        try:
            self.engine.add_request(command.token_ids, command.params, command.request_id, command.arrival_time)
        except ValueError as e:  # e.g. an id the engine still holds; the request never started
            self._outbox.append((command.stream, e))
            return
        self._streams[command.request_id] = command.stream
        self._prompt_tokens += len(command.token_ids)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
                self._finished[output.outputs[0].finish_reason or "abort"] += 1
                self._generation_tokens += len(output.outputs[0].token_ids)
            if stream is not None:
                self._outbox.append((stream, output))

    def _flush(self) -> None:
        """Publish stats, then deliver: a caller holding an output sees stats at least as new."""
        try:
            self._publish_stats()
        except Exception:  # stats must never keep outputs (or errors) from their callers
            log.exception("publishing engine stats failed")
        outbox, self._outbox = self._outbox, []
        for stream, item in outbox:
            try:
                stream.loop.call_soon_threadsafe(stream.put, item)
            except RuntimeError:  # the caller's loop is closed: nobody will read this request
                if isinstance(item, RequestOutput) and not item.finished:
                    self._submit_abort(item.request_id)

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            output = self.engine.abort_request(request_id)
            if output is not None:
                self._dispatch([output])
        # a cluster driver returns remote abort outputs from its next steps
        for _ in range(_ABORT_STEPS):
            if not (self._streams and self.engine.has_unfinished_requests()):
                break
            self._dispatch(self.engine.step())
        for request_id in list(self._streams):  # still no end: say so rather than go silent
            self._finished["error"] += 1
            self._outbox.append((self._streams.pop(request_id), EngineUnavailableError("engine is shutting down")))

    def _die(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._accepting = False
            pending, self._inbox = self._inbox, []
        streams = [c.stream for c in pending if isinstance(c, _Add)] + list(self._streams.values())
        self._streams.clear()
        self._finished["error"] += len(streams)
        failure = EngineUnavailableError(f"engine failed: {error!r}")
        self._outbox.extend((stream, failure) for stream in streams)
        self._flush()

    def _publish_stats(self) -> None:
        snap = self.engine.snapshot()  # LLMEngine: one InstanceSnapshot; ClusterDriver: all of them
        instances = {
            str(i.instance_id): {
                "requests_running": i.num_running,
                "requests_waiting": i.num_waiting,
                "kv_cache_usage": i.kv_usage,
                "kv_cache_free_blocks": i.num_free_blocks,
                "kv_cache_total_blocks": i.num_blocks,
                "memory_demand_blocks": i.memory_demand_blocks,
                "queued_blocks": i.queued_blocks,
                "preemptions_total": i.num_preemptions,
                "swap_preemptions_total": i.num_swap_preemptions,
                "recompute_fallbacks_total": i.num_recompute_fallbacks,
                "prefill_chunks_continued_total": i.num_continued_prefill_chunks,
                "swapped_out_bytes_total": i.swapped_out_bytes,
                "swapped_in_bytes_total": i.swapped_in_bytes,
            }
            for i in getattr(snap, "instances", (snap,))
        }
        stats = {
            "instances": instances,
            "requests_total": dict(self._finished),
            "prompt_tokens_total": self._prompt_tokens,
            "generation_tokens_total": self._generation_tokens,
        }
        extra = getattr(self.engine, "extra_metrics", None)
        if callable(extra):  # hook for the cluster's counters (drops, restores, failed steps)
            stats.update(extra())
        self._stats = stats
