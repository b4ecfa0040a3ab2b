"""What a conversion will build, validated before anything is read or written."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MoeifyError
from ..io.dtypes import DTYPES
from ..io.writer import parse_max_shard_size

FORMATS = ("auto", "native", "moeify")
LAYOUTS = ("per-expert", "fused")
ROUTER_INITS = ("random", "zeros", "kmeans", "prompts")
SPLITS = ("random", "kmeans")
METHOD_CHOICES = ("copy", "lora-experts")


@dataclass
class ConvertOptions:
    """User choices for `moeify convert` (the CLI flags, one field each)."""

    num_experts: int = 8
    top_k: int = 2
    shared_experts: int = 0
    layers: str = "all"
    format: str = "auto"
    dtype: str = "auto"
    router_init: str = "random"
    router_init_std: float = 0.02
    calibration: str | None = None  # `--router-init kmeans`: text whose router inputs place the router rows
    calibration_tokens: int = 2048
    expert_prompts: str | None = None  # `--router-init prompts`: YAML of per-expert positive / negative prompts
    seed: int = 0
    max_shard_size: str | int = "5GB"
    layout: str | None = None  # None: per-expert for native formats, fused for moeify
    method: str = "copy"  # "copy", or "lora-experts" (MixLoRA: one shared FFN, a LoRA delta per expert)
    expert_lora_rank: int = 16  # --method lora-experts: rank of each expert's delta
    expert_lora_alpha: float | None = None  # its LoRA alpha (scale alpha / r); None: 2 * rank
    lora_expert_sources: list[str] = field(default_factory=list)  # peft LoRA adapters of the dense model: expert e's
    # delta starts as adapter e's FFN LoRA
    overwrite: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    revision: str | None = None
    # Settings of the router section (`moeify.RouterConfig` keys) that differ from its defaults: scoring, network,
    # noise, capacity, losses, bias balancing, null experts, gating residual. Only moeify's format expresses them.
    router: dict[str, Any] = field(default_factory=dict)
    # Per-expert transforms after the method (not exact at step 0): Drop-Upcycling's re-initialised share of each
    # expert's neurons (the same set in gate, up and down unless `drop_independent`), relative Gaussian noise.
    granularity: int = 1  # fine-grained experts: each is 1/G of the FFN (E and K multiples of G)
    shared_expert_size: int | None = None  # neurons of each shared expert (None: a full copy of the FFN)
    split: str | None = None  # neuron splitting into E disjoint experts: "random" or "kmeans"
    # Branch-Train-MiX / "FrankenMoE": expert e's FFN from `expert_sources[e]` (fine-tunes of the base); the other
    # weights from the base (SOURCE) or, with `merge_non_ffn="average"`, their mean over the expert sources.
    expert_sources: list[str] = field(default_factory=list)
    merge_non_ffn: str = "base"
    drop_upcycling: float | None = None
    drop_independent: bool = False
    expert_noise: float = 0.0

    def expert_transforms(self) -> dict[str, dict[str, Any]]:
        """The transforms to apply to each routed expert, in order (`moeify.convert.methods.TRANSFORMS`)."""
        transforms: dict[str, dict[str, Any]] = {}
        if self.drop_upcycling is not None:
            transforms["drop_upcycling"] = {"rate": self.drop_upcycling, "independent": self.drop_independent}
        if self.expert_noise:
            transforms["expert_noise"] = {"std": self.expert_noise}
        return transforms

    def validate(self) -> None:
        """Raise `MoeifyError` for settings that cannot describe an MoE, before any I/O."""
        if self.num_experts < 2:
            raise MoeifyError(
                f"--num-experts must be at least 2 (got {self.num_experts}): an MoE needs experts to route between."
            )
        if self.top_k < 1:
            raise MoeifyError(f"--top-k must be at least 1 (got {self.top_k}).")
        if self.top_k > self.num_experts:
            raise MoeifyError(
                f"--top-k {self.top_k} is larger than --num-experts {self.num_experts}: a token cannot use more "
                "experts than there are. Lower --top-k or raise --num-experts."
            )
        if self.shared_experts < 0:
            raise MoeifyError(f"--shared-experts must be 0 or more (got {self.shared_experts}).")
        for name, value, allowed in (
            ("--format", self.format, FORMATS),
            ("--dtype", self.dtype, tuple(DTYPES)),
            ("--layout", self.layout or LAYOUTS[0], LAYOUTS),
            ("--router-init", self.router_init, ROUTER_INITS),
        ):
            if value not in allowed:
                raise MoeifyError(f"{name} must be one of {', '.join(allowed)} (got '{value}').")
        parse_max_shard_size(self.max_shard_size)
        parse_layers(self.layers, None)
        self.router_settings()
        if (self.router_init == "kmeans") != (self.calibration is not None):
            raise MoeifyError(
                "--router-init kmeans and --calibration DATA go together: k-means places the router rows on the "
                "router inputs of the calibration text."
            )
        if (self.router_init == "prompts") != (self.expert_prompts is not None):
            raise MoeifyError(
                "--router-init prompts and --expert-prompts FILE.yaml go together (one positive / negative prompt "
                "list per expert)."
            )
        if self.router_init == "prompts" and (self.granularity > 1 or self.router_settings()["network"] != "linear"):
            raise MoeifyError("--router-init prompts sets one linear router row per expert; drop --granularity / "
                              "--router-network mlp.")  # fmt: skip
        if self.router_init == "kmeans":
            if self.router_settings()["network"] != "linear":
                raise MoeifyError("--router-init kmeans sets the rows of a linear router; drop --router-network mlp.")
            if self.calibration_tokens < self.num_experts:
                raise MoeifyError(f"--calibration-tokens must be at least --num-experts ({self.num_experts}).")
        if self.expert_sources:
            if len(self.expert_sources) != self.num_experts:
                raise MoeifyError(
                    f"{len(self.expert_sources)} --expert sources for --num-experts {self.num_experts}: give one "
                    "--expert per expert (or set --num-experts to their number)."
                )
            if self.split or self.granularity > 1:
                raise MoeifyError("--expert takes whole FFNs from each source; it does not combine with --split or "
                                  "--granularity.")  # fmt: skip
        if self.method not in METHOD_CHOICES:
            raise MoeifyError(f"--method must be one of {', '.join(METHOD_CHOICES)} (got '{self.method}').")
        if self.lora_expert_sources and self.method != "lora-experts":
            raise MoeifyError("--lora-expert seeds the deltas of --method lora-experts; add that flag.")
        if len(self.lora_expert_sources) > self.num_experts:
            raise MoeifyError(
                f"{len(self.lora_expert_sources)} --lora-expert adapters for --num-experts {self.num_experts}: at most "
                "one adapter per expert."
            )
        if self.method == "lora-experts":
            if self.expert_lora_rank < 1:
                raise MoeifyError(f"--expert-lora-rank must be at least 1 (got {self.expert_lora_rank}).")
            other = [flag for flag, on in (("--granularity", self.granularity > 1), ("--split", self.split),
                     ("--drop-upcycling", self.drop_upcycling is not None), ("--expert-noise", self.expert_noise),
                     ("--expert", self.expert_sources)) if on]  # fmt: skip
            if other:
                raise MoeifyError(
                    f"--method lora-experts shares one FFN between the experts, so it does not combine with "
                    f"{', '.join(other)} (they make the experts' FFNs differ); drop them."
                )
        if self.shared_expert_size is not None:
            if self.shared_experts < 1:
                raise MoeifyError("--shared-expert-size sizes the shared experts; add --shared-experts 1 (or more).")
            if self.shared_expert_size < 1:
                raise MoeifyError(f"--shared-expert-size must be at least 1 neuron (got {self.shared_expert_size}).")
            if self.split or self.expert_sources or self.method != "copy":
                raise MoeifyError(
                    "--shared-expert-size takes the shared experts' neurons out of the routed experts; it combines "
                    "with the copy method and --granularity only (not --split, --expert or --method lora-experts)."
                )
        if self.merge_non_ffn not in ("base", "average"):
            raise MoeifyError(f"--merge-non-ffn must be base or average (got '{self.merge_non_ffn}').")
        if self.merge_non_ffn == "average" and not self.expert_sources:
            raise MoeifyError("--merge-non-ffn average averages the --expert sources; give them.")
        if self.split is not None:
            if self.split not in SPLITS:
                raise MoeifyError(f"--split must be one of {', '.join(SPLITS)} (got '{self.split}').")
            if self.granularity > 1:
                raise MoeifyError("--split and --granularity are two ways to size experts; choose one.")
        if self.granularity < 1:
            raise MoeifyError(f"--granularity must be 1 or more (got {self.granularity}).")
        if self.granularity > 1:
            g = self.granularity
            if self.num_experts % g or self.top_k % g:
                raise MoeifyError(
                    f"--granularity {g} needs --num-experts and --top-k to be multiples of {g} (got {self.num_experts} "
                    f"and {self.top_k}): experts come in groups of {g} slices of the FFN and a token must use whole "
                    "groups for the MoE to equal the dense model."
                )
            if self.router_init == "zeros":
                raise MoeifyError(
                    "--granularity with --router-init zeros: every group would tie and top-k could pick part of a "
                    "group, which is not exact; use --router-init random."
                )
        if self.drop_upcycling is not None and not 0 < self.drop_upcycling <= 1:
            raise MoeifyError(
                f"--drop-upcycling must be in (0, 1] (got {self.drop_upcycling}): the share of each expert's neurons "
                "to re-initialise (0.5 in the paper)."
            )
        if self.drop_independent and self.drop_upcycling is None:
            raise MoeifyError("--drop-independent goes with --drop-upcycling R.")
        if self.expert_noise < 0:
            raise MoeifyError(f"--expert-noise must be >= 0 (got {self.expert_noise}).")

    def router_settings(self) -> dict[str, Any]:
        """The whole router section this conversion writes (defaults + `router`), validated."""
        from ..modeling.configuration_moeify import RouterConfig

        try:
            return RouterConfig.from_dict(dict(self.router)).to_dict()
        except (TypeError, ValueError) as error:
            raise MoeifyError(f"bad router settings: {error}") from None

    def custom_router(self) -> dict[str, Any]:
        """The router settings that differ from the defaults (what the stock MoE classes cannot express)."""
        from ..modeling.configuration_moeify import RouterConfig

        defaults = RouterConfig().to_dict()
        return {k: v for k, v in self.router_settings().items() if v != defaults[k]}

    @property
    def exact_router(self) -> bool:
        """Whether the router leaves an upcycled model equal to its dense source at step 0."""
        return self.router_deviation() is None

    def router_deviation(self) -> str | None:
        """Why the router settings change an upcycled model's outputs at step 0 (`RouterConfig.deviation`)."""
        from ..modeling.configuration_moeify import RouterConfig

        return RouterConfig.from_dict(self.router_settings()).deviation()

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The output dtype, or `None` to keep each source tensor's dtype."""
        return DTYPES[self.dtype]


