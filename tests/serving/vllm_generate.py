"""Run by the vLLM Python (`MOEIFY_VLLM_PYTHON`), not by pytest: greedy tokens of one model served by vLLM.

    python vllm_generate.py MODEL_DIR MODEL_IMPL PROMPTS_JSON MAX_TOKENS [LORA_ADAPTER_DIR]

Prints one line `RESULT {"tokens": [[...], ...], "vllm": "0.32.0"}`. Prompts are token ids, so no tokenizer is
involved; float32 so the tokens can be compared with transformers' exactly.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: quicker, and errors surface here
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; tiny models need little


def main() -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, impl, prompts, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    adapter = sys.argv[5] if len(sys.argv) > 5 else None
    lora = {"enable_lora": True, "max_lora_rank": 16} if adapter else {}
    llm = LLM(
        model=model,
        model_impl=impl,
        trust_remote_code=True,
        dtype="float32",
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_model_len=128,
        gpu_memory_utilization=0.1,  # on the CPU backend: the share of RAM reserved
        seed=0,
        **lora,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    request = None
    if adapter:
        from vllm.lora.request import LoRARequest

        request = LoRARequest("adapter", 1, adapter)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=request)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    print("RESULT " + json.dumps({"tokens": tokens, "vllm": vllm.__version__}), flush=True)


if __name__ == "__main__":
    main()
