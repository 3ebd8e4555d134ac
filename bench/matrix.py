"""The benchmark matrix: a YAML file validated up front and expanded into cells.

A cell is one (strategy, augmentation, dataset pair, network, hardware setup, seed). Everything that can be
wrong with a matrix (YAML syntax, unknown names and options, impossible sizes, datasets that are
missing offline, duplicate cell ids) is found here, before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.published import PublishedFids, check_published, parse_published
from ganlib.augment import AUGMENTS, build_augment
from ganlib.config import TrainConfig
from ganlib.data import DATASETS, FOLDER, DataSpec
from ganlib.envpath import expand_path, unset_variables
from ganlib.errors import UserError
from ganlib.extractors import EXTRACTORS, missing_weights
from ganlib.metrics import MIN_SAMPLES
from ganlib.nets import NETWORKS, NetConfig, build_networks
from ganlib.nets.rosinality import load_source_checkpoint
from ganlib.strategies import STRATEGIES, build_strategy

PRESETS_DIR = importlib.resources.files("bench") / "presets"   # packaged matrix presets
SETUPS_DIR = importlib.resources.files("bench") / "setups"     # packaged hardware setups
# Fields of `train:` that the matrix owns itself (set per cell), so a matrix may not set them there.
CELL_OWNED = {"net", "size", "width", "data", "strategy", "strategy_options", "source", "steps", "seed",
              "out", "resume", "mixed_precision", "eval_every", "channels", "progress", "augment",
              "augment_options"}


@dataclass(frozen=True)
class StrategySpec:
    """A strategy with its options; `id` names it in cell ids (defaults to the strategy name)."""

    name: str
    options: dict[str, Any]
    id: str


@dataclass(frozen=True)
class AugmentSpec:
    """An augmentation before D with its options; `id` names it in cell ids (defaults to its name)."""

    name: str
    options: dict[str, Any]
    id: str


NO_AUGMENT = AugmentSpec("none", {}, "none")


@dataclass(frozen=True)
class PairSpec:
    """Transfer to `target` (transfer data) from `source` (data the source is pretrained on) or from
    `source_checkpoint` (a pretrained StyleGAN2 file: the field's protocol starts from FFHQ-256).

    Paths are kept as written (`$VAR`s expanded where files are opened: ganlib.envpath), so ids,
    records and cache keys do not depend on where a machine keeps the files.
    """

    source: DataSpec | None
    target: DataSpec
    source_checkpoint: str | None = None   # a rosinality-format .pt; exactly one of source, source_checkpoint
    eval: DataSpec | None = None           # the images FID compares with; None: the target without its n
    name: str | None = None                # the pair's id; None: made from source and target
    fetch: str | None = None               # how to get the pair's files, said when they are missing

    @property
    def id(self) -> str:
        if self.name:
            return self.name
        return f"{self.source.slug if self.source else checkpoint_slug(self.source_checkpoint)}_2_{self.target.slug}"

    @property
    def source_text(self) -> str:
        """The source as records name it: a dataset spec, or `checkpoint:PATH`."""
        return str(self.source) if self.source else f"checkpoint:{self.source_checkpoint}"

    @property
    def channels(self) -> int:
        """Image channels of the pair's networks: the source data's; a StyleGAN2 checkpoint is RGB."""
        return self.source.channels if self.source else 3

    @property
    def eval_target(self) -> DataSpec:
        """The images FID compares with: `eval` when given (the field's full test folder), else the
        target domain without the few-shot subset."""
        return self.eval or dataclasses.replace(self.target, n=None)

    @property
    def shots_in_eval(self) -> bool:
        """Whether the training shots are part of `eval_target` (chosen from it by n and seed), so
        the rest of it is held out; False for a separate eval folder, all of which is held out."""
        return self.eval is None


def checkpoint_slug(path: str) -> str:
    """`$GANBENCH_STYLEGAN2_FFHQ` -> `ckpt_ganbench_stylegan2_ffhq`, `/m/550000.pt` -> `ckpt_550000_<hash>`."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(path.rstrip("/")).stem or path).strip("_").lower() or "file"
    if path.startswith("$") and "/" not in path:
        return f"ckpt_{stem}"
    return f"ckpt_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    size: int
    width: int

    @property
    def id(self) -> str:
        return f"{self.name}{self.size}w{self.width}"


@dataclass(frozen=True)
class SetupSpec:
    """A hardware setup: Accelerate launch settings, from bench/setups/<name>.yaml or a file."""

    name: str
    accelerate: dict[str, Any]      # keys of an Accelerate config file (num_processes, mixed_precision, ...)

    @property
    def num_processes(self) -> int:
        return int(self.accelerate.get("num_processes", 1))

    @property
    def num_machines(self) -> int:
        return int(self.accelerate.get("num_machines", 1))

    @property
    def use_cpu(self) -> bool:
        return bool(self.accelerate.get("use_cpu", False))

    @property
    def mixed_precision(self) -> str:
        return str(self.accelerate.get("mixed_precision", "no"))

    @property
    def gpus_per_machine(self) -> int:
        return 0 if self.use_cpu else max(1, self.num_processes // self.num_machines)


@dataclass(frozen=True)
class MetricSpec:
    extractor: str = "lenet-mnist5k"   # feature extractor (ganlib.extractors); recorded with every FID
    num_samples: int = 1000            # generated images for the final FID/KID/PR (capped at the real set size)
    curve_samples: int = 250           # generated images per point of the FID-over-time curve
    eval_every: int = 0                # transfer steps between curve points; 0 = no curve
    target_fid: float | None = None    # quality target for time/steps-to-target (same extractor)
    precision_recall: bool = True      # also precision/recall in the final evaluation
    inception_weights: str | None = None  # local Inception weights for offline inception-v3-compat
    cap_at_real: bool = True           # generate at most as many images as the real set holds; false: the
                                       # few-shot protocol's 5,000 samples against a smaller test folder
    intra_lpips: bool = False          # few-shot cells: CDC's intra-LPIPS of the final samples, when lpips
                                       # and its weights are present (ganlib.intra_lpips; LPIPS-VGG at 256 px)


@dataclass(frozen=True)
class Cell:
    strategy: StrategySpec
    pair: PairSpec
    network: NetworkSpec
    setup: str
    seed: int
    with_network_id: bool = False
    augment: AugmentSpec = NO_AUGMENT

    @property
    def arm(self) -> str:
        """The strategy and augmentation, as records and reports name a row: `finetune`, `finetune+diffaugment`."""
        return self.strategy.id if self.augment.id == "none" else f"{self.strategy.id}+{self.augment.id}"

    @property
    def id(self) -> str:
        net = f"-{self.network.id}" if self.with_network_id else ""
        return f"{self.arm}{net}-{self.pair.id}-{self.setup}-s{self.seed}"


@dataclass
class Matrix:
    """A validated matrix (see bench/presets/default.yaml for a documented example)."""

    name: str
    networks: list[NetworkSpec]
    pairs: list[PairSpec]
    strategies: list[StrategySpec]
    setups: list[SetupSpec]
    seeds: list[int]
    source_steps: int
    transfer_steps: int
    train: dict[str, Any] = field(default_factory=dict)
    metrics: MetricSpec = field(default_factory=MetricSpec)
    workers: int | None = None  # cells run side by side per one-process setup; None = auto (bench/scheduler.py)
    raw: dict[str, Any] = field(default_factory=dict)
    # Augmentations per strategy id: the strategy entry's own `augment` list, else the matrix's.
    augments: dict[str, list[AugmentSpec]] = field(default_factory=dict)
    published: list[PublishedFids] = field(default_factory=list)

    def cells(self) -> list[Cell]:
        """All cells, setup-major (one launch per setup runs its cells in this order)."""
        many_nets = len(self.networks) > 1
        return [Cell(s, p, n, setup.name, seed, many_nets, a)
                for setup in self.setups for n in self.networks for p in self.pairs
                for s in self.strategies for a in self.augments.get(s.id, [NO_AUGMENT]) for seed in self.seeds]

    def setup(self, name: str) -> SetupSpec:
        return next(s for s in self.setups if s.name == name)

    def train_config(self, cell: Cell, **overrides) -> TrainConfig:
        """The transfer TrainConfig of a cell (source and output filled in by the runner)."""
        checkpoint = {"source_checkpoint": cell.pair.source_checkpoint} if cell.pair.source_checkpoint else {}
        values = {**self.train, **checkpoint, "net": cell.network.name, "size": cell.network.size,
                  "width": cell.network.width, "channels": cell.pair.channels, "data": str(cell.pair.target),
                  "strategy": cell.strategy.name,
                  "strategy_options": dict(cell.strategy.options), "augment": cell.augment.name,
                  "augment_options": dict(cell.augment.options), "steps": self.transfer_steps,
                  "seed": cell.seed, "eval_every": self.metrics.eval_every, **overrides}
        return TrainConfig(**values).validate()

    def source_config(self, cell: Cell, **overrides) -> TrainConfig | None:
        """The pretraining TrainConfig of a cell's source (shared by every strategy of the pair); None
        for a pair whose source is a checkpoint (nothing to pretrain)."""
        if cell.pair.source is None:
            return None
        return self.train_config(cell, data=str(cell.pair.source), strategy="scratch", strategy_options={},
                                 augment="none", augment_options={}, steps=self.source_steps, eval_every=0,
                                 **overrides)


# ---------------------------------------------------------------------------------------------
# loading and validation

_TOP_KEYS = {"name", "description", "network", "networks", "pairs", "strategies", "augment", "setups", "seeds",
             "source_steps", "transfer_steps", "train", "metrics", "workers", "published"}


def preset_names() -> list[str]:
    files = PRESETS_DIR.iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def setup_names() -> list[str]:
    files = SETUPS_DIR.iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def read_yaml(text: str, where: str) -> dict[str, Any]:
    """Parse YAML into a mapping; a syntax error names the file and line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{where}{line}: malformed YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of matrix fields at the top level")
    return data


def read_text_file(path: Path, what: str) -> str:
    """A YAML file's text; one line naming the file when it is not UTF-8 text (binary, UTF-16)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                        "save it as UTF-8 YAML") from None


def load_matrix(ref: str | None) -> Matrix:
    """A matrix from a preset name (default: `default`) or a YAML file path, validated."""
    ref = ref or "default"
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"matrix file {ref} does not exist; give a YAML file or a preset: "
                            f"{', '.join(preset_names())}")
        return parse_matrix(read_yaml(read_text_file(path, "matrix file"), str(path)), str(path))
    if ref not in preset_names():
        raise UserError(f"unknown preset {ref!r}; presets: {', '.join(preset_names())} (or give a YAML file)")
    text = PRESETS_DIR.joinpath(f"{ref}.yaml").read_text()
    return parse_matrix(read_yaml(text, f"preset {ref}"), f"preset {ref}")


def load_setup(ref: str, where: str) -> SetupSpec:
    """A setup by name (bench/setups/<name>.yaml) or by YAML file path."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"{where}: setup file {ref} does not exist")
        data, name = read_yaml(read_text_file(path, f"{where}: setup file"), ref), path.stem
    elif ref in setup_names():
        data = read_yaml(SETUPS_DIR.joinpath(f"{ref}.yaml").read_text(), ref)
        name = ref
    else:
        raise UserError(f"{where}: unknown setup {ref!r}; setups: {', '.join(setup_names())} (or a YAML file)")
    mp = str(data.get("mixed_precision", "no"))
    if mp not in ("no", "bf16", "fp16"):
        raise UserError(f"{where}: setup {name} mixed_precision={mp!r} must be no, bf16 or fp16")
    if mp == "fp16" and data.get("use_cpu"):
        raise UserError(f"{where}: setup {name} asks for fp16 on the CPU, which Accelerate silently runs as fp32; "
                        "use bf16 or no")
    for key in ("num_processes", "num_machines"):
        _int(data.get(key, 1), f"{where}: setup {name} {key}", 1)
    return SetupSpec(name=name, accelerate=data)


def _listify(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _require(data: dict, key: str, where: str) -> Any:
    if key not in data:
        raise UserError(f"{where}: missing field {key!r}")
    return data[key]


def _mapping(data: dict, key: str, where: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: {key} must be a mapping of field: value, got {value!r}")
    return dict(value)


def _int(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{what}={value!r} must be an integer >= {minimum}")
    return value


def parse_matrix(data: dict[str, Any], where: str) -> Matrix:
    """Validate a matrix mapping (UserError naming the field and `where`) and build a Matrix."""
    try:
        return _parse_matrix(data, where)
    except UserError as err:  # registries and configs do not know the file: name it
        if str(err).startswith(where):
            raise
        raise UserError(f"{where}: {err}") from None


def _parse_matrix(data: dict[str, Any], where: str) -> Matrix:
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r}; fields: {', '.join(sorted(_TOP_KEYS))}")
    name = str(data.get("name") or Path(where).stem)

    nets_raw = data.get("networks", data.get("network", {"name": "dcgan", "size": 28}))
    networks = []
    for item in _listify(nets_raw):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or set(item) - {"name", "size", "width"}:
            raise UserError(f"{where}: each network needs name, size and optional width, got {item!r}")
        spec = NetworkSpec(str(item.get("name", "dcgan")), _int(item.get("size", 28), "network size", 1),
                           _int(item.get("width", 64), "network width", 1))
        NETWORKS.get(spec.name)
        networks.append(spec)

    pairs = [_pair(item, where) for item in _listify(_require(data, "pairs", where))]

    default_augments = _augments(data.get("augment", ["none"]), where)
    strategies, augments = [], {}
    for item in _listify(_require(data, "strategies", where)):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item or set(item) - {"name", "options", "id", "augment"}:
            raise UserError(f"{where}: each strategy is a name or {{name, options, id, augment}}, got {item!r}")
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise UserError(f"{where}: strategy {item['name']!r} options must be a mapping of option: value, "
                            f"got {options!r}")
        build_strategy(item["name"], options)  # unknown names and options fail here
        spec = StrategySpec(item["name"], dict(options), str(item.get("id", item["name"])))
        strategies.append(spec)
        augments[spec.id] = _augments(item["augment"], where) if "augment" in item else default_augments

    setups = [load_setup(str(s), where) for s in _listify(data.get("setups", ["cpu-1proc"]))]
    seeds = [_int(s, "seed") for s in _listify(data.get("seeds", [0]))]
    train = _mapping(data, "train", where)
    owned = sorted(set(train) & CELL_OWNED)
    if owned:
        raise UserError(f"{where}: train.{owned[0]} is set per cell by the matrix; remove it from train:")
    if "compile" in train:  # the launch's accelerator compiles (or not) before any cell's config is read
        raise UserError(f"{where}: train.compile is the hardware setup's under bench (Accelerate's dynamo_config, "
                        "e.g. setup 1xgpu-bf16-compile); remove it from train:")
    metrics_raw = _mapping(data, "metrics", where)
    known_metric = {f.name for f in dataclasses.fields(MetricSpec)}
    bad = sorted(set(metrics_raw) - known_metric)
    if bad:
        raise UserError(f"{where}: unknown metrics field {bad[0]!r}; fields: {', '.join(sorted(known_metric))}")
    metrics = MetricSpec(**metrics_raw)
    EXTRACTORS.get(metrics.extractor)
    for key in ("num_samples", "curve_samples"):
        _int(getattr(metrics, key), f"metrics {key}", MIN_SAMPLES)
    _int(metrics.eval_every, "metrics eval_every", 0)
    target = metrics.target_fid
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))):
        raise UserError(f"metrics target_fid={target!r} must be a number (an FID) or null for none")
    for key in ("precision_recall", "cap_at_real", "intra_lpips"):
        if not isinstance(getattr(metrics, key), bool):
            raise UserError(f"metrics {key}={getattr(metrics, key)!r} must be true or false")

    workers = data.get("workers", "auto")
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UserError(f"{where}: workers={workers!r} must be auto or a whole number >= 1")

    matrix = Matrix(name=name, networks=networks, pairs=pairs, strategies=strategies, setups=setups, seeds=seeds,
                    source_steps=_source_steps(data, pairs, where),
                    transfer_steps=_int(_require(data, "transfer_steps", where), "transfer_steps", 1),
                    train=train, metrics=metrics, raw=data, augments=augments,
                    workers=None if workers == "auto" else workers,
                    published=parse_published(data.get("published"), where))
    _check_cells(matrix, where)
    check_published(matrix.published, {p.id for p in matrix.pairs},
                    set(STRATEGIES.names()) | {s.id for s in matrix.strategies},
                    set(AUGMENTS.names()) | {a.id for specs in matrix.augments.values() for a in specs}, where)
    return matrix


def _source_steps(data: dict, pairs: list[PairSpec], where: str) -> int:
    """Pretraining steps of each source: required when a pair pretrains one, else 0 (every source a checkpoint)."""
    if "source_steps" not in data and all(p.source is None for p in pairs):
        return 0
    return _int(_require(data, "source_steps", where), "source_steps", 1)


_PAIR_FORM = ("each pair needs a target and exactly one of source (data the source is pretrained on) or "
              "source_checkpoint (a StyleGAN2 .pt); optional: eval (the images FID compares with), id, fetch")


def _pair(item: Any, where: str) -> PairSpec:
    """One `pairs:` entry as a PairSpec (see _PAIR_FORM)."""
    keys = {"source", "source_checkpoint", "target", "eval", "id", "fetch"}
    if (not isinstance(item, dict) or set(item) - keys or "target" not in item
            or ("source" in item) == ("source_checkpoint" in item)):
        raise UserError(f"{where}: {_PAIR_FORM}; got {item!r}")
    for key in ("source_checkpoint", "id", "fetch"):
        if key in item and (not isinstance(item[key], str) or not item[key].strip()):
            raise UserError(f"{where}: pair {key} must be non-empty text, got {item[key]!r}")
    if "id" in item and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", item["id"]):
        raise UserError(f"{where}: pair id {item['id']!r} must be letters, digits, '_', '.' or '-' (it names files)")
    pair = PairSpec(source=DataSpec.parse(item["source"]) if "source" in item else None,
                    target=DataSpec.parse(item["target"]), source_checkpoint=item.get("source_checkpoint"),
                    eval=DataSpec.parse(item["eval"]) if "eval" in item else None,
                    name=item.get("id"), fetch=item.get("fetch"))
    if pair.eval is not None and pair.target.n is None:
        raise UserError(f"{where}: pair {pair.id} has an eval set, so its target {str(pair.target)!r} is the "
                        "training shots: give their number, e.g. :n=10")
    return pair


def _augments(value: Any, where: str) -> list[AugmentSpec]:
    """An `augment:` list (names or {name, options, id}) as specs; unknown names and options fail here."""
    specs = []
    for item in _listify(value):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item or set(item) - {"name", "options", "id"}:
            raise UserError(f"{where}: each augment is a name or {{name, options, id}}, got {item!r}")
        options = item.get("options") or {}
        build_augment(item["name"], options)
        specs.append(AugmentSpec(item["name"], dict(options), str(item.get("id", item["name"]))))
    if not specs:
        raise UserError(f"{where}: augment is an empty list; give at least one (none for no augmentation)")
    return specs


def _check_cells(matrix: Matrix, where: str) -> None:
    """Cross-field checks: TrainConfig fields, network/strategy fit, duplicate ids, data available."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(matrix.train) - known)
    if unknown:
        raise UserError(f"{where}: unknown train field {unknown[0]!r}; fields: {', '.join(sorted(known - CELL_OWNED))}")
    seen: dict[str, Cell] = {}
    for cell in matrix.cells():
        if cell.id in seen:
            raise UserError(f"{where}: duplicate cell id {cell.id!r}; give repeated strategies distinct 'id's")
        seen[cell.id] = cell
        matrix.train_config(cell)   # every value a cell's training gets is checked here, not mid-run
        matrix.source_config(cell)
    for pair in matrix.pairs:
        if pair.source_checkpoint and "source_checkpoint" in matrix.train:
            raise UserError(f"{where}: pair {pair.id} and train: both give a source_checkpoint; keep one")
    if any(p.source_checkpoint for p in matrix.pairs) or matrix.train.get("source_checkpoint"):
        other = sorted({n.name for n in matrix.networks} - {"stylegan2"})
        if other:
            raise UserError(f"{where}: a source_checkpoint is a rosinality StyleGAN2 file: it needs network "
                            f"stylegan2, not {other[0]}")
    checked = set()
    for net in matrix.networks:
        for pair in matrix.pairs:
            key = (net, pair.channels)
            if key in checked:
                continue
            checked.add(key)
            G, D = build_networks(NetConfig(net.name, net.size, key[1], matrix.train.get("latent_dim", 100), net.width))
            family = NETWORKS.get(net.name)
            for s in matrix.strategies:
                build_strategy(s.name, s.options).check(family, G, D)


def missing_files(matrix: Matrix, cells: list[Cell]) -> dict[str, str]:
    """Cell id -> why it cannot run on this machine: a file it needs is absent (a `$VAR` unset, a folder
    or checkpoint not there, a torchvision dataset not downloaded, Inception weights not local), with how
    to get it. Such cells are recorded as skipped and the others run: a preset for data that lives
    elsewhere (fewshot-ffhq) still runs what this machine has."""
    weights = missing_weights(matrix.metrics.extractor, matrix.metrics.inception_weights)
    out = {}
    for cell in cells:
        pair, checkpoint = cell.pair, _start_checkpoint(matrix, cell)
        reasons = [_data_missing(pair.target, "target"), _data_missing(pair.eval_target, "eval")]
        if checkpoint:
            reasons.append(_file_missing(checkpoint, "source checkpoint", directory=False))
        elif STRATEGIES.get(cell.strategy.name).loads_source:
            reasons.append(_data_missing(pair.source, "source"))
        reasons = [r for r in reasons if r] + ([weights] if weights else [])
        if reasons:
            out[cell.id] = reasons[0] + (f"; to get the files: {pair.fetch}" if pair.fetch else "")
    return out


def _start_checkpoint(matrix: Matrix, cell: Cell) -> str | None:
    """The checkpoint a cell's transfer starts from (the pair's, else train:'s); None for a cell that
    starts from a pretrained source or, like scratch, from nothing."""
    if not STRATEGIES.get(cell.strategy.name).loads_source:
        return None
    return cell.pair.source_checkpoint or matrix.train.get("source_checkpoint") or None


def _data_missing(spec: DataSpec, role: str) -> str | None:
    """Why the images of `spec` are not on this machine (None: they are, or ship with ganbench)."""
    from ganlib.data import data_root

    if spec.name == FOLDER:
        return _file_missing(spec.path, f"{role} folder", directory=True)
    entry = DATASETS.get(spec.name)
    if entry.directory is not None and not entry.directory(data_root()).exists():
        return (f"dataset {spec.name!r} is not under {entry.directory(data_root())}: put the files there (or set "
                f"$GANBENCH_DATA), or download them once with "
                f"`python -m ganlib.train --data {spec.name} --download --steps 1`")
    return None


def _file_missing(text: str, what: str, directory: bool) -> str | None:
    unset = unset_variables(text)
    if unset:
        return f"{what} {text} names ${unset[0]}, which is not set"
    path = expand_path(text, what)
    if not (path.is_dir() if directory else path.is_file()):
        return f"{what} {path} does not exist" + (f" (from {text})" if str(path) != text else "")
    return None


def check_data(matrix: Matrix, missing: dict[str, str] | None = None) -> None:
    """Fail early on data a cell cannot use (classes or n the data lacks, a folder target too small to
    score: FID/KID need MIN_SAMPLES real images), for the cells whose files are there (`missing`:
    missing_files' answer; those cells are skipped, not checked)."""
    from ganlib.data import list_image_files, load_images

    missing = missing or {}
    present = [c for c in matrix.cells() if c.id not in missing]
    specs = dict.fromkeys((spec, c.pair.channels, is_eval) for c in present
                          for spec, is_eval in ((c.pair.source, False), (c.pair.target, False),
                                                (c.pair.eval_target, True))
                          if spec is not None and _data_missing(spec, "") is None)
    checkpoints = dict.fromkeys((path, c.network, c.pair.channels) for c in present
                                if (path := _start_checkpoint(matrix, c)))
    for path, net, channels in checkpoints:  # another architecture or size, a truncated or pickled file: now
        cfg = NetConfig(net.name, net.size, channels, matrix.train.get("latent_dim", 100), net.width)
        load_source_checkpoint(path, cfg, *build_networks(cfg))
    for spec, channels, is_eval in specs:
        if spec.name == FOLDER:
            if is_eval:  # counted, not read: the field's test folders hold thousands of large images
                if (count := len(list_image_files(spec.path))) < MIN_SAMPLES:
                    raise UserError(f"target {str(spec)!r} holds {count} image(s); scoring a cell (FID/KID against "
                                    f"the whole target) needs at least {MIN_SAMPLES}: add images")
            else:
                load_images(spec, 8, channels)
        elif DATASETS.get(spec.name).embedded:
            load_images(spec, matrix.networks[0].size, channels)


def filter_cells(cells: list[Cell], only: str | None) -> list[Cell]:
    """Keep cells matching `--only key=glob,...` (same key: any of; different keys: all of)."""
    if not only:
        return cells
    wanted: dict[str, list[str]] = {}
    for part in only.split(","):
        key, sep, pattern = part.partition("=")
        if not sep or key not in ("strategy", "augment", "pair", "setup", "seed", "network", "cell"):
            raise UserError(f"--only {part!r}: expected key=pattern with key in strategy, augment, pair, setup, "
                            "seed, network, cell")
        wanted.setdefault(key, []).append(pattern)

    def value(cell: Cell, key: str) -> str:
        return {"strategy": cell.strategy.id, "augment": cell.augment.id, "pair": cell.pair.id, "setup": cell.setup,
                "seed": str(cell.seed), "network": cell.network.id, "cell": cell.id}[key]

    kept = [c for c in cells if all(any(fnmatch.fnmatchcase(value(c, k), p) for p in pats)
                                    for k, pats in wanted.items())]
    if not kept:
        raise UserError(f"--only {only!r} matches no cell of this matrix")
    return kept


def augments_help() -> list[tuple[str, str]]:
    """Each registered augmentation with its description and options (defaults), for `bench list`."""
    rows = []
    for n in AUGMENTS.names():
        options = ", ".join(f"{k}={v}" for k, v in build_augment(n).options_dict().items())
        rows.append((n, AUGMENTS.get(n).description + (f" [{options}]" if options else "")))
    return rows