_LAYER_SPEC = re.compile(r"^\d+(-\d+)?$")


def parse_layers(spec: str, num_layers: int | None) -> list[int]:
    """Parse `--layers`: `all`, `every:N` (layers 0, N, 2N, ...), or a list like `0-11,14`.

    With `num_layers=None` only the syntax is checked (and an empty list returned).
    """
    text = spec.strip().lower()
    hint = "Use 'all', 'every:N' or a comma list of layers and ranges such as '0-11,14'."
    if text == "all":
        return list(range(num_layers)) if num_layers is not None else []
    if text.startswith("every:"):
        step_text = text.split(":", 1)[1]
        if not step_text.isdigit() or int(step_text) < 1:
            raise MoeifyError(f"bad --layers '{spec}': every:N needs a positive integer N. {hint}")
        return list(range(0, num_layers, int(step_text))) if num_layers is not None else []
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not _LAYER_SPEC.match(part):
            raise MoeifyError(f"bad --layers '{spec}': cannot read '{part}'. {hint}")
        if "-" in part:
            start, end = (int(x) for x in part.split("-"))
            if end < start:
                raise MoeifyError(f"bad --layers '{spec}': range '{part}' runs backwards. {hint}")
            layers.update(range(start, end + 1))
        else:
            layers.add(int(part))
    if num_layers is None:
        return []
    outside = sorted(i for i in layers if i >= num_layers)
    if outside:
        raise MoeifyError(
            f"bad --layers '{spec}': layers {outside} do not exist; "
            f"the model has {num_layers} layers (0-{num_layers - 1})."
        )
    return sorted(layers)


def parse_null_experts(spec: str) -> dict[str, int]:
    """`--null-experts zero=1,copy=1,constant=2` -> `{"zero": 1, "copy": 1, "constant": 2}` (MoE++ experts)."""
    kinds = ("zero", "copy", "constant")
    hint = "Use --null-experts zero=N,copy=N,constant=N (any subset), e.g. zero=1,copy=1."
    counts: dict[str, int] = {}
    for part in spec.split(","):
        kind, _, number = part.strip().partition("=")
        if kind not in kinds or not number.strip().isdigit():
            raise MoeifyError(f"bad --null-experts '{spec}': cannot read '{part.strip()}'. {hint}")
        counts[kind] = int(number)
    return counts
