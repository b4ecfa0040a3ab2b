"""Calibration: the real router inputs of a dense model on some text, and router rows placed on their clusters.

`router_inputs` runs the dense model over calibration text with its weights left on disk: transformers'
`device_map={"": "disk"}` keeps every parameter in the safetensors files and accelerate's hooks load one module's
weights just before it runs and drop them after, so peak memory is about one layer plus the activations of the
calibration batch, whatever the model size. A forward pre-hook on each MoE layer's MLP takes its input: the
normalised hidden state that enters the FFN, which is what the router will see.

`kmeans_router` clusters a layer's inputs (unit-normalised: spherical, balanced k-means, `moeify.convert.clustering`)
and
returns the unit centroids as router rows, scaled to the norm of the random initialisation's rows
(`router_init_std * sqrt(H)`), so logits start at the same scale and each token's top expert is its cluster.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from ..errors import MoeifyError
from .clustering import balanced_kmeans


def calibration_texts(data: str, text_field: str = "text") -> list[str]:
    """The texts of `data`: a Hub dataset id, a local text / json / jsonl / parquet / csv file, a folder of `.txt`
    files, or `builtin:python-docstrings` (through `datasets`, as `moeify train` reads data)."""
    from ..data.text import DataRecipe, load_text

    raw = load_text(DataRecipe(path=data, text_field=text_field))
    if text_field not in raw.column_names:
        raise MoeifyError(f"--calibration {data}: no '{text_field}' column; columns: {', '.join(raw.column_names)}.")
    return [t for t in raw[text_field] if t and t.strip()]


@torch.no_grad()
def router_inputs(
    folder: Path,
    texts: list[str],
    layers: list[int],
    mlp_module: str,
    max_tokens: int = 2048,
    max_length: int = 256,
    batch_size: int = 8,
    lengths: list[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Per layer in `layers`, the inputs of its MLP `(tokens, H)` (bfloat16, padding left out) for the first
    `max_tokens` tokens of `texts` (each truncated to `max_length`), with the model's weights read from disk.
    `lengths`, if given, receives each text's number of tokens (in order)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    with tempfile.TemporaryDirectory() as offload:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, device_map={"": "disk"}, offload_folder=offload
        ).eval()
        captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        keep: list[torch.Tensor] = []

        def hook(layer: int):  # noqa: ANN202
            def take(_module: torch.nn.Module, inputs: tuple) -> None:
                hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
                captured[layer].append(hidden[keep[-1]].to(torch.bfloat16))

            return take

        decoder = model.get_decoder()
        handles = [getattr(decoder.layers[i], mlp_module).register_forward_pre_hook(hook(i)) for i in layers]
        seen = 0
        try:
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    texts[start : start + batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                )
                keep.append(batch["attention_mask"].reshape(-1).bool())
                if lengths is not None:
                    lengths.extend(int(n) for n in batch["attention_mask"].sum(dim=1))
                model(**batch, logits_to_keep=1)  # the LM head's full logits would outweigh a layer
                seen += int(keep[-1].sum())
                if seen >= max_tokens:
                    break
        finally:
            for handle in handles:
                handle.remove()
    if seen == 0:
        raise MoeifyError("the calibration data has no tokens.")
    return {layer: torch.cat(parts)[:max_tokens] for layer, parts in captured.items()}


def kmeans_router(inputs: torch.Tensor, num_rows: int, std: float, seed: int) -> torch.Tensor:
    """Router rows `(num_rows, H)`: unit centroids of balanced spherical k-means on `inputs`, norm `std * sqrt(H)`."""
    tokens = inputs.shape[0] - inputs.shape[0] % num_rows
    if tokens < num_rows:
        raise MoeifyError(f"{inputs.shape[0]} calibration tokens cannot place {num_rows} router rows; give more text.")
    points = inputs[:tokens].float()
    points = points / points.norm(dim=1, keepdim=True).clamp(min=1e-12)
    labels = balanced_kmeans(points, num_rows, seed=seed)
    centroids = torch.stack([points[labels == c].mean(dim=0) for c in range(num_rows)])
    centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return centroids * (std * math.sqrt(points.shape[1]))


def read_expert_prompts(path: Path, num_experts: int) -> list[dict[str, list[str]]]:
    """`--expert-prompts FILE.yaml`: one entry per expert, `positive` prompts and optional `negative` ones::

    experts:
      - positive: ["def parse(text):", "import numpy as np"]
        negative: ["Once upon a time"]
      - positive: ["The French Revolution began in"]
    """
    import yaml

    try:
        entries = (yaml.safe_load(Path(path).read_text()) or {}).get("experts")
    except (OSError, yaml.YAMLError, AttributeError) as error:
        raise MoeifyError(f"--expert-prompts {path}: cannot read it ({error}).") from None
    if not isinstance(entries, list) or len(entries) != num_experts:
        count = len(entries) if isinstance(entries, list) else 0
        raise MoeifyError(
            f"--expert-prompts {path}: needs an `experts:` list with one entry per expert ({num_experts}), found "
            f"{count}."
        )
    prompts = []
    for index, entry in enumerate(entries):
        positive = entry.get("positive") if isinstance(entry, dict) else None
        negative = entry.get("negative", []) if isinstance(entry, dict) else []
        if not positive or not all(isinstance(p, str) for p in [*positive, *negative]):
            raise MoeifyError(f"--expert-prompts {path}: expert {index} needs a `positive` list of prompts.")
        prompts.append({"positive": list(positive), "negative": list(negative)})
    return prompts


def prompt_router(
    folder: Path, prompts: list[dict[str, list[str]]], layers: list[int], mlp_module: str, std: float
) -> dict[int, torch.Tensor]:
    """mergekit-style router rows: per expert, the mean router input over its positive prompts' tokens minus the
    mean over its negative ones, unit-normalised and scaled like `kmeans_router`'s. Read at the router's real input
    (the FFN's normalised input), not at the residual stream entering the decoder layer as mergekit does."""
    texts = [text for entry in prompts for kind in ("positive", "negative") for text in entry[kind]]
    lengths: list[int] = []
    inputs = router_inputs(folder, texts, layers, mlp_module, max_tokens=10**9, lengths=lengths)
    rows = {}
    for layer, hidden in inputs.items():
        segments = list(torch.split(hidden.float(), lengths))
        vectors, cursor = [], 0
        for entry in prompts:
            positive = torch.cat(segments[cursor : cursor + len(entry["positive"])]).mean(dim=0)
            cursor += len(entry["positive"])
            vector = positive
            if entry["negative"]:
                vector = positive - torch.cat(segments[cursor : cursor + len(entry["negative"])]).mean(dim=0)
                cursor += len(entry["negative"])
            vectors.append(vector / vector.norm().clamp(min=1e-12))
        rows[layer] = torch.stack(vectors) * (std * math.sqrt(hidden.shape[1]))
    return rows
