"""4-bit experts under FSDP2 (`fully_shard`): the packed bytes are float-typed parameters FSDP shards like any other.

Two CPU processes (gloo): each holds half of every layer's experts' bytes, the sharded model computes what the
unsharded one does, and backward reaches the per-expert LoRA factors (whose gradients FSDP reduce-scatters).
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from transformers import MixtralConfig, MixtralForCausalLM

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.fsdp import fully_shard

    from moeify.quant import ExpertLora, Experts4bit, add_expert_lora, quantize_experts

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(config)
    quantize_experts(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    add_expert_lora(model, ExpertLora(r=2, alpha=4.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    reference = copy.deepcopy(model)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    experts = next(m for m in model.modules() if isinstance(m, Experts4bit))
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits
    logits.float().pow(2).mean().backward()
    with torch.no_grad():
        expected = reference(ids).logits
    lora_grads = [p.grad for n, p in model.named_parameters() if "experts" in n and "lora_" in n]
    torch.save(
        {
            "packed": (
                type(experts.gate_up_packed).__name__,
                experts.gate_up_packed.dtype,
                tuple(experts.gate_up_packed.to_local().shape),
            ),
            "full_shape": tuple(
                next(m for m in reference.modules() if isinstance(m, Experts4bit)).gate_up_packed.shape
            ),  # noqa: E501
            "max_diff": float((logits - expected).abs().max()),
            "lora_grads": [g is not None and float(g.to_local().abs().sum()) > 0 for g in lora_grads],
        },
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_fully_shard_splits_the_packed_experts_and_computes_the_same(tmp_path: Path) -> None:
    mp.spawn(_run, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        kind, dtype, local = result["packed"]
        assert kind == "DTensor" and dtype == torch.bfloat16
        assert local[0] * WORLD == result["full_shape"][0]  # each rank holds half of the experts' bytes
        assert result["max_diff"] == 0.0
        assert result["lora_grads"] and all(result["lora_grads"])
