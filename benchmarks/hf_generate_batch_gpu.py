"""The peer anchor: transformers' continuous batching (``generate_batch``) on the same job.

A plain script, run side by side with ``python -m kunserve.bench throughput`` in one device
call: random bf16 weights on a Llama-3-8B-shaped config, ``--num-prompts`` random prompts of
``--input-len`` tokens, exactly ``--output-len`` new tokens each (greedy, EOS disabled).
Prints a table, then one JSON line.

    python benchmarks/hf_generate_batch_gpu.py --num-prompts 256 --input-len 512 --output-len 128
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--attn", default="paged|sdpa", help="attn_implementation for generate_batch")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_model(torch, transformers, attn: str):
    from kunserve.bench._model_configs import LLAMA3_8B

    fields = {k: v for k, v in LLAMA3_8B.items() if k not in ("architectures", "model_type", "torch_dtype")}
    fields["eos_token_id"] = None  # never stop early: exactly --output-len tokens, like ignore_eos
    config = transformers.LlamaConfig(**fields)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        try:
            model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn)
        except (ValueError, KeyError) as e:  # an older name for the paged implementation
            print(f"attn_implementation {attn!r} refused ({e}); using 'sdpa'")
            model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    torch.set_default_dtype(torch.float32)
    return model.eval()


def main() -> None:
    args = parse_args()
    import torch
    import transformers

    model = build_model(torch, transformers, args.attn)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]
    gen = transformers.GenerationConfig(max_new_tokens=args.output_len, do_sample=False, eos_token_id=-1,
                                        pad_token_id=0)
    kwargs = {"progress_bar": False} if "progress_bar" in inspect.signature(model.generate_batch).parameters else {}
    torch.cuda.synchronize()
    start = time.perf_counter()
    # No inference_mode here: generate_batch runs its own thread and resets its tensors in place.
    results = model.generate_batch(inputs=prompts, generation_config=gen, **kwargs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(r.generated_tokens) for r in results.values())
    result = {"transformers": transformers.__version__, "device": torch.cuda.get_device_name(),
              "attn": model.config._attn_implementation, "num_prompts": args.num_prompts,
              "input_len": args.input_len, "output_len": args.output_len, "finished": len(results),
              "output_tokens": out_tokens, "elapsed_s": elapsed, "output_tokens_per_s": out_tokens / elapsed,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(f"transformers {result['transformers']} generate_batch: {result['finished']} requests, "
          f"{out_tokens} output tokens in {elapsed:.2f} s = {result['output_tokens_per_s']:.0f} tok/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
