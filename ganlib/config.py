"""Typed training configuration, mapped one-to-one onto the command line and validated once."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from ganlib.errors import UserError


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
MIXED_PRECISIONS = ("", "no", "bf16", "fp16")  # "" = whatever `accelerate launch` configured


def _run_only(default: Any) -> Any:
    """A field that does not change the weights (where files go, logging, timing): `weight_fields`
    leaves it out, so no fingerprint or source-cache key depends on it."""
    return field(default=default, metadata={"fingerprint": False})


@dataclass
class TrainConfig:
    """Everything that determines one training run (with the seed, it fixes the result on CPU)."""

    net: str = "dcgan"            # network family: mlp | dcgan | resnet
    size: int = 28                # image side, px
    width: int = 64               # base channel width of conv networks
    latent_dim: int = 100         # length of the latent vector z
    channels: int = 0             # image channels; 0 = the dataset's native channels
    data: str = "mnist5k"         # dataset spec, e.g. mnist5k:classes=5-9:n=25 (see ganlib.data.DataSpec)
    data_root: str = _run_only("")      # torchvision datasets root; "" = $GANBENCH_DATA or ~/.cache/ganbench/data
    download: bool = _run_only(False)   # let torchvision download missing datasets (needs internet)
    loss: str = "nonsat"          # nonsat | hinge
    r1_gamma: float = 0.0         # R1 penalty weight gamma on real images; 0 = off
    r1_interval: int = 16         # lazy R1: apply every this many D steps, scaled by the interval
    pl_weight: float = 0.0        # path-length regularisation weight of G (StyleGAN2: 2 at 256 px); 0 = off; stylegan2 nets only
    pl_interval: int = 4          # lazy path-length regularisation: apply every this many G steps, scaled by the interval
    steps: int = 300              # optimisation steps (each: one D step and one G step)
    batch: int = 64               # images per process per step
    lr_g: float = 2e-4            # Adam learning rate of G (and G-side extras)
    lr_d: float = 2e-4            # Adam learning rate of D (and D-side extras)
    beta1: float = 0.5            # Adam beta1 (DCGAN)
    beta2: float = 0.999          # Adam beta2
    ema_decay: float = 0.0        # EMA of G per step (e.g. 0.999); 0 = off; samples/eval use the EMA when on
    seed: int = 0                 # seeds weights, data order and latents (each process its own stream)
    strategy: str = "scratch"     # transfer strategy (ganlib.strategies)
    strategy_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"layers": 2}
    augment: str = "none"         # augmentation before D, real and fake: none | diffaugment | ada (ganlib.augment)
    augment_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"target": 0.6} for ada
    source: str = ""              # directory holding the source generator/discriminator .safetensors
    source_checkpoint: str = ""   # instead of `source`: a rosinality StyleGAN2 .pt (g_ema, g, d); net stylegan2 only
    mixed_precision: str = ""     # no | bf16 | fp16; "" = whatever `accelerate launch` configured
    compile: bool = False         # torch.compile the networks (kernels cached in $GANBENCH_CACHE/inductor)
    memory_format: str = "auto"   # conv nets: channels_last | contiguous | auto (channels_last on CPU only)
    out: str = _run_only("runs/train")  # output directory
    ckpt_every: int = _run_only(0)      # checkpoint every N steps (0 = only at the end)
    resume: bool = _run_only(False)     # continue from out/checkpoint if present
    log_every: int = _run_only(25)      # read losses back from the device every N steps (a host sync)
    warmup_steps: int = _run_only(5)    # steps excluded from timing
    eval_every: int = _run_only(0)      # evaluation callback interval in steps (0 = off); used by bench
    progress: bool = _run_only(True)    # tqdm bar on the main process

    def validate(self) -> "TrainConfig":
        """Check values that need no I/O; raise UserError naming the field."""
        _check_types(self)
        positive = ("size", "width", "latent_dim", "steps", "batch", "r1_interval", "pl_interval", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "ckpt_every", "eval_every", "channels", "r1_gamma", "pl_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)} must be >= 0")
        if self.channels not in (0, 1, 3):
            raise UserError(f"channels={self.channels} must be 1, 3 or 0 (the dataset's own)")
        if self.memory_format not in MEMORY_FORMATS:
            raise UserError(f"memory_format={self.memory_format!r} must be one of {', '.join(MEMORY_FORMATS)}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise UserError(f"mixed_precision={self.mixed_precision!r} must be one of no, bf16, fp16")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        for name in ("lr_g", "lr_d"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.batch < 2:
            raise UserError(f"batch={self.batch} must be >= 2 (batch normalisation needs two samples)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def weight_fields(self) -> dict[str, Any]:
        """`to_dict()` without the run-only fields (`_run_only`): the values that determine the weights."""
        return {f.name: value for f, value in zip(dataclasses.fields(self), self.to_dict().values())
                if f.metadata.get("fingerprint", True)}

    def key_fields(self) -> dict[str, Any]:
        """`weight_fields()` without an option that is off (path-length regularisation at weight 0):
        what the training fingerprint and the source-cache key start from, so that the keys of runs
        and sources from before the option existed stay valid."""
        fields = self.weight_fields()
        if not self.pl_weight:
            del fields["pl_weight"], fields["pl_interval"]
        return fields

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**values).validate()


_SCALARS = (bool, int, float, str)


def _check_types(cfg: TrainConfig) -> None:
    """Each field has its declared type (YAML reads `2e-4` as a string, `1` where a float is meant is fine)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value, typ = getattr(cfg, f.name), hints[f.name]
        if typ not in _SCALARS:
            if not isinstance(value, dict):
                raise UserError(f"{f.name}={value!r} must be a mapping of option names to values")
            continue
        ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            hint = " (write floats with a dot in YAML, e.g. 2.0e-4)" if typ is float and isinstance(value, str) else ""
            raise UserError(f"{f.name}={value!r} must be a {typ.__name__}{hint}")
        if typ is float and not math.isfinite(value):  # nan slips past every `<=` check below
            raise UserError(f"{f.name}={value!r} must be a finite number")


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one-line UserErrors (exit code 2, no usage dump)."""

    def add_version(self) -> None:
        """`--version`: the package version (ganlib.__version__, which pyproject.toml reads too)."""
        from ganlib import __version__

        self.add_argument("--version", action="version", version=f"%(prog)s (ganbench) {__version__}")

    def error(self, message: str):
        raise UserError(f"{message}; see --help")


def _parse_options(items: list[str], flag: str = "--strategy-opt", example: str = "layers=2") -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r} must look like name=value, e.g. {example}")
        options[key] = value
    return options


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


@functools.cache
def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's documentation: the comment on its line in the class source (the one place it is
    written), as the CLI's help text. Read once per class."""
    source = inspect.getsource(cls)
    docs = {m.group(1): m.group(2).strip() for m in map(_FIELD_COMMENT.match, source.splitlines()) if m}
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def field_choices() -> dict[str, tuple[str, ...]]:
    """The fields with a fixed set of values: registry names (read from the registries) and enums."""
    from ganlib.losses import LOSSES
    from ganlib.nets import NETWORKS
    from ganlib.strategies import STRATEGIES

    return {"net": tuple(NETWORKS.names()), "loss": tuple(LOSSES.names()),
            "strategy": tuple(STRATEGIES.names()), "memory_format": MEMORY_FORMATS,
            "mixed_precision": MIXED_PRECISIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one --flag per TrainConfig field (underscores become dashes), its comment as help text."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    docs, choices = field_docs(TrainConfig), field_choices()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        if f.name == "strategy_options":
            parser.add_argument("--strategy-opt", action="append", default=[], metavar="NAME=VALUE",
                                help="strategy option, repeatable (e.g. layers=2; see docs/strategies.md)")
        elif f.name == "augment_options":
            parser.add_argument("--augment-opt", action="append", default=[], metavar="NAME=VALUE",
                                help="augmentation option, repeatable (e.g. target=0.6; see docs/strategies.md)")
        elif typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name),
                                help=docs[f.name])
        elif f.name in choices:
            parser.add_argument(flag, type=typ, default=getattr(defaults, f.name), choices=choices[f.name],
                                metavar="{" + ",".join(c or "''" for c in choices[f.name]) + "}",
                                help=docs[f.name])
        else:
            parser.add_argument(flag, type=typ, default=getattr(defaults, f.name), help=docs[f.name])


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    options = ("strategy_options", "augment_options")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in options}
    return TrainConfig(**values, strategy_options=_parse_options(args.strategy_opt),
                       augment_options=_parse_options(args.augment_opt, "--augment-opt", "target=0.6")).validate()
