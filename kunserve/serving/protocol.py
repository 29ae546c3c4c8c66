"""What the HTTP server needs from an engine (``EngineClient``) and the OpenAI wire shapes.

The protocol is transport-free on purpose: the in-process ``AsyncEngine`` and the cluster's
front door (which forwards to ranks) both implement it, and the server never knows which.
Request bodies are pydantic models (FastAPI validates them); responses and stream chunks are
plain dicts built here, so their shapes live in one place.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from kunserve.models import ModelConfig
from kunserve.outputs import RequestOutput
from kunserve.sampling_params import SamplingParams


class EngineUnavailableError(RuntimeError):
    """The engine cannot take requests (shutting down, or dead after a failed step)."""


@runtime_checkable
class EngineClient(Protocol):
    """An engine as the HTTP server sees it.

    Invariants: ``generate`` raises ValueError for bad input (or EngineUnavailableError) before
    yielding anything; once it has yielded, it ends with exactly one output whose ``finished``
    is True (finish_reason "stop", "length" or "abort") or raises; no request is silently lost.
    Outputs carry the full text and token ids so far, so a lagging consumer may see merged steps.
    """

    model_config: ModelConfig
    max_model_len: int
    tokenizer: Any  # None when the model has no tokenizer: token-id prompts only

    def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def metrics_snapshot(self) -> dict:
        """``{"instances": {id: {name: number}}, name: number, name: {label_value: number}}``;
        rendered by ``kunserve.serving.metrics.render_metrics``."""
        ...

    def is_healthy(self) -> bool: ...

    async def shutdown(self) -> None: ...


# -- context-length checks shared by the server and the engines ---------------------------------
def check_context_length(
    prompt_tokens: int, max_tokens: int | None, max_model_len: int, what: str = "prompt"
) -> None:
    """Raise ValueError (OpenAI's wording) when prompt + completion cannot fit the context."""
    if prompt_tokens >= max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{what} resulted in {prompt_tokens} tokens, which leaves no room for a completion. "
            f"Please reduce the length of the {what}."
        )
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, "
            f"{max_tokens} in the completion). Please reduce the length of the {what} or completion."
        )


# -- request bodies -------------------------------------------------------------------------------
class _Body(BaseModel):
    """Base of request bodies. Invariant: a constructed body has exactly the declared types."""

    # strict: "5" is not an int and true is not 1 (OpenAI rejects both); unknown fields such as
    # ``user`` or ``presence_penalty`` are ignored like vLLM does.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    """OpenAI ``stream_options``; ``include_usage`` adds a final chunk with ``usage``."""

    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by both endpoints; ``None`` means the OpenAI default (applied in
    ``sampling_params``), so SamplingParams stays the one place that range-checks values."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """Raises ValueError (SamplingParams' message) for out-of-range values."""
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            seed=self.seed, max_tokens=max_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids or (), ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt`` may be a batch of one (``["text"]``, ``[[ids]]``)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a feature this server does not implement, else None."""
        if self.logprobs:
            return "logprobs", "logprobs are not supported by this server"
        if self.echo:
            return "echo", "echo is not supported by this server"
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                return "prompt", "batched prompts are not supported; send one request per prompt"
        return None

    def single_prompt(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return self.prompt[0]
        return self.prompt


class ContentPart(_Body):
    """One part of a multi-part message content; only ``type == "text"`` is served."""

    type: str
    text: str | None = None


class ChatMessage(_Body):
    """One chat message; extra keys (name, tool_calls) are ignored by the chat template input."""

    role: str
    content: str | list[ContentPart] | None = None

    def as_template_dict(self) -> dict:
        """Text parts joined; other part types are refused (this server has no vision input)."""
        content = self.content
        if isinstance(content, list):
            bad = [p.type for p in content if p.type != "text"]
            if bad:
                raise ValueError(f"message content part type {bad[0]!r} is not supported; use 'text'")
            content = "".join(p.text or "" for p in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``; at least one message."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False

    def requested_max_tokens(self) -> int | None:
        # the newer OpenAI name wins, as in OpenAI's own API
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs are not supported by this server"
        return None


# -- validation messages -----------------------------------------------------------------------
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(error: dict) -> list[str]:
    """Location without "body" and pydantic's union-branch tags such as 'str' or 'list[int]'."""
    parts = [str(p) for p in error.get("loc", ()) if p != "body"]
    return [p for p in parts if "[" not in p and p not in _TYPE_TAGS]


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic / FastAPI validation errors of a request body."""
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        return f"the request body is not valid JSON: {bad_json[0].get('ctx', {}).get('error', '')}", None
    path = _field_path(errors[0])
    if not path:
        return "the request body must be a JSON object (Content-Type: application/json)", None
    where = ".".join(path)
    if errors[0].get("type") == "missing":
        return f"missing required field '{where}'", path[0]
    same = dict.fromkeys(e.get("msg", "invalid value") for e in errors if _field_path(e) == path)
    return f"'{where}': {'; or '.join(same)}", path[0]


# -- responses ------------------------------------------------------------------------------------
Kind = Literal["completion", "chat"]


def new_request_id(kind: Kind) -> str:
    return f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"


def error_body(message: str, err_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def usage(output: RequestOutput) -> dict:
    prompt = len(output.prompt_token_ids)
    completion = len(output.outputs[0].token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _header(kind: Kind, request_id: str, model: str, created: int, chunk: bool) -> dict:
    obj = {"completion": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}
    return {"id": request_id, "object": obj[kind], "created": created, "model": model}


def full_response(kind: Kind, request_id: str, model: str, created: int, output: RequestOutput) -> dict:
    out = output.outputs[0]
    choice: dict = {"index": 0, "logprobs": None, "finish_reason": out.finish_reason,
                    "stop_reason": out.stop_reason}
    if kind == "completion":
        choice["text"] = out.text
    else:
        choice["message"] = {"role": "assistant", "content": out.text}
    return {**_header(kind, request_id, model, created, False), "choices": [choice], "usage": usage(output)}


def stream_chunk(
    kind: Kind, request_id: str, model: str, created: int, text: str | None,
    finish_reason: str | None = None, role: bool = False,
) -> dict:
    """One SSE chunk; chat chunks carry ``delta`` (``role`` only in the first one)."""
    choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
    if kind == "completion":
        choice["text"] = text or ""
    else:
        delta: dict = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    return {**_header(kind, request_id, model, created, True), "choices": [choice]}


def usage_chunk(kind: Kind, request_id: str, model: str, created: int, output: RequestOutput) -> dict:
    return {**_header(kind, request_id, model, created, True), "choices": [], "usage": usage(output)}


def now() -> int:
    return int(time.time())


class TextDeltas:
    """Turns successive full texts into deltas.

    Invariant: the concatenation of everything ``next`` returned equals the text it last saw
    (for ``final=True``, the final text). A trailing U+FFFD (an incomplete UTF-8 character from
    byte-level BPE) and, when stop strings are set, the last ``len(longest stop) - 1`` characters
    (which a stop string may still cut off) are held back until the text grows past them.
    """

    def __init__(self, stop: tuple[str, ...] = ()):
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._sent = 0

    def next(self, text: str, final: bool) -> str:
        if not final:
            text = text.rstrip("\ufffd")
            text = text[: max(0, len(text) - self._hold)]
        if len(text) <= self._sent:
            return ""
        delta, self._sent = text[self._sent:], len(text)
        return delta
