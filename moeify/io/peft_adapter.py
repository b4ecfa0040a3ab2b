"""peft adapters on disk: find an adapter folder (local or on the Hub) and read a LoRA adapter's tensors.

Used by `moeify merge`, `moeify eval --adapter` and `moeify convert --lora-expert`.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from ..errors import MoeifyError

_PREFIX = "base_model.model."  # peft's prefix of every saved parameter name


def adapter_folder(adapter: str | Path) -> Path:
    """A local peft adapter folder for `adapter` (a folder, or a Hub id fetched with `snapshot_download`)."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").exists():
            raise MoeifyError(f"ADAPTER folder {path} has no adapter_config.json: it is not a peft adapter.")
        return path
    from .source import is_hub_id

    if is_hub_id(str(adapter)):
        from huggingface_hub import snapshot_download

        repo_id, _, revision = str(adapter).partition("@")
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=["adapter_*", "*.json"]))
    raise MoeifyError(f"ADAPTER '{adapter}' does not exist: give a peft adapter folder or a Hub id.")


def read_lora_adapter(adapter: Path, config: dict, what: str, unsupported: tuple[str, ...] = ()) -> dict:
    """The tensors of a peft LoRA adapter folder, under the names peft saved them (`base_model.model.` prefix).

    Raises `MoeifyError` naming `what` (the command or flag reading it) for another peft type, a setting in
    `unsupported` that is on, or no safetensors file.
    """
    if config.get("peft_type") != "LORA":
        raise MoeifyError(f"{adapter} is a {config.get('peft_type')} adapter; {what} takes LoRA adapters.")
    on = [key for key in unsupported if config.get(key)]
    if on:
        raise MoeifyError(f"{adapter} uses {', '.join(on)}, which {what} does not support.")
    files = sorted(adapter.glob("adapter_model*.safetensors"))
    if not files:
        raise MoeifyError(f"{adapter} has no adapter_model.safetensors (pickled adapters are not read).")
    return {k: v for f in files for k, v in load_file(f).items()}


def lora_adapter_tensors(adapter: Path, config: dict, what: str, unsupported: tuple[str, ...]) -> dict:
    """`read_lora_adapter`'s tensors by parameter name, without peft's `base_model.model.` prefix."""
    return {k.removeprefix(_PREFIX): v for k, v in read_lora_adapter(adapter, config, what, unsupported).items()}
