"""Offline API with vLLM's names: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from kunserve.config import EngineConfig
from kunserve.outputs import RequestOutput
from kunserve.runtime.engine import LLMEngine
from kunserve.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Runs a batch of prompts to completion on one in-process instance."""

    def __init__(self, model: str, **engine_args):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_args))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in the order of ``prompts``. Every prompt is validated before any runs, so a
        bad prompt raises ValueError (naming its index) and nothing is half-done."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        for i, prompt in enumerate(prompts):
            try:
                self.engine.validate_prompt(self.engine.tokenize(prompt))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        return self._run_to_completion(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use generate() instead")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run_to_completion(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm or len(ids) < 2)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [finished[i] for i in ids]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return list(prompts)


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; pass one or one per prompt")
    return params
