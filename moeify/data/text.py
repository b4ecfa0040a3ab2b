"""Training text from a recipe's `data` section, through `datasets` (so the HF cache and offline mode behave as
users expect): a Hub dataset id, local json / jsonl / parquet / csv / txt files, or a built-in corpus
(`builtin:python-docstrings`, `builtin:python-stdlib`, see `corpus.py`); tokenized, packed into
`max_length` blocks, with a share of the documents (or blocks) held out for evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..errors import MoeifyError
from .corpus import BUILTIN_PREFIX, builtin_corpus

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label of a position the loss skips (transformers' and PyTorch's convention)
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass
class DataRecipe:
    """Where the text comes from and how it becomes training blocks (a recipe's `data` section)."""

    path: str = field(
        metadata={
            "doc": "Hub dataset id, local .json/.jsonl/.parquet/.csv/.txt file or folder, builtin:python-docstrings "
            "or builtin:python-stdlib"
        },
        default="",
    )
    text_field: str = field(metadata={"doc": "the column holding the text"}, default="text")
    messages_field: str | None = field(
        metadata={"doc": "a column of chat messages ({role, content}) to render with the chat template"}, default=None
    )
    assistant_only_loss: bool = field(
        metadata={"doc": "with messages: predict the assistant turns only"}, default=False
    )
    max_length: int = field(metadata={"doc": "tokens per training sequence"}, default=512)
    eval_fraction: float = field(metadata={"doc": "share of the data held out for evaluation"}, default=0.05)
    eval_split: Literal["documents", "blocks"] = field(
        metadata={
            "doc": "what is held out: whole documents (rows of the data, so no text is on both sides) or packed "
            "blocks (for data that is one long document)"
        },
        default="documents",
    )
    eval_seed: int = field(
        metadata={"doc": "seed of the held-out draw (apart from training.seed: runs with other seeds evaluate alike)"},
        default=0,
    )
    eval_blocks: int | None = field(
        metadata={"doc": "evaluate at most this many held-out blocks, drawn by eval_seed (null: all of them)"},
        default=None,
    )
    packing: bool = field(metadata={"doc": "concatenate texts and cut them into max_length blocks"}, default=True)


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
    from ..io.source import is_hub_id

    if not is_hub_id(data.path):
        raise MoeifyError(f"data.path {data.path} does not exist (and is not a Hub dataset id such as org/name).")
    try:
        return load_dataset(data.path, split="train")
    except (FileNotFoundError, ConnectionError, ValueError) as err:  # datasets' not-found errors derive from these
        raise MoeifyError(f"data.path {data.path}: cannot load the Hub dataset: {err}") from None


def build_datasets(data: DataRecipe, tokenizer: PreTrainedTokenizerBase):  # noqa: ANN201
    """(train, eval or None): tokenized, packed into `max_length` blocks (or truncated), with labels.

    Plain text (`text_field`) is predicted everywhere. Chat data (`messages_field`: a list of `{role, content}`)
    is rendered with the tokenizer's chat template; with `assistant_only_loss` only the assistant turns are
    predicted (the other tokens are labelled -100).

    `eval_fraction` of the documents is held out before packing (`eval_split: documents`), so a block never mixes
    held-out and training text and no document is on both sides; `eval_split: blocks` holds out packed blocks
    instead. The draw depends on `eval_seed` only, so the held-out set is the same for every training seed;
    `eval_blocks` keeps a random subset of the held-out blocks, to bound the cost of each evaluation.
    """
    raw = load_text(data)
    chat = data.messages_field is not None
    field = data.messages_field if chat else data.text_field
    if field not in raw.column_names:
        kind = "messages_field" if chat else "text_field"
        raise MoeifyError(f"data.{kind} '{field}' is not a column; columns: {', '.join(raw.column_names)}.")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise MoeifyError("data.messages_field: the model's tokenizer has no chat template to render messages with.")
    by_documents = bool(data.eval_fraction) and data.eval_split == "documents"
    if by_documents and len(raw) < 2:
        raise MoeifyError(
            f"data.eval_split: documents needs at least 2 documents to hold some out; {data.path} has {len(raw)}. "
            "Use data.eval_split: blocks, or data.eval_fraction: 0."
        )
    if by_documents:
        parts = raw.train_test_split(test_size=data.eval_fraction, seed=data.eval_seed)
        train = _blocks(parts["train"], data, tokenizer, field)
        held_out = _blocks(parts["test"], data, tokenizer, field)
    else:
        train, held_out = _blocks(raw, data, tokenizer, field), None
    if len(train) == 0:
        raise MoeifyError(f"data: no training block of {data.max_length} tokens; lower data.max_length or add text.")
    if by_documents and len(held_out) == 0:
        raise MoeifyError(
            f"data: the {len(parts['test'])} held-out documents make no block of {data.max_length} tokens; raise "
            "data.eval_fraction, lower data.max_length, or use data.eval_split: blocks."
        )
    if data.eval_fraction and not by_documents and len(train) >= 2:
        split = train.train_test_split(test_size=data.eval_fraction, seed=data.eval_seed)
        train, held_out = split["train"], split["test"]
    if held_out is not None and data.eval_blocks is not None and len(held_out) > data.eval_blocks:
        held_out = held_out.shuffle(seed=data.eval_seed).select(range(data.eval_blocks))
    return train, held_out


def _blocks(raw, data: DataRecipe, tokenizer: PreTrainedTokenizerBase, field: str):  # noqa: ANN001, ANN202
    """Documents (a datasets.Dataset) -> tokenized `input_ids` / `labels` rows of `max_length` tokens: packed
    across documents, or each document truncated (shorter ones dropped)."""
    chat = data.messages_field is not None
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict) -> dict:
        rows = (
            [_render_chat(tokenizer, messages, data.assistant_only_loss) for messages in batch[field]]
            if chat
            else [(ids, list(ids)) for ids in tokenizer(batch[field], add_special_tokens=True)["input_ids"]]
        )
        if data.packing:
            return {"input_ids": [ids + eos for ids, _ in rows], "labels": [lab + eos for _, lab in rows]}
        return {
            "input_ids": [ids[: data.max_length] for ids, _ in rows],
            "labels": [lab[: data.max_length] for _, lab in rows],
        }

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc="Tokenizing")
    if not data.packing:
        return tokenized.filter(lambda row: len(row["input_ids"]) == data.max_length)

    def pack(batch: dict) -> dict:
        size = data.max_length
        out = {}
        for key in ("input_ids", "labels"):
            flat = [token for row in batch[key] for token in row]
            out[key] = [flat[i : i + size] for i in range(0, len(flat) - size + 1, size)]
        return out

    return tokenized.map(pack, batched=True, desc="Packing")


def _render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], assistant_only: bool) -> tuple[list, list]:
    """Token ids of a conversation and its labels. The tokens of assistant turn i are those the template adds
    between `messages[:i]` and `messages[:i + 1]` (rendered prefixes), so any chat template works, with or without
    generation markers."""
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    if not assistant_only:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = len(tokenizer.apply_chat_template(messages[:i], tokenize=True, return_dict=False)) if i else 0
        after = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=False))
        labels[before:after] = ids[before:after]
    return ids, labels
