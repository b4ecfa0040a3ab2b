"""`import moeify` imports neither torch nor transformers, and still registers moeify's classes with the Auto
classes: whether transformers is imported after moeify (import hook) or before it (registered at once)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import DENSE_FOLDER, dense_model

from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions

_LIGHT = """
import sys
import moeify
heavy = sorted(m for m in ("torch", "transformers", "peft", "bitsandbytes", "datasets") if m in sys.modules)
assert not heavy, heavy
import moeify.cli
assert "torch" not in sys.modules and "transformers" not in sys.modules
"""

_LOAD = """
import sys
ORDER = sys.argv[2]
if ORDER == "transformers-first":
    from transformers import AutoConfig, AutoModelForCausalLM
    import moeify
else:
    import moeify
    from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

config = AutoConfig.from_pretrained(sys.argv[1])
assert type(config).__name__ == "MoeifyConfig", type(config)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])  # no trust_remote_code: the registered classes
assert type(model).__module__ == "moeify.modeling.modeling_moeify", type(model)
real = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
assert real is type(model), real  # the stand-in gave way to the real class
assert moeify.MoeifyForCausalLM is real
print("ok")
"""


def test_import_moeify_is_light() -> None:
    proc = subprocess.run([sys.executable, "-c", _LIGHT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("order", ["moeify-first", "transformers-first"])
def test_auto_classes_load_moeify_models_in_either_import_order(
    order: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dense = dense_model("gemma3", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    out = tmp_path / "moe"
    convert(str(dense), out, ConvertOptions(num_experts=4, top_k=2), progress=False, log=lambda _: None)
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD, str(out), order], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


_KERNELS_REGISTERED = """
import importlib, sys
importlib.import_module(sys.argv[1])
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
assert "moeify" in ALL_EXPERTS_FUNCTIONS
print("ok")
"""


@pytest.mark.parametrize("first", ["moeify.quant", "moeify.kernels.cpu_experts", "moeify.quant.dispatch", "moeify"])
def test_the_kernels_register_whichever_module_is_imported_first(first: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _KERNELS_REGISTERED, first], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
