"""Serve a moeify output with vLLM and compare its greedy continuation with transformers' (what `moeify verify
--generate` prints). Run it with the Python of a vLLM environment that has moeify installed (its vLLM plugin):

    bash scripts/vllm-env.sh && .venv-vllm/bin/python examples/serve_vllm.py out/gemma-3-270m-moe

`vllm serve out/gemma-3-270m-moe` serves the same model over HTTP.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB, on vLLM's CPU build


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    import moeify  # noqa: F401  (vLLM loads the plugin itself; here transformers needs the Auto classes)

    folder, prompt, tokens = sys.argv[1], "The capital of France is", 24
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    served = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=tokens))[0].outputs[0].text
    del llm

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    print(f"prompt: {prompt!r}\n  vLLM:         {served!r}\n  transformers: {expected!r}")
    print("  greedy continuations are identical" if served == expected else "  greedy continuations DIFFER")
    sys.exit(0 if served == expected else 1)


if __name__ == "__main__":
    main()
