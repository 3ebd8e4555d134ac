"""The one GAN training loop: Accelerate for devices, DDP and mixed precision; strategies steer it.

Run it:  python -m ganlib.train --net dcgan --data mnist5k --steps 300 --out runs/x
or the same under `accelerate launch` (any number of processes, any precision).

Each step is a list of phases as in stylegan2-ada: a D phase (`Trainer._d_phase`: adversarial loss,
lazy R1) and a G phase (`Trainer._g_phase`: adversarial loss plus the strategy's extra losses). The
strategy switches phases and trainable sets on and off; the loop never forks. D sees every image,
real or fake, through the configured augmentation (ganlib.augment), in both phases. Losses stay on
the device and are read back only every `log_every` steps, so there is no host sync inside a step.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import save_image
from tqdm.auto import tqdm

from ganlib import checkpoint as ckpt
from ganlib.augment import build_augment
from ganlib.config import ArgumentParser, TrainConfig, add_arguments, from_arguments
from ganlib.data import DataSpec, DeviceBatcher, load_images
from ganlib.distributed import (broadcast_buffers, broadcast_object, gather_floats, make_accelerator, shutdown,
                                unwrap)
from ganlib.errors import UserError, exit_on_user_error
from ganlib.preflight import check_free_space, check_writable
from ganlib.losses import LOSSES, PathLengthRegularizer, r1_penalty
from ganlib.measure import StepClock, peak_memory_gb, percentile, reset_peak_memory
from ganlib.nets import NETWORKS, NetConfig, build_networks
from ganlib.nets.rosinality import load_source_checkpoint
from ganlib.strategies import GStepContext, SetupContext, StepPlan, build_strategy

SAMPLE_GRID = 64  # images in the fixed-noise sample grid
SAMPLES_BYTES = 4 * 2**20  # room kept for samples.png, metrics.json and meta files, bytes


class TrainingDiverged(RuntimeError):
    """A loss became NaN or inf: the run is over, and a benchmark records the cell as failed."""


# An evaluation hook: (step, generator in eval mode, latent mapping) -> metrics dict or None.
EvalFn = Callable[[int, nn.Module, Callable[[torch.Tensor], torch.Tensor]], "dict[str, Any] | None"]
# A log hook: (curve name "train" or "fid", the row just appended to that curve). Called on every
# process as the rows come (losses every log_every steps, FID at each evaluation), so a caller can
# stream them (bench sends them to a live W&B run) without the library knowing where they go.
LogFn = Callable[[str, "dict[str, Any]"], None]


@dataclass
class Fakes:
    """One G forward, shared by a step's two phases."""

    z: torch.Tensor                              # latents G received (after the strategy's `map_latent`)
    images: torch.Tensor                         # G(z), with its graph when the G phase runs
    features: list[torch.Tensor] | None = None   # G's per-block activations when the strategy wants them


@dataclass
class TrainResult:
    """What a run produced; `metrics` uses the namespaced keys of results.jsonl."""

    metrics: dict[str, Any]
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    out: Path | None = None
    generator: nn.Module | None = None  # the trained G (the EMA when on), unwrapped, for evaluation
    map_latent: Callable[[torch.Tensor], torch.Tensor] | None = None  # z -> what G receives (MineGAN's miner)


def uses_channels_last(memory_format: str, device: torch.device) -> bool:
    """Whether conv nets run NHWC: `auto` picks it on CPU, where oneDNN ran the dcgan step 7-22% faster
    (1 thread, fp32 and bf16, widths 16 and 64); GPUs keep NCHW until it is measured there."""
    return memory_format == "channels_last" or (memory_format == "auto" and device.type == "cpu")


def to_channels_last(module: nn.Module) -> None:
    """NHWC weights in place. A weight with one channel in dim 1 (D's image-side conv, G's head) is
    both NCHW and NHWC; the conv backward returns its gradient with NCHW strides, so DDP copies that
    small gradient into its bucket each step and warns once. Keeping those weights NCHW instead made
    the whole step 8-10% slower (oneDNN then runs the first D layer NCHW), so we keep them NHWC and
    silence that one warning."""
    module.to(memory_format=torch.channels_last)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)


