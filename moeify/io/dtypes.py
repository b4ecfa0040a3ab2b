"""The dtypes a user names on the command line and in recipes (`--dtype`, `compute_dtype`)."""

import torch

# "auto": the checkpoint's own dtype, where a command allows it.
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
