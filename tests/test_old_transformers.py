"""moeify-format outputs load with `trust_remote_code=True` on the older transformers releases serving engines pin.

vLLM 0.32 pins `transformers>=5.16.1,<5.20`; a user who serves or loads a moeify-format output there has no
moeify installed. For each old release, a fresh venv (see `venvs.py`) loads tiny Gemma 3 / Phi-3 / Llama
(`mlp_bias`) MoEs through the remote code saved beside the weights, with `import moeify` failing, and must give
the logits of the current transformers within 1e-5 (float32) on a right-padded batch, no missing or unexpected
keys, and the same greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_models import DENSE_FOLDER, dense_model
from transformers import AutoModelForCausalLM
from venvs import transformers_python

from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions

pytestmark = pytest.mark.slow  # a virtual environment of another transformers

TOL = 1e-5
OLD_RELEASES = ["5.16.1", "5.19.0"]
CASES = [
    ("gemma3", {"num_experts": 4, "top_k": 2, "shared_experts": 1}),
    ("phi3", {"num_experts": 4, "top_k": 2, "layers": "0,2"}),
    ("llama_mlp_bias", {"num_experts": 4, "top_k": 2, "shared_experts": 1}),
    ("llama", {"num_experts": 4, "top_k": 2, "method": "lora-experts", "expert_lora_rank": 4}),  # MoeifyMixLoraExperts
    (  # every router feature that adds weights or changes the forward
        "qwen2",
        {
            "num_experts": 4,
            "top_k": 2,
            "router": {
                "scoring": "sigmoid",
                "network": "mlp",
                "mlp_hidden_size": 16,
                "noisy_top_k": True,
                "bias_update_rate": 0.01,
                "null_experts": {"zero": 1, "copy": 1, "constant": 1},
                "gating_residual": True,
            },
        },
    ),
]
INPUT_IDS = torch.tensor([[1, 5, 17, 42, 99, 123, 200, 7, 8, 250, 31, 64], [1, 44, 9, 230, 18, 2, 0, 0, 0, 0, 0, 0]])
ATTENTION_MASK = (torch.arange(12) < torch.tensor([[12], [6]])).long()
NEW_TOKENS = 6

_CHILD = r"""
import json, sys
sys.modules["moeify"] = None  # `import moeify` raises ImportError from here on
import torch, transformers
from transformers import AutoModelForCausalLM

data = torch.load(sys.argv[1])
report = {"transformers": transformers.__version__}
for path in data["paths"]:
    model, info = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        tokens = model.generate(data["input_ids"][:1], max_new_tokens=data["new_tokens"], do_sample=False)
    mask = data["attention_mask"].bool()
    report[path] = {
        "class": type(model).__module__ + "." + type(model).__name__,
        "diff": (logits - data["expected"][path])[mask].abs().max().item(),
        "tokens": tokens[0].tolist(),
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
    }
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def moeify_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Each case converted to the moeify format, with its logits and greedy tokens under the current transformers."""
    root = tmp_path_factory.mktemp("old-transformers")
    outputs = {}
    for arch, options in CASES:
        dense = dense_model(arch, tmp_path_factory.getbasetemp() / DENSE_FOLDER)
        out = root / f"{arch}-moe"
        convert(str(dense), out, ConvertOptions(format="moeify", **options), progress=False, log=lambda _: None)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        if options.get("method") == "lora-experts":  # trained-looking deltas (B starts at 0), saved as training would
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
            model.save_pretrained(out)
        with torch.no_grad():
            logits = model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits
            tokens = model.generate(INPUT_IDS[:1], max_new_tokens=NEW_TOKENS, do_sample=False)
        outputs[str(out)] = {"logits": logits, "tokens": tokens[0].tolist()}
    return outputs


@pytest.mark.parametrize("release", OLD_RELEASES)
def test_remote_code_on_old_transformers(release: str, moeify_outputs: dict[str, dict], tmp_path: Path) -> None:
    python = transformers_python(release)
    payload = tmp_path / "expected.pt"
    torch.save(
        {
            "paths": list(moeify_outputs),
            "input_ids": INPUT_IDS,
            "attention_mask": ATTENTION_MASK,
            "new_tokens": NEW_TOKENS,
            "expected": {path: entry["logits"] for path, entry in moeify_outputs.items()},
        },
        payload,
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run(
        [str(python), "-c", _CHILD, str(payload)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report.pop("transformers") == release
    for path, entry in report.items():
        name = Path(path).name
        assert entry["class"].startswith("transformers_modules.") and entry["class"].endswith(".MoeifyForCausalLM")
        assert entry["missing"] == [] and entry["unexpected"] == [], f"{name} on {release}: {entry}"
        assert entry["diff"] <= TOL, f"{name} on transformers {release}: max |logit diff| {entry['diff']:.3e}"
        assert entry["tokens"] == moeify_outputs[path]["tokens"], f"{name} on {release}: greedy tokens differ"