def _fingerprint_fields(cfg: TrainConfig) -> dict[str, Any]:
    """The fields that determine the weights (what `fingerprint` hashes)."""
    keep = cfg.key_fields()
    # Typed and with defaults filled in, so layers="2" (CLI), layers=2 (YAML) and no option hash alike.
    keep["strategy_options"] = build_strategy(cfg.strategy, cfg.strategy_options).options_dict()
    if cfg.augment == "none":  # runs from before the augmentation axis keep their fingerprint
        del keep["augment"], keep["augment_options"]
    else:
        keep["augment_options"] = build_augment(cfg.augment, cfg.augment_options).options_dict()
    return keep


def fingerprint(cfg: TrainConfig) -> str:
    """Hash of the fields that determine the weights (so a resume cannot mix two different runs)."""
    return hashlib.sha256(json.dumps(_fingerprint_fields(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _changed_field(written: dict[str, Any], cfg: TrainConfig) -> str:
    """`--lr-g 0.0002 (checkpoint) vs 0.001 (now)`: the first weight-determining field that differs."""
    now = _fingerprint_fields(cfg)
    for name, value in now.items():
        before = written.get(name, "absent")
        if name == "strategy_options" and isinstance(before, dict):
            try:
                before = build_strategy(written.get("strategy", cfg.strategy), before).options_dict()
            except UserError:
                pass
        if before != value:
            return f"--{name.replace('_', '-')} {before!r} in the checkpoint, {value!r} now"
    return "a field this version no longer records"


@contextmanager
def source_norm_stats(module: nn.Module, active: bool):
    """Inside: `module`'s BatchNorm layers normalise with their running (source) statistics and do
    not update them, as in eval mode; the rest of the module keeps its mode. Used while G is frozen
    (MineGAN's stage 1) or its statistics are fixed (scale_shift): in train mode a BatchNorm would
    re-normalise away any shift or scale of its input, such as the one a latent miner learns."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not active:
        yield
        return
    for m in norms:
        m.train(False)
    try:
        yield
    finally:
        for m in norms:
            m.train(True)


@contextmanager
def frozen_for_phase(accelerator, modules: list[nn.Module], params: list[nn.Parameter], active: bool):
    """Inside: `params` get no gradient and the `modules`' DDP skips its all-reduce, unless `active`."""
    if active:
        yield
        return
    for p in params:
        p.requires_grad_(False)
    try:
        with ExitStack() as stack:
            for module in modules:
                stack.enter_context(accelerator.no_sync(module))
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _trainable(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _make_optimizer(params: list[nn.Parameter], lr: float, cfg: TrainConfig) -> torch.optim.Optimizer:
    # A fused Adam is one kernel for all tensors (CPU and CUDA); frozen tensors are never given to it,
    # so they get no optimiser state. An empty list still needs an optimiser object for the loop.
    return torch.optim.Adam(params or [nn.Parameter(torch.zeros(1))], lr=lr, betas=(cfg.beta1, cfg.beta2),
                            fused=True)


def optimizer_state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes held in optimiser state tensors (Adam moments, steps)."""
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


class Trainer:
    """One training run on this process group: `step()` is one D+G step, `run()` the whole run.

    Construction checks every input before anything is written, builds the networks, applies the
    strategy (freezing, extra modules), prepares everything with Accelerate and restores a
    checkpoint when resuming. Every process must construct it and call the same methods.
    """

    def __init__(self, cfg: TrainConfig, accelerator=None, *, eval_fn: EvalFn | None = None,
                 log_fn: LogFn | None = None):
        cfg.validate()
        self.wall_start = time.perf_counter()
        self.cfg, self.eval_fn, self.log_fn = cfg, eval_fn, log_fn
        accelerator = self.accelerator = accelerator or make_accelerator(cfg.mixed_precision, compile=cfg.compile)
        device, rank, world = self.device, self.rank, self.world = (accelerator.device, accelerator.process_index,
                                                                      accelerator.num_processes)
        self.out = Path(cfg.out)

        # --- everything that can be wrong with the input is checked before anything is written ---
        self.loss = loss = LOSSES.get(cfg.loss)
        family = NETWORKS.get(cfg.net)
        self.strategy = strategy = build_strategy(cfg.strategy, cfg.strategy_options)
        self.augment = build_augment(cfg.augment, cfg.augment_options).to(device)
        channels = cfg.channels or DataSpec.parse(cfg.data).channels
        images = load_images(cfg.data, cfg.size, channels, root=cfg.data_root or None, download=cfg.download).images
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        net_cfg = NetConfig(cfg.net, cfg.size, channels, cfg.latent_dim, cfg.width)
        G, D = build_networks(net_cfg)
        strategy.check(family, G, D)
        if cfg.pl_weight > 0:
            PathLengthRegularizer.check(G, cfg.net)
        if strategy.loads_source and cfg.source_checkpoint:
            load_source_checkpoint(cfg.source_checkpoint, net_cfg, G, D)
        elif strategy.loads_source:
            if not cfg.source:
                raise UserError(f"strategy {cfg.strategy!r} transfers from a source: pass --source DIR "
                                "(a directory with generator.safetensors and discriminator.safetensors)")
            if not Path(cfg.source).is_dir():
                raise UserError(f"--source {cfg.source}: no such directory (give the directory holding "
                                "generator.safetensors and discriminator.safetensors)")
            ckpt.load_weights(Path(cfg.source) / "generator.safetensors", G, "source generator")
            ckpt.load_weights(Path(cfg.source) / "discriminator.safetensors", D, "source discriminator")
        self.resume_dir = self.out / "checkpoint"
        resume_from = ckpt.find_checkpoint(self.resume_dir) if cfg.resume else None
        meta: dict[str, Any] = {}
        if resume_from is not None:
            meta = ckpt.read_meta(resume_from)
            if meta.get("fingerprint") != fingerprint(cfg):
                raise UserError(f"{self.resume_dir} was written by a different configuration "
                                f"({_changed_field(meta.get('config') or {}, cfg)}); "
                                "resume with the same options or use another --out")
            written = (meta.get("num_processes", world), meta.get("mixed_precision", accelerator.mixed_precision))
            if written != (world, accelerator.mixed_precision):
                raise UserError(f"{self.resume_dir} was written by {written[0]} process(es) in precision "
                                f"{written[1]!r}, this run has {world} in {accelerator.mixed_precision!r}; "
                                "resume with the same setup")

        G.to(device)
        D.to(device)
        strategy.setup(SetupContext(G=G, D=D, family=family, loss=loss, device=device, seed=cfg.seed,
                                    total_steps=cfg.steps, batch_size=cfg.batch, num_images=len(images)))
        # The strategy's declared extra modules: the loop owns them from here and never writes them back.
        g_extras, d_extras = dict(strategy.extra_g_modules), dict(strategy.extra_d_modules)
        for extra in (*g_extras.values(), *d_extras.values()):
            extra.to(device)
        if images.dim() == 4 and uses_channels_last(cfg.memory_format, device):
            to_channels_last(G)
            to_channels_last(D)
        g_side = [G, *g_extras.values()]
        d_side = [D, *d_extras.values()]
        self.n_trainable = sum(p.numel() for m in g_side + d_side for p in m.parameters() if p.requires_grad)
        self.n_frozen = sum(p.numel() for m in g_side + d_side for p in m.parameters() if not p.requires_grad)
        opt_g = _make_optimizer(_trainable(g_side), cfg.lr_g, cfg)
        opt_d = _make_optimizer(_trainable(d_side), cfg.lr_d, cfg)
        self.ema = copy.deepcopy(G).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        _preflight(accelerator, self.out, output_bytes(g_side + d_side, [*opt_g.param_groups, *opt_d.param_groups],
                                                       self.ema))

        prepared = accelerator.prepare(G, D, *g_extras.values(), *d_extras.values(), opt_g, opt_d)
        self.G, self.D = prepared[0], prepared[1]
        # The prepared extras by name, which the strategy's hooks are handed (`map_latent`, `discriminate`,
        # GStepContext.extras) instead of the modules they declared.
        self.extras = dict(zip([*g_extras, *d_extras], prepared[2:-2]))
        self.opt_g, self.opt_d = prepared[-2], prepared[-1]
        self.g_body_params = [p for p in self.G.parameters() if p.requires_grad]
        self.d_modules = [self.D, *(self.extras[name] for name in d_extras)]
        self.d_params = _trainable(self.d_modules)

        self.batcher = DeviceBatcher(images, device, seed=cfg.seed * 1000 + rank)
        self.z_gen = torch.Generator(device=device)
        self.z_gen.manual_seed(cfg.seed * 1000 + 500 + rank)
        self.rngs = {"data": self.batcher.generator, "latent": self.z_gen}  # random streams a checkpoint keeps
        # Each process augments its own images with its own stream, as it draws its own data and latents.
        self.aug_gen = torch.Generator(device=device)
        self.aug_gen.manual_seed(cfg.seed * 1000 + 700 + rank)
        if cfg.augment != "none":  # checkpoints of runs without augmentation hold no such stream
            self.rngs["augment"] = self.aug_gen
        self.fixed_z = torch.randn(SAMPLE_GRID, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed)
                                   ).to(device)
        # fp16's loss scale is optimiser state too: without it a resumed run is not the same run.
        self.optimizer_states = {"G": self.opt_g.optimizer, "D": self.opt_d.optimizer,
                                 **({"scaler": accelerator.scaler} if accelerator.scaler is not None else {})}
        self.r1_scale = cfg.r1_gamma / 2 * cfg.r1_interval
        self.path_length = PathLengthRegularizer(cfg.pl_weight, cfg.pl_interval) if cfg.pl_weight > 0 else None
        self.fid_curve: list[dict[str, Any]] = []
        self.train_curve: list[dict[str, Any]] = []
        self.pending: list[dict[str, torch.Tensor]] = []
        self.train_seconds = 0.0
        self.start_step = 0
        if resume_from is not None:
            self._restore(resume_from, meta)

    def _restore(self, resume_from: Path, meta: dict[str, Any]) -> None:
        for name, module in self._saved_modules().items():
            ckpt.load_weights(resume_from / f"{name}.safetensors", module, f"checkpoint {name}")
        ckpt.load_optimizers(resume_from, self.optimizer_states)
        ckpt.set_rng_state(ckpt.load_rng(resume_from, self.rank), self.rngs)
        self.start_step = meta["step"]
        if "progress" in meta:
            progress = meta["progress"]
            self.train_seconds = progress["train_s"]
            self.train_curve.extend(progress["curves"]["train"])
            self.fid_curve.extend(progress["curves"]["fid"])
            self.pending = [{k: torch.tensor(v, device=self.device) for k, v in logs.items()}
                            for logs in progress["unread"]]
            self.augment.load_state_dict(progress.get("augment", {}), self.accelerator.is_main_process)
            if self.path_length is not None:
                self.path_length.mean = torch.tensor(progress["pl_mean"], device=self.device)

    def _saved_modules(self) -> dict[str, nn.Module]:
        """What a run saves, unwrapped, by file stem (`<stem>.safetensors`), in the final outputs and
        in every checkpoint alike: G, D, the strategy's extras and the EMA when on."""
        modules = {"generator": unwrap(self.accelerator, self.G), "discriminator": unwrap(self.accelerator, self.D),
                   **{k: unwrap(self.accelerator, m) for k, m in self.extras.items()}}
        if self.ema is not None:
            modules["generator_ema"] = self.ema
        return modules

    def save(self, step: int) -> None:
        """Checkpoint after `step` steps (every process calls it; the main process writes weights)."""
        accelerator = self.accelerator
        broadcast_buffers(accelerator, list(self._saved_modules().values()))
        # What a resumed run needs to report like an uninterrupted one: curves, seconds so far, and the
        # losses not yet read back (averaged over processes now, as `_read_logs` would have).
        unread = [dict(zip(sorted(logs), accelerator.reduce(torch.stack([logs[k].float() for k in sorted(logs)]),
                                                             reduction="mean").cpu().tolist())) for logs in self.pending]
        progress = {"train_s": self.train_seconds, "curves": {"train": self.train_curve, "fid": self.fid_curve},
                    "unread": unread, "augment": self.augment.state_dict(self._reduce_sum),
                    **({"pl_mean": self.path_length.mean.item()} if self.path_length is not None else {})}
        tmp = ckpt.begin_checkpoint(self.resume_dir) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        ckpt.write_rng(self.resume_dir.with_name(f".{self.resume_dir.name}.tmp"), self.rank,
                       ckpt.rng_state(self.rngs))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.finish_checkpoint(tmp, self.resume_dir, step=step, modules=self._saved_modules(),
                                   optimizers=self.optimizer_states,
                                   meta={"fingerprint": fingerprint(self.cfg), "config": self.cfg.to_dict(),
                                         "num_processes": self.world,
                                         "mixed_precision": accelerator.mixed_precision, "progress": progress})
        accelerator.wait_for_everyone()

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="sum")

    def _reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="mean")

    def eval_generator(self) -> nn.Module:
        """The generator to sample from: the EMA when on, else G itself, unwrapped."""
        return self.ema if self.ema is not None else unwrap(self.accelerator, self.G)

    def map_latent_eval(self, z: torch.Tensor) -> torch.Tensor:
        return self.strategy.map_latent(z, None, self.extras)

    def run_eval(self, step: int) -> None:
        if self.eval_fn is None:
            return
        broadcast_buffers(self.accelerator, [self.G, *([self.ema] if self.ema is not None else [])])
        gen = self.eval_generator()
        was_training = gen.training
        gen.eval()
        # The evaluation draws from the global random stream (StyleGAN2's noise inputs and style
        # mixing train from it too): fork it, so that how often a run evaluates cannot change its weights.
        cuda_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices):
            result = self.eval_fn(step, gen, self.map_latent_eval)
        gen.train(was_training)
        if result is not None:
            self.fid_curve.append({"step": step, "wall_s": round(self.train_seconds, 3), **result})
            if self.log_fn is not None:
                self.log_fn("fid", self.fid_curve[-1])

    def step(self, step: int) -> dict[str, torch.Tensor]:
        """One training step: the D phase, then the G phase, each when the strategy's plan runs it.

        As in stylegan2-ada's training loop, a phase is a loss, its lazy regulariser on the steps of
        its interval, and its optimiser's step, while the other side is frozen. Both phases use one
        G forward (`_generate`, as the PyTorch DCGAN example does): the D phase scores its images
        detached, the G phase back-propagates through them. Returns the step's losses, on the device.
        """
        plan = self.strategy.plan(step)
        logs: dict[str, torch.Tensor] = {}
        fakes = self._generate(step, plan) if plan.train_g else None
        if plan.train_d:
            self._d_phase(step, plan, fakes, logs)
        if plan.train_g:
            self._g_phase(step, plan, fakes, logs)
        self.augment.end_step(step, self._reduce_sum)
        logs.update(self.augment.logs())
        return logs

    @contextmanager
    def _g_as_planned(self, plan: StepPlan):
        """Inside: G as `plan` trains it: its BatchNorm on the source statistics when `g_source_stats`,
        its body frozen (no gradient, no DDP all-reduce) unless `g_body`."""
        with source_norm_stats(self.G, active=plan.g_source_stats), \
                frozen_for_phase(self.accelerator, [self.G], self.g_body_params, active=plan.g_body):
            yield

    def _generate(self, step: int, plan: StepPlan, grad: bool = True) -> Fakes:
        """Fakes from this step's latents; with `grad`, their graph for the G phase."""
        cfg, G, strategy = self.cfg, self.G, self.strategy
        z = torch.randn(cfg.batch, cfg.latent_dim, device=self.device, generator=self.z_gen)
        with self._g_as_planned(plan), torch.set_grad_enabled(grad), self.accelerator.autocast():
            z_in = strategy.map_latent(z, step, self.extras)
            images, features = G(z_in, return_features=True) if strategy.wants_g_features else (G(z_in), None)
        return Fakes(z=z_in, images=images, features=features)

    def _discriminate(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """D's logits for `images` after the augmentation, as the strategy scores them."""
        return self.strategy.discriminate(self.D, self.augment(images, self.aug_gen), step, self.extras)

    def _r1_due(self, step: int) -> bool:
        """Whether D's lazy regulariser (R1) runs at `step`: every `r1_interval` steps when on."""
        return self.cfg.r1_gamma > 0 and step % self.cfg.r1_interval == 0

    def _pl_due(self, step: int) -> bool:
        """Whether G's lazy regulariser (path length) runs at `step`: every `pl_interval` steps when on."""
        return self.path_length is not None and self.path_length.due(step)

    def _d_phase(self, step: int, plan: StepPlan, fakes: Fakes | None, logs: dict[str, torch.Tensor]) -> None:
        """D main (real vs fake) and, on R1 steps, D reg: R1 on the reals, scaled by its interval,
        added to the same backward (stylegan2-ada's Dboth); then D's optimiser step."""
        real = self.batcher.next(self.cfg.batch)
        fake = fakes.images.detach() if fakes is not None else self._generate(step, plan, grad=False).images
        r1 = self._r1_due(step)
        if r1:
            real.requires_grad_(True)
        with self.accelerator.autocast():
            # D sees only augmented images; R1 differentiates with respect to the reals before
            # augmentation, through it, as stylegan2-ada does.
            real_logits = self._discriminate(real, step)
            fake_logits = self._discriminate(fake, step)
            loss_d = self.loss.d_loss(real_logits, fake_logits)
            logs["loss/D"] = loss_d.detach()
            self.augment.observe(real_logits)
            if r1:
                penalty = r1_penalty(real_logits, real)
                logs["loss/D/r1"] = penalty.detach()
                loss_d = loss_d + penalty * self.r1_scale
        self.accelerator.backward(loss_d)
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)

    def _g_phase(self, step: int, plan: StepPlan, fakes: Fakes, logs: dict[str, torch.Tensor]) -> None:
        """G main: D's verdict on this step's fakes plus the strategy's extra losses, back-propagated
        with D frozen; on the steps of its interval, G reg (the path-length penalty), as R1 in
        `_d_phase`; then G's optimiser step and the EMA."""
        accelerator = self.accelerator
        with self._g_as_planned(plan), frozen_for_phase(accelerator, self.d_modules, self.d_params, active=False):
            with accelerator.autocast():
                loss_g = self.loss.g_loss(self._discriminate(fakes.images, step))
                logs["loss/G"] = loss_g.detach()
                extra = self.strategy.g_extra_losses(GStepContext(step=step, z=fakes.z, fake=fakes.images,
                                                                  g_features=fakes.features, G=self.G,
                                                                  extras=self.extras))
                for name, value in extra.items():
                    logs[f"loss/G/{name}"] = value.detach()
                    loss_g = loss_g + value
            accelerator.backward(loss_g)
            # G reg: its gradient joins this phase's optimiser step; not while G's own weights are frozen
            # (MineGAN's first stage trains the miner only: no path length of G's to regularise)
            if self._pl_due(step) and plan.g_body and self.g_body_params:
                with accelerator.autocast():
                    loss_pl, pl_logs = self.path_length.loss(self.G, fakes.z.detach(), self._reduce_mean)
                logs.update(pl_logs)
                accelerator.backward(loss_pl)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                src = unwrap(accelerator, self.G)
                torch._foreach_lerp_(list(self.ema.parameters()), list(src.parameters()), 1.0 - self.cfg.ema_decay)
                for b_ema, b in zip(self.ema.buffers(), src.buffers()):
                    b_ema.copy_(b)

    def run(self) -> TrainResult:
        """Train from `start_step` to `cfg.steps`, measuring as it goes; writes outputs (main process)."""
        cfg, accelerator, device = self.cfg, self.accelerator, self.device
        clock = StepClock(device, warmup=cfg.warmup_steps)
        step_flops = 0
        # The FLOP counter's module hooks cannot run inside autograd.grad, so skip a step where R1 or
        # the path-length penalty is due (none is counted when every step is one).
        flop_step = next((s for s in range(self.start_step, cfg.steps) if not (self._r1_due(s) or self._pl_due(s))), -1)
        reset_peak_memory(device)
        if self.eval_fn is not None and cfg.eval_every and self.start_step == 0:
            self.run_eval(0)
        bar = tqdm(total=cfg.steps, initial=self.start_step, desc=f"{cfg.strategy} {cfg.net}", unit="step",
                   disable=not (cfg.progress and accelerator.is_main_process), dynamic_ncols=True)
        self.G.train()
        self.D.train()
        for step in range(self.start_step, cfg.steps):
            step_t0 = time.perf_counter()
            clock.start()
            if step == flop_step:  # a warm-up step: counting FLOPs costs time, but it is not timed
                with FlopCounterMode(display=False) as flop_counter:
                    logs = self.step(step)
                step_flops = flop_counter.get_total_flops()
            else:
                logs = self.step(step)
            self.pending.append(logs)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                self.train_curve.append(_read_logs(accelerator, self.pending, done))
                self.pending = []
                if self.log_fn is not None:
                    self.log_fn("train", self.train_curve[-1])
                bar.set_postfix({k.split("/", 1)[1]: f"{v:.3g}" for k, v in self.train_curve[-1].items()
                                 if k.startswith("loss/")}, refresh=False)
            clock.stop()
            self.train_seconds += time.perf_counter() - step_t0
            bar.update(1)
            if self.eval_fn is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                self.run_eval(done)
            # after the evaluation, so a resumed run has its result and the random state that followed it
            if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != cfg.steps:
                self.save(done)
        bar.close()
        metrics = self._metrics(clock, step_flops)
        self.save(cfg.steps)
        if accelerator.is_main_process:
            _write_outputs(self.out, self._saved_modules(), self.eval_generator(), self.map_latent_eval, self.fixed_z)
        metrics["timing/wall_s"] = time.perf_counter() - self.wall_start
        metrics = broadcast_object(accelerator, metrics)  # step times and walls differ per process: the main's
        if accelerator.is_main_process:
            ckpt.atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=1))
        accelerator.wait_for_everyone()
        return TrainResult(metrics=metrics, curves={"train": self.train_curve, "fid": self.fid_curve}, out=self.out,
                           generator=self.eval_generator(), map_latent=self.map_latent_eval)

    def _metrics(self, clock: StepClock, step_flops: int) -> dict[str, Any]:
        cfg, accelerator, world = self.cfg, self.accelerator, self.world
        step_times = clock.step_times_s()
        timed = sum(step_times)
        img_per_s = None  # not measured: every step was a warm-up step
        times_all = gather_floats(accelerator, timed)
        if timed > 0 and max(times_all) > 0:
            img_per_s = clock.timed_steps * cfg.batch * world / max(times_all)
        peak, mem_kind = peak_memory_gb(self.device)
        peaks = gather_floats(accelerator, peak)
        metrics: dict[str, Any] = {
            "timing/img_per_s": img_per_s,
            "timing/step_time_p50_ms": percentile(step_times, 50) * 1e3 if step_times else None,
            "timing/step_time_p90_ms": percentile(step_times, 90) * 1e3 if step_times else None,
            "timing/timed_steps": clock.timed_steps,
            "timing/timed_s": max(times_all),  # slowest process's summed timed step seconds: img_per_s's divisor
            "timing/timed_s_per_process": times_all,
            "timing/train_s": self.train_seconds,
            "resources/peak_mem_gb": max(peaks),
            "resources/peak_mem_gb_per_process": peaks,
            "resources/mem_kind": mem_kind,
            "resources/optimizer_state_bytes": optimizer_state_bytes([self.opt_g.optimizer, self.opt_d.optimizer]),
            "perf/flops_per_step": step_flops,  # per process: matmul/conv FLOPs of one D+G step
            "perf/achieved_tflops": (step_flops * clock.timed_steps / timed / 1e12) if timed > 0 else None,
            "params/trainable": self.n_trainable,
            "params/frozen": self.n_frozen,
            "env/num_processes": world,
            "env/mixed_precision": accelerator.mixed_precision,
            "env/device": str(self.device),
        }
        if self.train_curve:
            metrics.update({k: v for k, v in self.train_curve[-1].items() if k.startswith("loss/")})
        return metrics


