"""The model card (README.md with YAML metadata) written next to a converted model."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .params import ParamSummary, human


def source_license(folder: Path) -> str | None:
    """The `license` of the source checkpoint's model card, if it has one."""
    readme = folder / "README.md"
    if not readme.exists():
        return None
    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a malformed card must not stop a conversion
        return None


def render_model_card(
    *,
    base_model: str,
    license: str | None,
    architecture: str,
    output_class: str,
    format_name: str,
    reason: str,
    settings: dict[str, object],
    params: ParamSummary,
    not_exact: str | None = None,
) -> ModelCard:
    """Build the card: metadata (base_model, tags, license) and a body with settings, parameters and usage.
    `not_exact` says why the model does not reproduce the dense one at step 0 (`None`: it does)."""
    data = ModelCardData(
        base_model=base_model,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["moe", "moeify", "mixture-of-experts", "upcycling"],
    )
    loader = (
        "import moeify  # registers MoeifyForCausalLM; or pass trust_remote_code=True without moeify\n"
        if format_name == "moeify"
        else ""
    )
    remote = ", trust_remote_code=True" if format_name == "moeify" else ""
    serving = (
        "\nWithout `trust_remote_code=True`, transformers' `AutoTokenizer` asks whether to run the custom code (the\n"
        "tokenizer itself is the dense model's). vLLM serves this model through its Transformers backend:\n"
        '`LLM("PATH_OR_REPO", model_impl="transformers", trust_remote_code=True)` (SiLU experts only).\n'
        if format_name == "moeify"
        else f"\nServing engines load it as any `{output_class}` checkpoint.\n"
    )
    rows = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    exactness = (
        "so\nbefore fine-tuning this model computes the same outputs as the dense one."
        if not_exact is None
        else f"but\nit does **not** compute the dense model's outputs at step 0: {not_exact}. `moeify verify` reports "
        "the deviation."
    )
    body = f"""
# {Path(base_model).name} upcycled to a Mixture-of-Experts

Sparse upcycling of `{base_model}` ({architecture}) with [moeify](https://pypi.org/project/moeify/):
each MLP became {params.num_experts} experts (top-{params.top_k}) that start as copies of the dense MLP, {exactness}

Output class: `{output_class}` ({reason}).

| setting | value |
|---|---|
{rows}

| parameters | count |
|---|---|
| total | {params.total:,} ({human(params.total)}) |
| active per token | {params.active:,} ({human(params.active)}) |
| routed experts | {params.routed_expert_params:,} ({human(params.routed_expert_params)}) |

## Load

```python
{loader}from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO"{remote})
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO"{remote})
```
{serving}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
