"""Strategies that add a loss or a module: ewc, minegan, cdc."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ganlib.errors import UserError
from ganlib.strategies.base import GStepContext, Options, SetupContext, StepPlan, Strategy


@dataclass
class EWCOptions(Options):
    lam: float = 370.0          # weight of the EWC penalty, calibrated for our per-sample Fisher (docs/strategies.md)
    fisher_samples: int = 256   # latents whose per-sample gradients estimate the Fisher at the source weights
    fisher_batch: int = 64      # latents per vectorised chunk of the estimate (memory only: the result is the same)


class EWC(Strategy):
    """All of G and D, with lambda * sum_i F_i (theta_i - theta_src_i)^2 on G (Li et al. 2020).

    F_i is the mean over `fisher_samples` latents of the squared per-sample gradient of the G loss
    with respect to G's weights, at the source weights: the empirical Fisher, as in the paper.
    Per-sample gradients need G and D to score one image at a time, so their BatchNorm statistics are
    fixed for the estimate (`fisher_mode`). Fisher and anchor are fp32 on the training device,
    identical on every process (same seed).
    """

    name = "ewc"
    OptionsType = EWCOptions
    paper = "Few-shot image generation with elastic weight consolidation, Li et al. 2020"

    def validate(self) -> None:
        if self.options.lam < 0:
            raise UserError(f"ewc lam={self.options.lam} must be >= 0")
        if self.options.fisher_samples < 1 or self.options.fisher_batch < 1:
            raise UserError(f"ewc fisher_samples={self.options.fisher_samples} and "
                            f"fisher_batch={self.options.fisher_batch} must both be >= 1")

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        G = ctx.G
        named = {n: p for n, p in G.named_parameters() if p.requires_grad}
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 7919)
        z = torch.randn(self.options.fisher_samples, G.latent_dim, device=ctx.device, generator=gen)
        with fisher_mode(G, ctx.D, z, self.options.fisher_batch):
            fisher = per_sample_fisher(G, ctx.D, ctx.loss.g_loss, list(named), z, self.options.fisher_batch)
        # Which of G's parameters the penalty holds near the source, by position: each step reads them
        # from the G it is handed (prepared wrappers list their module's parameters in the same order).
        self.penalised = [p.requires_grad for p in G.parameters()]
        self.fisher = [fisher[n] for n in named]
        self.anchor = [p.detach().float().clone() for p in named.values()]

    def g_extra_losses(self, ctx: GStepContext) -> dict[str, torch.Tensor]:
        params = [p for p, penalised in zip(ctx.G.parameters(), self.penalised) if penalised]
        penalty = sum((f * (p.float() - a).square()).sum()
                      for p, f, a in zip(params, self.fisher, self.anchor))
        return {"ewc": self.options.lam * penalty}


@contextmanager
def fisher_mode(G: nn.Module, D: nn.Module, z: torch.Tensor, chunk: int):
    """Inside: G and D score one image at a time, as per-sample gradients need, with fixed BatchNorm
    statistics: G's are its running (source) statistics; D's are the statistics of the source G's
    fakes for `z` (one no-grad pass, averaged over chunks of `chunk`), because in training D
    normalises batches of fakes by their own statistics (its running statistics are never read, and
    can be far from them). Every mode and buffer of G and D is restored on the way out.
    """
    modes = [(m, m.training) for m in (*G.modules(), *D.modules())]
    buffers = [(b, b.clone()) for b in (*G.buffers(), *D.buffers())]
    norms = [m for m in D.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    try:
        G.eval()
        D.eval()
        with torch.no_grad():
            fakes = [G(part) for part in z.split(chunk)]
            for m in norms:  # only BatchNorm in train mode: no spectral-norm power iteration runs
                m.train()
                m.momentum = None  # a plain average over the chunks
                m.reset_running_stats()
            for images in fakes:
                D(images)
            for m in norms:
                m.eval()
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in modes:
            m.training = training


def per_sample_fisher(G: nn.Module, D: nn.Module, g_loss, names: list[str], z: torch.Tensor,
                      chunk: int) -> dict[str, torch.Tensor]:
    """Mean over the rows of `z` of the squared gradient of g_loss(D(G(z_i))) for G's parameters `names`.

    One latent at a time, vectorised (torch.func: functional_call + vmap(grad)), `chunk` latents per
    call; G and D must be in a mode that scores single images (`fisher_mode`). fp32 results shaped
    like the parameters.
    """
    state = {**{n: t.detach() for n, t in G.named_parameters()}, **dict(G.named_buffers())}
    trained = {n: state.pop(n) for n in names}

    def loss_one(params: dict[str, torch.Tensor], z1: torch.Tensor) -> torch.Tensor:
        images = functional_call(G, {**state, **params}, (z1.unsqueeze(0),))
        return g_loss(D(images))

    # randomness="different": a generator with noise inputs (stylegan2) draws each sample's own noise
    per_sample = vmap(grad(loss_one), in_dims=(None, 0), randomness="different")
    fisher = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in trained.items()}
    for part in z.split(chunk):
        with torch.no_grad():  # torch.func.grad ignores an outer no_grad; D's weights get no graph
            grads = per_sample(trained, part)
        for n, g in grads.items():
            fisher[n].add_(g.detach().float().square().sum(0))
    return {n: f / z.shape[0] for n, f in fisher.items()}


@dataclass
class MineGANOptions(Options):
    stage1_steps: int = -1   # steps of stage 1 (miner and D train, G frozen); -1 = half the transfer steps
    hidden: int = 0          # miner hidden width; 0 = the latent size


class Miner(nn.Module):
    """z -> z + MLP(z), the MLP's last layer zero-initialised so mining starts at the source prior."""

    def __init__(self, latent_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, latent_dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.net(z)


class MineGAN(Strategy):
    """A miner network before G: stage 1 trains miner and D (G frozen), stage 2 miner, G and D.

    In stage 1 G's BatchNorm layers run with the source statistics (eval mode): the paper's
    generators have no BatchNorm, and a train-mode BatchNorm would normalise the miner's shift and
    scale of the latents away, so nothing the miner learns would reach the images.
    Departure: the paper's miner is a plain MLP; ours is residual with a zero-initialised output so
    that step 0 reproduces the source generator exactly.
    """

    name = "minegan"
    OptionsType = MineGANOptions
    paper = "MineGAN, Wang et al. 2020"

    def validate(self) -> None:
        if self.options.stage1_steps < -1:
            raise UserError(f"minegan stage1_steps={self.options.stage1_steps} must be >= 0 (or -1 for half)")
        if self.options.hidden < 0:
            raise UserError(f"minegan hidden={self.options.hidden} must be >= 1 (or 0 for the latent size)")

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global RNG alone
            torch.manual_seed(ctx.seed + 31)
            self.extra_g_modules["miner"] = Miner(ctx.G.latent_dim, self.options.hidden or ctx.G.latent_dim)

    def stage1_steps(self) -> int:
        """Steps in stage 1 (G frozen), at most the run's steps."""
        s = self.options.stage1_steps
        return self._total_steps // 2 if s == -1 else min(s, self._total_steps)

    def plan(self, step: int) -> StepPlan:
        stage2 = step >= self.stage1_steps()
        return StepPlan(g_body=stage2, g_source_stats=not stage2)

    def map_latent(self, z: torch.Tensor, step: int | None, extras: Mapping[str, nn.Module]) -> torch.Tensor:
        return extras["miner"](z)


@dataclass
class CDCOptions(Options):
    kl_weight: float = 1000.0   # weight of the distance-consistency loss (the paper's kl_wt)
    pairs: int = 4              # latents whose pairwise similarities are compared (the paper's feat_const_batch)
    g_block: int = -1           # G block whose activations are compared (-1 = the last block before the head)
    d_block: int = 0            # D block whose spatial map feeds the patch head (0 = first, highest resolution)
    anchors: int = 0            # anchor latents for image-level adversarial loss; 0 = one per training image
    anchor_every: int = 4       # every this many steps the batch is drawn near the anchors (the paper's subspace_freq)
    anchor_std: float = 0.1     # spread of latents around an anchor (the official subspace_std default)


class CDC(Strategy):
    """Cross-domain distance consistency (Ojha et al. 2021).

    For the first `pairs` latents of the G batch, softmax over each one's cosine similarities to the
    others, computed on a G block's activations; the loss is KL(target || frozen source G), averaged
    over the pairs x (pairs - 1) entries as the paper's code does, times `kl_weight`. D scores whole
    images on steps whose latents are drawn near the anchors (one per training image) and patches
    otherwise: a 3x3 conv head on a shallow, high-resolution D feature, as the official code's
    `Extra` on its 32x32 or 16x16 map. Departures: docs/strategies.md.
    """

    name = "cdc"
    OptionsType = CDCOptions
    wants_g_features = True
    paper = "Few-shot image generation via cross-domain correspondence, Ojha et al. 2021"

    def validate(self) -> None:
        o = self.options
        if o.kl_weight < 0 or o.pairs < 4 or o.anchors < 0 or o.anchor_every < 1 or o.anchor_std < 0:
            raise UserError(f"cdc needs kl_weight >= 0, pairs >= 4, anchors >= 0, anchor_every >= 1 and "
                            f"anchor_std >= 0; got {self.options_dict()}")

    def check(self, family, G: nn.Module, D: nn.Module) -> None:
        if not family.spatial_d_features:
            raise UserError(f"cdc needs a discriminator with a spatial feature map for its patch-level loss; "
                            f"{family.name} has none (use dcgan or resnet)")
        for which, blocks, index in (("g_block", G.blocks, self.options.g_block),
                                     ("d_block", D.blocks, self.options.d_block)):
            if not -len(blocks) <= index < len(blocks):
                raise UserError(f"cdc {which}={index} is out of range for {family.name} ({len(blocks)} blocks)")

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        if ctx.batch_size < self.options.pairs:
            raise UserError(f"cdc compares pairs={self.options.pairs} latents of each batch but batch="
                            f"{ctx.batch_size}; use batch >= {self.options.pairs} or fewer pairs")
        self.g_block = self.options.g_block % len(ctx.G.blocks)
        # Only the blocks up to the compared one are needed from the frozen source generator.
        self.source_blocks = copy.deepcopy(ctx.G.blocks[: self.g_block + 1]).requires_grad_(False)
        anchors = self.options.anchors or ctx.num_images
        if anchors < 1:
            raise UserError("cdc anchors=0 means one anchor per training image, but the number of images is "
                            "unknown here; set anchors >= 1")
        self.features_through = ctx.G.features_through  # how this family chains blocks (stylegan2 passes w and skips)
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 104729)
        self.anchor_z = torch.randn(anchors, ctx.G.latent_dim, device=ctx.device, generator=gen)
        self.seed = ctx.seed
        was_training = ctx.D.training
        with torch.no_grad():  # a shape probe in eval mode, so D's buffers (BN stats, SN vectors) stay put
            ctx.D.eval()
            _, feats = ctx.D(torch.zeros(2, *ctx.G.image_shape, device=ctx.device), return_features=True)
            ctx.D.train(was_training)
        if feats[self.options.d_block].dim() != 4:
            raise UserError(f"cdc d_block={self.options.d_block} of {ctx.family.name} is not a spatial map; "
                            "pick a convolutional block")
        channels = feats[self.options.d_block].shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + 17)
            self.extra_d_modules["patch_head"] = nn.Conv2d(channels, 1, kernel_size=3, padding=1)

    def _anchor_step(self, step: int | None) -> bool:
        return step is not None and step % self.options.anchor_every == 0

    def map_latent(self, z: torch.Tensor, step: int | None, extras: Mapping[str, nn.Module]) -> torch.Tensor:
        if not self._anchor_step(step):
            return z
        # A random anchor per latent, as the official code; drawn from (seed, step) so that it needs no
        # random state of its own (a resumed run draws the same), perturbed by a scaled copy of z.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(self.anchor_z.shape[0], (z.shape[0],), generator=gen).to(z.device)
        return self.anchor_z[idx] + self.options.anchor_std * z

    def discriminate(self, D: nn.Module, images: torch.Tensor, step: int,
                     extras: Mapping[str, nn.Module]) -> torch.Tensor:
        logits, feats = D(images, return_features=True)
        patches = extras["patch_head"](feats[self.options.d_block]).flatten(1)
        # Both heads stay in the graph (the unused one with weight 0) so DDP sees every parameter used.
        if self._anchor_step(step):
            return logits + 0.0 * patches.sum()
        return patches + 0.0 * logits.sum()

    def g_extra_losses(self, ctx: GStepContext) -> dict[str, torch.Tensor]:
        n = self.options.pairs
        target = ctx.g_features[self.g_block][:n].float().flatten(1)
        with torch.no_grad():
            # The whole batch goes through the source blocks so BatchNorm sees the same batch
            # statistics as in the target forward; only the first n rows are compared.
            self.source_blocks.train(ctx.G.training)
            source = self.features_through(self.source_blocks, ctx.z)[:n].float().flatten(1)
        log_p_target = F.log_softmax(_pairwise_cosine(target), dim=1)
        log_p_source = F.log_softmax(_pairwise_cosine(source), dim=1)
        kl = (log_p_target.exp() * (log_p_target - log_p_source)).mean()
        return {"cdc": self.options.kl_weight * kl}


def _pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of rows, the diagonal (self-similarity) removed: [N, N-1]."""
    x = F.normalize(x, dim=1)
    sim = x @ x.T
    n = sim.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return sim[mask].view(n, n - 1)