def output_bytes(modules: list[nn.Module], param_groups: list[dict], ema: nn.Module | None) -> int:
    """Bytes the run writes at most, estimated from the parameter counts, in bytes.

    Final weights (+ EMA), and a checkpoint: weights, EMA and Adam's two moments per trainable
    parameter (fp32); twice, since a new checkpoint is assembled beside the previous one.
    """
    tensor_bytes = lambda m: sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
    weights = sum(tensor_bytes(m) for m in modules) + (tensor_bytes(ema) if ema is not None else 0)
    moments = sum(2 * 4 * p.numel() for group in param_groups for p in group["params"])
    return weights + 2 * (weights + moments) + SAMPLES_BYTES


def _preflight(accelerator, out: Path, need_bytes: int) -> None:
    """Before any compute: `out` writable with room for `need_bytes` (the main process checks, all raise)."""
    problem = None
    if accelerator.is_main_process:
        try:
            check_writable(out, "--out", "choose a directory this job can write")
            check_free_space(out, need_bytes, "--out")
        except UserError as err:
            problem = str(err)
    problem = broadcast_object(accelerator, problem)
    if problem:
        raise UserError(problem)


def refuse_existing_out(out: Path, resume: bool, overwrite: bool) -> None:
    """A CLI run must not silently write over another run's files: --resume continues it, --overwrite replaces."""
    if out.is_dir() and not (resume or overwrite):
        existing = sorted(p.name for p in out.iterdir())
        if existing:
            raise UserError(f"--out {out} already holds a run ({', '.join(existing[:3])}); pass --resume to "
                            "continue it, --overwrite to write over it, or choose another --out")


