"""Training text from a recipe's `data` section, through `datasets` (so the HF cache and offline mode behave as
users expect): a Hub dataset id, local json / jsonl / parquet / csv / txt files, or a built-in corpus
(`builtin:python-docstrings`, see `corpus.py`); tokenized, packed into
`max_length` blocks, with an eval split held out by fraction."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..errors import MoeifyError
from .corpus import BUILTIN_PREFIX, builtin_corpus
from .recipe import DataRecipe

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def load_text(data: DataRecipe):  # noqa: ANN201  (a datasets.Dataset)
    """The raw dataset (one split) the recipe names."""
    from datasets import Dataset, load_dataset

    if data.path.startswith(BUILTIN_PREFIX):
        return Dataset.from_dict({data.text_field: builtin_corpus(data.path.removeprefix(BUILTIN_PREFIX))})
    path = Path(data.path).expanduser()
    if path.is_dir():
        files = sorted(str(f) for f in path.rglob("*.txt"))
        if not files:
            raise MoeifyError(f"data.path {path} is a folder without .txt files.")
        return load_dataset("text", data_files=files, split="train")
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise MoeifyError(f"data.path {path}: unknown file type; use one of {', '.join(sorted(_BUILDERS))}.")
        return load_dataset(builder, data_files=str(path), split="train")
    from ..source import is_hub_id

    if not is_hub_id(data.path):
        raise MoeifyError(f"data.path {data.path} does not exist (and is not a Hub dataset id such as org/name).")
    try:
        return load_dataset(data.path, split="train")
    except (FileNotFoundError, ConnectionError, ValueError) as err:  # datasets' not-found errors derive from these
        raise MoeifyError(f"data.path {data.path}: cannot load the Hub dataset: {err}") from None


def build_datasets(data: DataRecipe, tokenizer: PreTrainedTokenizerBase, seed: int):  # noqa: ANN201
    """(train, eval or None): tokenized, packed into `max_length` blocks (or truncated), labels = input ids."""
    raw = load_text(data)
    field = data.text_field if data.text_field in raw.column_names else None
    if field is None:
        raise MoeifyError(
            f"data.text_field '{data.text_field}' is not a column; columns: {', '.join(raw.column_names)}."
        )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict) -> dict:
        ids = tokenizer(batch[field], add_special_tokens=True)["input_ids"]
        return {"input_ids": [row + eos for row in ids] if data.packing else [row[: data.max_length] for row in ids]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc="Tokenizing")
    if data.packing:

        def pack(batch: dict) -> dict:
            flat = [token for row in batch["input_ids"] for token in row]
            size = data.max_length
            return {"input_ids": [flat[i : i + size] for i in range(0, len(flat) - size + 1, size)]}

        tokenized = tokenized.map(pack, batched=True, desc="Packing")
    else:
        tokenized = tokenized.filter(lambda row: len(row["input_ids"]) == data.max_length)
    if len(tokenized) == 0:
        raise MoeifyError(f"data: no training block of {data.max_length} tokens; lower data.max_length or add text.")
    tokenized = tokenized.map(lambda row: {"labels": row["input_ids"]})
    if data.eval_fraction and len(tokenized) >= 2:
        split = tokenized.train_test_split(test_size=data.eval_fraction, seed=seed)
        return split["train"], split["test"]
    return tokenized, None
