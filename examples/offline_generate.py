"""Offline generation with the library API on a locally generated tiny model.

    python examples/offline_generate.py [MODEL_DIR]
"""

import sys
import tempfile

from kunserve import LLM, SamplingParams
from kunserve.models.tiny import make_tiny_checkpoint

model = sys.argv[1] if len(sys.argv) > 1 else str(make_tiny_checkpoint(tempfile.mkdtemp()))
llm = LLM(model, max_model_len=256)
params = SamplingParams(temperature=0.7, top_p=0.9, seed=0, max_tokens=24)
for out in llm.generate(["Hello, how are you", "Once upon a time"], params):
    print(repr(out.prompt), "->", repr(out.outputs[0].text), f"TTFT {out.metrics.ttft * 1e3:.1f} ms")
for out in llm.chat([{"role": "user", "content": "Hello"}], params):
    print("chat ->", repr(out.outputs[0].text))
