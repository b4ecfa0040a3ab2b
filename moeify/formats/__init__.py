"""Output formats: stock transformers MoE classes (`native`) and moeify's own (`moeify`)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from ..architectures import ArchitectureAdapter
from ..errors import MoeifyError
from .base import MoESpec, MoETensorNames, OutputFormat
from .moeify import MoeifyFormat
from .native import NATIVE_FORMATS, NativeFormat

MOEIFY_FORMAT = MoeifyFormat()


def choose_format(
    adapter: ArchitectureAdapter,
    dense_config: PreTrainedConfig,
    spec: MoESpec,
    requested: str,
    custom_router: dict[str, Any],
) -> tuple[OutputFormat, str]:
    """Pick the output format for `--format` (`requested`) and say why.

    `native`: the first stock class of the adapter that is exact, else a `MoeifyError` naming the reasons and
    `--format moeify`. `auto`: the first exact stock class that serving engines also compute correctly, moeify
    otherwise. `moeify`: always. `custom_router`: the router settings that differ from the defaults, which no stock
    class expresses.
    """
    if requested == "moeify":
        return MOEIFY_FORMAT, "moeify format requested"
    if custom_router:
        settings = ", ".join(f"{key}={value}" for key, value in custom_router.items())
        reason = f"the router settings {settings} have no equivalent in the stock transformers MoE classes"
        if requested == "native":
            raise MoeifyError(f"--format native: {reason}. Use --format moeify (or auto).")
        return MOEIFY_FORMAT, reason + ", so moeify's own format"
    reasons = []
    for target in adapter.native_targets:
        fmt = NATIVE_FORMATS[target]
        reason = fmt.explain_unsupported(adapter, dense_config, spec)
        if reason is None and fmt.not_automatic and requested == "auto":
            reason = fmt.not_automatic
        if reason is None:
            note = f" (but {fmt.not_automatic})" if fmt.not_automatic else ""
            return fmt, f"{fmt.class_name} represents this {adapter.display_name} MoE exactly{note}"
        reasons.append(f"{fmt.class_name}: {reason}")
    if not adapter.native_targets:
        reasons.append(f"no stock transformers MoE class matches {adapter.display_name}")
    if requested == "native":
        raise MoeifyError(
            f"--format native cannot represent this {adapter.display_name} MoE exactly ("
            + "; ".join(reasons)
            + "). Use --format moeify (loads with `import moeify` or trust_remote_code=True)."
        )
    return MOEIFY_FORMAT, "no stock class is exact (" + "; ".join(reasons) + "), so moeify's own format"


__all__ = [
    "MOEIFY_FORMAT",
    "NATIVE_FORMATS",
    "MoESpec",
    "MoETensorNames",
    "NativeFormat",
    "OutputFormat",
    "choose_format",
]
