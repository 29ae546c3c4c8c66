"""One serving instance: model + paged KV cache + scheduler, stepped by its owner.

A request flows: ``add_request`` (validate, tokenize) → scheduler waiting queue → ``step()``
(schedule → model runner forward + sample → scheduler update → detokenize / stop strings) →
``RequestOutput`` objects for every request that produced a token or finished.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import attrs
import torch

from kunserve.config import EngineConfig
from kunserve.models import ModelConfig, build_model, load_dummy, load_safetensors, parse_dtype, resolve_model_dir
from kunserve.outputs import CompletionOutput, RequestOutput
from kunserve.policy.preemption import SwapPreemption
from kunserve.policy.snapshot import InstanceSnapshot
from kunserve.runtime.instance_memory import InstanceMemory, vmm_available
from kunserve.runtime.kv_cache import kv_block_bytes
from kunserve.runtime.model_runner import ModelRunner
from kunserve.runtime.request import Request, RequestStatus
from kunserve.runtime.scheduler import Scheduler
from kunserve.runtime.swap import HostSwapSpace, Swapper
from kunserve.sampling_params import SamplingParams
from kunserve.tokenizer import IncrementalDetokenizer, find_stop_string, load_tokenizer

log = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 1 << 30
_GPU_MEMORY_UTILIZATION = 0.92  # of the device's total memory; the rest is left for others
_GPU_GRAPH_RESERVE_BYTES = 512 << 20  # decode CUDA graphs' private pool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    dtype = model_dtype if name == "auto" else parse_dtype(name)
    if name == "auto" and dtype == torch.float16 and device.type == "cpu":
        log.warning("checkpoint is float16, which is ~100x slower on CPU; using bfloat16 instead")
        dtype = torch.bfloat16
    return dtype


class LLMEngine:
    """A single instance holding all layers of one model.

    Invariant: every request id in the scheduler is also in ``self.requests`` until it
    finishes and its final output is returned by ``step``.
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_dir = resolve_model_dir(config.model)
        model_config = ModelConfig.from_dir(self.model_dir)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, model_config.dtype, self.device)
        self.model_config = attrs.evolve(model_config, dtype=self.dtype)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        with torch.device("meta"):
            self.model = build_model(self.model_config, config.layer_range)
        self.tokenizer = load_tokenizer(Path(config.tokenizer) if config.tokenizer else self.model_dir)
        self.eos_token_ids = self._eos_token_ids()
        num_blocks = self._num_kv_blocks()
        self.memory = InstanceMemory(
            self.model, self.model_config.num_kv_heads, self.model_config.head_dim, self.dtype,
            self.device, config.block_size, num_blocks, use_vmm=self._use_vmm(),
        )
        self._load_weights(self.memory.allocator)
        self.kv_cache, self.block_manager = self.memory.kv_cache, self.memory.block_manager
        self.swapper: Swapper | None = None  # set by _make_scheduler under swap preemption
        self.scheduler = self._make_scheduler()
        self.runner = self.make_runner()
        self.requests: dict[str, Request] = {}
        self._next_virtual_engine = 0  # overlapped pipeline leaders step request sets in turn
        self._text_len: dict[str, int] = {}  # output characters already searched for stop strings
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}  # output text, a few tokens per step
        self._ids = itertools.count()
        log.info(
            "engine ready: %s on %s (%s), %d KV blocks x %d tokens, max_model_len %d",
            self.model_config.architecture, self.device, self.dtype, num_blocks, config.block_size,
            self.max_model_len,
        )

    # -- construction ------------------------------------------------------------------------
    def _use_vmm(self) -> bool:
        memory = self.config.memory
        if memory == "auto":
            if not vmm_available(self.device):
                log.warning("cuda-bindings is not installed: weights cannot be dropped "
                            "(pip install cuda-bindings to enable the unified allocator)")
            return vmm_available(self.device)
        return memory == "vmm"

    def _load_weights(self, allocate) -> None:
        """(Re)fill the model's parameters; ``allocate`` places them (None: plain tensors)."""
        if self.config.load_format == "dummy":
            load_dummy(self.model, self.dtype, self.device, seed=self.config.seed, allocate=allocate)
        else:
            load_safetensors(self.model, self.model_dir, self.dtype, self.device, allocate=allocate)
        self.model.eval()

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        block_bytes = kv_block_bytes(
            len(self.model.layer_ids), cfg.block_size, self.model_config.num_kv_heads,
            self.model_config.head_dim, self.dtype,
        )
        blocks_for_max_len = -(-self.max_model_len // cfg.block_size)
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        else:
            num_blocks = min(self._kv_budget_bytes() // block_bytes, cfg.max_num_seqs * blocks_for_max_len)
        if num_blocks < blocks_for_max_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {cfg.block_size} = "
                f"{num_blocks * cfg.block_size} tokens, fewer than max_model_len "
                f"({self.max_model_len}); lower max_model_len or give the KV cache more memory "
                f"(num_kv_blocks / kv_cache_memory_bytes)"
            )
        return num_blocks

    def _kv_budget_bytes(self) -> int:
        if self.config.kv_cache_memory_bytes is not None:
            return self.config.kv_cache_memory_bytes
        if self.device.type == "cuda":
            return self._profiled_cuda_kv_budget()
        return _CPU_DEFAULT_KV_BYTES

    def _profiled_cuda_kv_budget(self) -> int:
        """What is free after the weights, the peak activation of a profiled forward of
        ``max_num_batched_tokens`` tokens, the CUDA-graph reserve and the utilisation margin
        (vLLM's method). Runs before the weights are loaded, so it profiles a one-layer copy."""
        from kunserve.runtime.memory_profile import peak_activation_bytes

        cfg = self.config
        activation = peak_activation_bytes(
            self.model_config, self.dtype, self.device, cfg.max_num_batched_tokens, cfg.block_size,
            self.max_model_len, cfg.max_num_seqs)
        free, total = torch.cuda.mem_get_info(self.device)
        weights = sum(p.numel() for p in self.model.parameters()) * self.dtype.itemsize
        graphs = 0 if cfg.enforce_eager else _GPU_GRAPH_RESERVE_BYTES
        budget = free - int((1 - _GPU_MEMORY_UTILIZATION) * total) - weights - activation - graphs
        log.info("CUDA memory: %.2f GiB free, weights %.2f GiB, peak activation %.2f GiB -> KV %.2f GiB",
                 free / 2**30, weights / 2**30, activation / 2**30, budget / 2**30)
        return max(budget, 0)

    def _make_scheduler(self) -> Scheduler:
        cfg = self.config
        if cfg.preemption_mode == "recompute":
            return Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        block_bytes = self.memory.block_bytes
        num_host_blocks = cfg.swap_space_bytes // block_bytes
        if num_host_blocks == 0:
            log.warning("swap_space_bytes %d holds no KV block of %d bytes: every preemption recomputes",
                        cfg.swap_space_bytes, block_bytes)
        # [host blocks, layers, 2, block_size, kv_heads, head_dim], pinned for async copies on CUDA
        space = HostSwapSpace(num_host_blocks, self.kv_cache.storage.shape[1:], self.dtype,
                              pin_memory=self.device.type == "cuda")
        self.swapper = Swapper(space, self.device)
        return Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                         preemption=SwapPreemption(block_bytes, cfg.swap_bytes_per_step), host_pool=space.pool)

    def make_runner(self) -> ModelRunner:
        """A runner for the current model and KV cache (rebuilt when a group splits back)."""
        cfg = self.config
        return ModelRunner(self.model, self.kv_cache, self.block_manager, self.device, cfg.seed,
                           enforce_eager=cfg.enforce_eager, max_num_seqs=cfg.max_num_seqs,
                           max_model_len=self.max_model_len, weight_placement=self.memory.placement)

    # -- weights <-> KV cache ----------------------------------------------------------------
    def drop_weights(self, units) -> int:
        """Turn weight units this instance does not execute into KV blocks; new block count."""
        return self.memory.drop_units(units)

    def restore_weights(self, units, reload=None) -> int:
        """Take weight units back from the KV cache; ``reload(allocate)`` refills them (default:
        reload this model's parameters from the checkpoint)."""
        reload = reload or self._load_weights
        return self.memory.restore_units(units, self.scheduler.preempt_newest, reload)

    # -- requests ----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"{self.model_dir} has no tokenizer, so prompts must be token-id lists"
                )
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate_prompt(self, token_ids: list[int]) -> None:
        """Raise ValueError if a prompt can never be served; the engine state is untouched."""
        if not token_ids:
            raise ValueError("the prompt is empty; send at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len}; "
                f"shorten the prompt to at most {self.max_model_len - 1} tokens"
            )

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        params = params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenize(prompt)
        self.validate_prompt(token_ids)
        limit = self.max_model_len
        if params.max_tokens is not None:
            limit = min(limit, len(token_ids) + params.max_tokens)
        request = Request(
            request_id, token_ids, params, limit, self.eos_token_ids,
            prompt=prompt if isinstance(prompt, str) else None, arrival_time=arrival_time,
        )
        self.adopt_request(request)
        self.scheduler.add(request)
        return request_id

    def adopt_request(self, request: Request, text_len: int = 0) -> None:
        """Track ``request`` (new, or handed over by a merge, split or migration); its stop
        strings were searched up to ``text_len`` characters."""
        self.requests[request.request_id] = request
        self._text_len[request.request_id] = text_len

    def stop_search_offset(self, request_id: str) -> int:
        """Output characters of the request already searched for stop strings."""
        return self._text_len.get(request_id, 0)

    def forget_request(self, request_id: str) -> Request | None:
        """Stop tracking a request (finished, aborted, or handed to another instance)."""
        self._text_len.pop(request_id, None)
        self._detokenizers.pop(request_id, None)
        return self.requests.pop(request_id, None)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        output = self._output(request)
        self.forget_request(request_id)
        return output

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def snapshot(self, instance_id: int = 0) -> InstanceSnapshot:
        """Memory and queue state for the global manager's policies."""
        bm, waiting = self.block_manager, self.scheduler.waiting
        needed = [bm.blocks_needed(r.request_id, r.num_tokens) for r in waiting]
        return InstanceSnapshot(
            instance_id=instance_id, block_size=bm.block_size, num_blocks=bm.num_blocks - bm.reserved,
            num_free_blocks=max(0, bm.num_free_blocks - bm.reserved),
            num_running=len(self.scheduler.running) + len(self.scheduler.stalled),
            num_waiting=len(waiting), hol_blocks=needed[0] if needed else 0,
            queued_blocks=sum(needed), num_preemptions=self.scheduler.num_preemptions,
            num_swap_preemptions=self.scheduler.num_swap_preemptions,
            num_recompute_fallbacks=self.scheduler.num_recompute_fallbacks,
            num_continued_prefill_chunks=self.scheduler.num_continued_prefill_chunks,
            swapped_out_bytes=self.swapper.swapped_out_bytes if self.swapper else 0,
            swapped_in_bytes=self.swapper.swapped_in_bytes if self.swapper else 0,
            exchanging=getattr(self.runner, "exchange_pending", False),
        )

    # -- stepping ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if getattr(self.runner, "overlap", False):
            return self._overlapped_step()
        plan = self.scheduler.schedule()
        if self.swapper is not None:  # before the forward reuses the blocks swap-outs freed
            self.swapper.apply(plan, self.kv_cache.storage, self.block_manager.block_table)
        sampled = self.runner.execute(plan)
        return self._apply(plan, sampled)

    def _overlapped_step(self) -> list[RequestOutput]:
        """A pipeline leader that keeps steps in flight (vLLM's virtual engines): step the next
        request set, launch it into stage 0, and take the results of steps launched earlier,
        keeping (stages - 1) in flight so every stage has a step to work on. A set is stepped
        again only after its previous step's tokens are back: set i steps at steps i, i + n, ..."""
        runner, sets = self.runner, self.runner.num_virtual_engines
        virtual_engine = self._next_virtual_engine % sets  # a regroup may have changed the number of sets
        self._next_virtual_engine = (virtual_engine + 1) % sets
        # the lookahead batcher's cost model also balances the sets (by count otherwise)
        runner.launch(self.scheduler.schedule(virtual_engine, sets, getattr(runner.batcher, "decode_cost", None)))
        outputs = []
        while runner.num_in_flight > sets - 1:
            outputs += self._collect_one()
        return outputs

    def drain(self) -> list[RequestOutput]:
        """Take every launched step's result (before the group regroups or shuts down)."""
        outputs = []
        while getattr(self.runner, "num_in_flight", 0):
            outputs += self._collect_one()
        return outputs

    def _collect_one(self) -> list[RequestOutput]:
        """Apply the oldest launched step's result, then run that step's round of a KV exchange or
        weight pull. Every member runs round k right after its part of step k; the leader runs it
        once step k's result is back, i.e. after it has launched the next (sets - 1) steps, so the
        round pairs with the members' without holding stage 0 back: the pipeline keeps
        overlapping while KV or weights move."""
        outputs = self._apply(*self.runner.collect())
        self.runner.after_step()
        return outputs

    def _apply(self, plan, sampled: dict[str, int]) -> list[RequestOutput]:
        current = {c.request.request_id for c in plan.chunks if self.scheduler.is_current(c)}
        self.scheduler.update(plan, sampled)
        outputs = []
        for request_id in sampled:
            if request_id not in current:
                continue  # aborted or preempted while its overlapped step was in flight
            request = self.requests[request_id]
            self._check_stop_strings(request)
            outputs.append(self._output(request))
            if request.status.finished:
                self.forget_request(request_id)
        return outputs

    def _check_stop_strings(self, request: Request) -> None:
        stops = request.params.stop
        if not stops or self.tokenizer is None or request.status.finished:
            return
        text = self._decode(request)
        hit = find_stop_string(text, stops, self._text_len[request.request_id])
        self._text_len[request.request_id] = len(text)
        if hit is not None:
            request.stop_reason = hit[1]
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)

    def _decode(self, request: Request) -> str:
        if self.tokenizer is None:
            return ""
        detokenizer = self._detokenizers.get(request.request_id)
        if detokenizer is None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, request.params.skip_special_tokens)
            self._detokenizers[request.request_id] = detokenizer
        return detokenizer.update(request.output_token_ids)

    def _output(self, request: Request) -> RequestOutput:
        text = self._decode(request)
        if isinstance(request.stop_reason, str):
            text = text[: text.find(request.stop_reason)]
        status = request.status
        completion = CompletionOutput(
            index=0, text=text, token_ids=request.output_token_ids,
            finish_reason=status.value if status.finished else None, stop_reason=request.stop_reason,
        )
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion], finished=status.finished, metrics=request.metrics,
        )