def train(cfg: TrainConfig, accelerator=None, *, eval_fn: EvalFn | None = None,
          log_fn: LogFn | None = None) -> TrainResult:
    """Train G and D per `cfg` on this process group; every process must call it.

    `log_fn(curve, row)` sees each curve row as it is appended (see LogFn). Writes to `cfg.out` (main process): final weights as safetensors, `samples.png`, `metrics.json`,
    and `checkpoint/` every `ckpt_every` steps and at the end. Returns the same metrics everywhere.
    """
    return Trainer(cfg, accelerator, eval_fn=eval_fn, log_fn=log_fn).run()


def _read_logs(accelerator, pending: list[dict[str, torch.Tensor]], step: int) -> dict[str, Any]:
    """Average the pending losses over steps and processes with one host sync; raise on NaN/inf."""
    keys = sorted({k for logs in pending for k in logs})
    means = torch.stack([torch.stack([l[k].float() for l in pending if k in l]).mean() for k in keys])
    means = accelerator.reduce(means, reduction="mean").cpu().tolist()
    row = {"step": step, **dict(zip(keys, means))}
    bad = [k for k, v in zip(keys, means) if not torch.isfinite(torch.tensor(v))]
    if bad:
        raise TrainingDiverged(f"{bad[0]} became {row[bad[0]]} at step {step} (training diverged)")
    return row


