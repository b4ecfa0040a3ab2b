"""Load a moeify-format MoE where moeify is not installed: the modeling code travels with the weights.

    python examples/load_remote_code.py OUT

OUT is a folder (or Hub repo) written by `moeify convert --format moeify` (Gemma 3 and Phi-3 always are).
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "out/gemma-3-270m-moe"
    # trust_remote_code runs configuration_moeify.py / modeling_moeify.py saved beside the weights.
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    print(type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,} parameters")
    inputs = tokenizer("Mixture-of-Experts models", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    print(tokenizer.decode(output[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
