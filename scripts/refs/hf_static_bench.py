"""transformers' own static-cache decode speed on a model folder (fp16, CUDA), the peer beside
`onestep bench` in scripts/device-bench. Usage: hf_static_bench.py MODEL_DIR PROMPT_TOKENS NEW_TOKENS."""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

path, n_prompt, n_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).cuda().eval()
ids = torch.randint(3, 49000, (1, n_prompt), generator=torch.Generator().manual_seed(0)).cuda()
kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, cache_implementation="static")
with torch.no_grad():
    model.generate(ids, **kw)  # compile + warm-up
    runs = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, cache_implementation="static")
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        prefill = t1 - t0
        decode = (t2 - t1) - prefill
        runs.append((n_prompt / prefill, (n_new - 1) / decode))
runs.sort(key=lambda r: r[1])
p, d = runs[1]
print(json.dumps({"peer": "transformers static cache fp16", "prefill": p, "decode": d,
                  "device": torch.cuda.get_device_name()}))