def _write_outputs(out: Path, modules: dict[str, nn.Module], gen, map_latent, fixed_z) -> None:
    """Main process: final weights (`Trainer._saved_modules`; same parameter names as the source), a
    fixed-noise sample grid."""
    out.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        ckpt.save_weights(out / f"{name}.safetensors", module)
    was_training = gen.training
    gen.eval()
    with torch.no_grad():
        samples = gen(map_latent(fixed_z)).float()
    gen.train(was_training)
    tmp = out / ".samples.tmp.png"
    save_image(samples.clamp(-1, 1) * 0.5 + 0.5, tmp, nrow=8, padding=1)
    tmp.replace(out / "samples.png")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m ganlib.train", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_version()
    add_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out that already holds files (without --resume)")
    args = parser.parse_args(argv)
    cfg = from_arguments(args)
    accelerator = make_accelerator(cfg.mixed_precision, compile=cfg.compile)
    problem = None
    if accelerator.is_main_process:  # decided once: another rank's check could see this run's own files
        try:
            refuse_existing_out(Path(cfg.out), cfg.resume, args.overwrite)
        except UserError as err:
            problem = str(err)
    problem = broadcast_object(accelerator, problem)
    if problem:
        raise UserError(problem)
    try:
        result = train(cfg, accelerator)
    except TrainingDiverged as err:
        if accelerator.is_main_process:
            print(f"error: {err}", file=sys.stderr, flush=True)
        shutdown(accelerator)
        return 1
    if accelerator.is_main_process:
        m = result.metrics
        speed = "n/a (no step after the warm-up)" if m["timing/img_per_s"] is None else f"{m['timing/img_per_s']:.1f}"
        p50 = "n/a" if m["timing/step_time_p50_ms"] is None else f"{m['timing/step_time_p50_ms']:.1f}"
        print(f"done: {speed} img/s over {m['env/num_processes']} process(es), "
              f"step p50 {p50} ms, peak mem {m['resources/peak_mem_gb']:.2f} GB "
              f"({m['resources/mem_kind']}), precision {m['env/mixed_precision']}; wrote {result.out}")
    shutdown(accelerator)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
