"""Turn SOURCE (a folder, a Hub id `org/name[@rev]`, or a `.gguf` file) into a local checkpoint folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MoeifyError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# Tokenizer files a converted model carries over from its source.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# What a conversion needs from a Hub repository: config, tokenizer, safetensors weights, the card (license).
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
    "README.md",
    "LICENSE*",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(source: str) -> bool:
    """`org/name` or `org/name@revision` that is not an existing local path."""
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


def resolve_source(
    source: str, revision: str | None = None, trust_remote_code: bool = False, progress: bool = True
) -> Path:
    """A local folder with config.json and safetensors weights for `source`.

    A `.gguf` file is dequantized once into moeify's cache (see `moeify.io.gguf`); a Hub id is fetched
    with `huggingface_hub.snapshot_download` (only the files in `HUB_ALLOW_PATTERNS`), honouring the HF
    cache and `HF_HUB_OFFLINE`.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MoeifyError(f"SOURCE folder {path} has no config.json: it is not a transformers checkpoint.")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise MoeifyError(
                f"SOURCE {path} is a file but not a .gguf; give a checkpoint folder, a .gguf or a Hub id."
            )
        from .gguf import dequantize_gguf

        try:
            return dequantize_gguf(path, trust_remote_code=trust_remote_code, progress=progress)
        except ValueError as err:
            raise MoeifyError(str(err)) from None
    if is_hub_id(source):
        repo_id, _, rev = source.partition("@")
        return _download(repo_id, revision or rev or None, progress=progress)
    raise MoeifyError(
        f"SOURCE '{source}' does not exist: give a local checkpoint folder, a .gguf file, or a Hub id such as "
        "org/name or org/name@revision."
    )


def _download(repo_id: str, revision: str | None, progress: bool = True) -> Path:
    from importlib.metadata import version

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .hub import hub_progress_bars, transport_errors

    try:
        with hub_progress_bars(progress):
            folder = snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=HUB_ALLOW_PATTERNS,
                library_name="moeify",
                library_version=version("moeify"),
            )
        return Path(folder)
    except GatedRepoError:
        raise MoeifyError(f"{repo_id} is gated: accept its license on the Hub and log in (hf auth login).") from None
    except RepositoryNotFoundError:
        raise MoeifyError(f"Hub repository {repo_id} not found (or private: log in with hf auth login).") from None
    except RevisionNotFoundError:
        raise MoeifyError(f"revision '{revision}' not found in {repo_id}.") from None
    except LocalEntryNotFoundError:
        raise MoeifyError(
            f"cannot download {repo_id}: offline (HF_HUB_OFFLINE or no network) and it is not in the HF cache. "
            "Pass a local folder instead, or go online once to cache it."
        ) from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise MoeifyError(
                f"the Hub refused access to {repo_id} (HTTP {status}): log in with a token that can read it "
                "(hf auth login, or set HF_TOKEN)."
            ) from None
        raise MoeifyError(
            f"cannot download {repo_id}: the Hub answered HTTP {status}. Try again later, or pass a local folder."
        ) from None
    except transport_errors() as err:
        raise MoeifyError(
            f"cannot download {repo_id}: the Hub could not be reached ({type(err).__name__}: {err}). Check the "
            "network connection, or pass a local folder."
        ) from None


def load_config(folder: Path, trust_remote_code: bool = False) -> PreTrainedConfig:
    """`AutoConfig.from_pretrained(folder)`, with a `MoeifyError` that says what to do when it fails."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise MoeifyError(
                f"{folder} needs its own code to load its configuration, and moeify never runs a source's code "
                "unless asked: pass --trust-remote-code if you trust it."
            ) from None
        raise MoeifyError(f"cannot read the configuration in {folder}: {err}") from None
    except OSError as err:
        raise MoeifyError(f"cannot read the configuration in {folder}: {err}") from None
