"""The LoRA of a model with 4-bit experts, saved by moeify, loads in stock peft onto the full-precision model, for
every stock MoE class moeify writes.

The full-precision model used here carries the dequantized 4-bit expert weights, so stock peft's result must equal
the 4-bit + LoRA model's to float32 precision: a LoRA factor paired with the wrong expert, a transposed factor or
a wrong scale shows as a difference. The load runs in a fresh interpreter where `import moeify` fails.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import NATIVE_MOE_CLASSES, native_moe

from moeify.quant import ExpertLoraConfig, Experts4bit, add_expert_lora, quantize_experts

_CHILD = r"""
import json, sys
sys.modules["moeify"] = None  # `import moeify` raises ImportError from here on
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    logits = model(ids).logits
torch.save(logits, sys.argv[4])
"""


@pytest.mark.parametrize(
    ("name", "expert_rank"), [*((name, 4) for name in NATIVE_MOE_CLASSES), ("mixtral", 2)], ids=lambda v: str(v)
)
def test_adapter_loads_in_stock_peft_on_full_precision_experts(name: str, expert_rank: int, tmp_path: Path) -> None:
    full = native_moe(name).eval()
    quantized = copy.deepcopy(full)
    names = quantize_experts(quantized)
    model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    assert add_expert_lora(model, ExpertLoraConfig(r=expert_rank, alpha=2.0 * expert_rank)) == names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("experts.base_layer.lora_A.default.weight") for n in trainable)
    assert not any("packed" in n for n in trainable)
    with torch.no_grad():  # B factors start at zero: make every one count
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(std=0.05)
    ids = [[5, 17, 42, 3, 77, 12, 9, 60], [1, 2, 3, 4, 5, 6, 7, 8]]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits

    # The full-precision model with the 4-bit model's (dequantized) expert weights.
    with torch.no_grad():
        for experts_name in names:
            module: Experts4bit = quantized.get_submodule(experts_name).experts
            experts = full.get_submodule(experts_name)
            everyone = torch.arange(module.num_experts)
            experts.gate_up_proj.copy_(module.dequantize("gate_up", everyone, torch.float32))
            experts.down_proj.copy_(module.dequantize("down", everyone, torch.float32))
    full.save_pretrained(tmp_path / "base")
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)  # peft's own save: the expert LoRA is a peft tuner layer
    saved = json.loads((adapter / "adapter_config.json").read_text())
    suffix = ".".join(names[0].split(".")[-2:])  # e.g. mlp.experts, as peft's own target_parameters name them
    assert saved["target_parameters"] == [f"{suffix}.gate_up_proj", f"{suffix}.down_proj"]
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]

    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1")
    result = tmp_path / "logits.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "base"), str(adapter), json.dumps(ids), str(result)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unexpected" not in proc.stderr.lower() and "missing" not in proc.stderr.lower(), proc.stderr[-2000:]
    torch.testing.assert_close(torch.load(result), expected, atol=1e-5, rtol=1e-5)
