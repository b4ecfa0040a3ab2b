"""4-bit experts under FSDP2 (`fully_shard`): the packed bytes are float-typed parameters FSDP shards like any other.

Two CPU processes (gloo): each holds half of every layer's experts' bytes, the sharded model computes what the
unsharded one does, and backward reaches the per-expert LoRA factors (whose gradients FSDP reduce-scatters).
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from transformers import MixtralConfig, MixtralForCausalLM

pytestmark = pytest.mark.slow  # several processes

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.fsdp import fully_shard

    from moeify.quant import ExpertLoraConfig, Experts4bit, add_expert_lora, quantize_experts

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
    add_expert_lora(model, ExpertLoraConfig(r=2, alpha=4.0))
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


STEPS = 4
LR = 2.0


def _train_fsdp2(rank: int, port: int, moe: str, out: str) -> None:
    """`fully_shard` as recipes/accelerate/fsdp2.yaml lays it out (each decoder layer, then the root) with bfloat16
    parameters for compute, against one process training the same global batch under bfloat16 autocast."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from moeify.quant import Experts4bit, load_for_training
    from moeify.train.loss import causal_lm_loss

    torch.manual_seed(0)
    model = load_for_training(moe, dtype=torch.bfloat16, gradient_checkpointing=True)
    model.train()
    reference = copy.deepcopy(model)
    packed = {n: b.detach().clone() for n, b in model.named_parameters() if n.endswith("_packed")}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # SGD: an update proportional to the gradient, so the adapters differ by what the gradients differ by (Adam
    # would turn bfloat16 rounding in a near-zero gradient into a whole step of that element).
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    expected_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=LR)
    batches = torch.randint(0, 300, (STEPS, 4, 12), generator=torch.Generator().manual_seed(1))
    losses, expected = [], []
    for batch in batches:
        shard = batch[rank * 2 : rank * 2 + 2]
        loss = causal_lm_loss(model, shard)
        loss.backward()  # FSDP reduce-scatters the mean over the two processes' gradients
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / WORLD)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference_loss = causal_lm_loss(reference, batch)
        reference_loss.backward()
        expected_optimizer.step()
        expected_optimizer.zero_grad()
        expected.append(float(reference_loss))
    lora = {n: p.full_tensor().float() for n, p in model.named_parameters() if "lora_B" in n}
    reference_lora = {n: p.detach().float() for n, p in reference.named_parameters() if "lora_B" in n}
    stored = {n: p.full_tensor() for n, p in model.named_parameters() if n.endswith("_packed")}
    experts = next(m for m in model.modules() if isinstance(m, Experts4bit))
    torch.save(
        {
            "losses": losses,
            "expected": expected,
            "lora_max_diff": max(float((lora[n] - reference_lora[n]).abs().max()) for n in lora),
            "lora_moved": max(float(reference_lora[n].abs().max()) for n in reference_lora),  # B starts at 0
            "bytes_equal": all(torch.equal(stored[n].view(torch.uint8), packed[n].view(torch.uint8)) for n in packed),
            "packed_dtype": experts.gate_up_packed.dtype,
            "sharded": type(experts.gate_up_packed).__name__,
        },
        Path(out) / f"fsdp2-rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_fsdp2_with_bfloat16_parameters_trains_like_one_process(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """FSDP2's mixed precision casts parameters to bfloat16 for compute and keeps float32 masters for what trains;
    the 4-bit experts' packed bytes (stored as bfloat16) are never converted. Losses and adapter after four steps
    equal one process under bfloat16 autocast within bfloat16 rounding."""
    from tiny_models import DENSE_FOLDER, dense_model

    from moeify.convert.converter import convert
    from moeify.convert.options import ConvertOptions

    dense = dense_model("qwen2", tmp_path_factory.getbasetemp() / DENSE_FOLDER)
    moe = tmp_path / "moe"
    convert(str(dense), moe, ConvertOptions(num_experts=4, top_k=2, shared_experts=1), progress=False)
    mp.spawn(_train_fsdp2, args=(_free_port(), str(moe), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"fsdp2-rank{rank}.pt")
        assert result["sharded"] == "DTensor" and result["packed_dtype"] == torch.bfloat16
        assert result["bytes_equal"]
        assert result["losses"] == pytest.approx(result["expected"], rel=5e-4)  # measured: 4e-5
        assert result["losses"][-1] < result["losses"][0]
        assert result["lora_moved"] > 1e-2  # the adapter trained, so comparing it means something
        assert result["lora_max_diff"] < 0.01 * result["lora_moved"], result  # measured: 0.4%
