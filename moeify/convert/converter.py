"""`moeify convert`: plan -> per-layer upcycling transforms -> streaming writer, into OUT atomically.

The converter knows no architecture (adapters do) and no output naming (formats do). It reads source
tensors lazily, builds one MoE layer at a time, writes each shard header first and tensors as produced,
in a temporary folder beside OUT that is renamed into place only when everything is written.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..inspect.params import ParamSummary
from ..io.atomic import atomic_output, check_output_folder
from ..io.writer import parse_max_shard_size, write_safetensors
from .metadata import write_metadata
from .options import ConvertOptions
from .plan import not_exact, plan_conversion


@dataclass
class ConversionResult:
    """What `convert` wrote."""

    output: Path
    format: str
    output_class: str
    reason: str
    layout: str
    architecture: str
    params: ParamSummary
    exact: bool
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The one-paragraph report printed at the end of a conversion."""
        p = self.params
        layers = f"{len(p.moe_layers)} MoE layers" if p.moe_layers else "no MoE layers"
        shared = f", {p.shared_experts} shared" if p.shared_experts else ""
        exact = "outputs equal the dense model's at step 0" if self.exact else "outputs differ from the dense model's"
        return (
            f"Wrote {self.output} in {self.seconds:.1f}s: {self.architecture} -> {self.output_class} "
            f"({self.format} format, {self.layout} layout; {self.reason}). {layers}, {p.num_experts} experts, "
            f"top-{p.top_k}{shared}; {p.total:,} parameters in total, {p.active:,} active per token; {exact}. "
            f"Check with: moeify verify DENSE {self.output}"
        )


def convert(
    source: str,
    out: str | os.PathLike,
    options: ConvertOptions | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Upcycle the dense causal LM at `source` into an MoE written to `out`.

    Args:
        source: a checkpoint folder, a Hub id (`org/name[@revision]`) or a `.gguf` file.
        out: output folder; created atomically (a temporary folder beside it is renamed at the end).
        options: the conversion settings (`ConvertOptions`, the CLI flags).
        progress: show progress bars.
        log: where to report decisions (defaults to stderr).

    Returns:
        a `ConversionResult` with the chosen format, parameter counts and a printable `summary()`.

    Raises:
        MoeifyError: bad input (nothing is written).
    """
    started = time.perf_counter()
    options = options or ConvertOptions()
    say = log or (lambda message: print(message, file=sys.stderr))
    max_shard = parse_max_shard_size(options.max_shard_size)
    out_path = Path(out).expanduser().absolute()
    check_output_folder(out_path, options.overwrite)
    plan = plan_conversion(source, options, progress)
    say(f"moeify: {plan.adapter.display_name} -> {plan.fmt.class_name}: {plan.reason}.")
    with atomic_output(out_path) as tmp:
        write_safetensors(plan.tensors, tmp, max_shard, progress)
        write_metadata(plan, tmp)
    return ConversionResult(
        output=out_path,
        format=plan.fmt.name,
        output_class=plan.fmt.class_name,
        reason=plan.reason,
        layout=plan.layout,
        architecture=plan.adapter.display_name,
        params=plan.params,
        exact=not_exact(options) is None,
        seconds=time.perf_counter() - started,
        notes=plan.notes,
    )
