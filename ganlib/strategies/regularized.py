"""Strategies that add a loss or a module: ewc, minegan, cdc."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ganlib.errors import UserError
from ganlib.strategies.base import GStepContext, Options, SetupContext, StepPlan, Strategy


@dataclass
class EWCOptions(Options):
    lam: float = 1e3            # weight of the EWC penalty, calibrated for our Fisher estimator (docs/strategies.md)
    fisher_samples: int = 256   # latents used to estimate the Fisher information at the source weights
    fisher_batch: int = 16      # latents per gradient in the Fisher estimate (a per-batch estimator, see docs)


class EWC(Strategy):
    """All of G and D, with lambda * sum_i F_i (theta_i - theta_src_i)^2 on G (Li et al. 2020).

    F_i is the mean squared gradient of the G loss with respect to G's weights at the source weights,
    estimated over `fisher_samples` latents in batches of `fisher_batch` (BatchNorm needs batches).
    Fisher and anchor are fp32 on the training device, identical on every process (same seed).
    """

    name = "ewc"
    OptionsType = EWCOptions
    paper = "Few-shot image generation with elastic weight consolidation, Li et al. 2020"

    def validate(self) -> None:
        if self.options.lam < 0:
            raise UserError(f"ewc lam={self.options.lam} must be >= 0")
        if self.options.fisher_samples < 2 or self.options.fisher_batch < 2:
            raise UserError(f"ewc fisher_samples={self.options.fisher_samples} and "
                            f"fisher_batch={self.options.fisher_batch} must both be >= 2")

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        G, D = ctx.G, ctx.D
        params = [p for p in G.parameters() if p.requires_grad]
        buffers = [b.clone() for b in (*G.buffers(), *D.buffers())]  # the estimate must not move BN stats
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 7919)
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        batch = min(self.options.fisher_batch, self.options.fisher_samples)
        batches = max(1, self.options.fisher_samples // batch)
        for _ in range(batches):
            z = torch.randn(batch, G.latent_dim, device=ctx.device, generator=gen)
            loss = ctx.loss.g_loss(D(G(z)))
            grads = torch.autograd.grad(loss, params)
            for f, g in zip(fisher, grads):
                f.add_(g.float().square(), alpha=1.0 / batches)
        with torch.no_grad():
            for b, saved in zip((*G.buffers(), *D.buffers()), buffers):
                b.copy_(saved)
        self.params = params  # the same Parameter objects train later (DDP wraps, it does not copy)
        self.fisher = fisher
        self.anchor = [p.detach().float().clone() for p in params]

    def g_extra_losses(self, ctx: GStepContext) -> dict[str, torch.Tensor]:
        penalty = sum((f * (p.float() - a).square()).sum()
                      for p, f, a in zip(self.params, self.fisher, self.anchor))
        return {"ewc": self.options.lam * penalty}


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
        return StepPlan(g_body=step >= self.stage1_steps())

    def map_latent(self, z: torch.Tensor, step: int | None) -> torch.Tensor:
        return self.extra_g_modules["miner"](z)


@dataclass
class CDCOptions(Options):
    kl_weight: float = 1000.0   # weight of the distance-consistency loss (the paper's kl_wt)
    pairs: int = 4              # latents whose pairwise similarities are compared (the paper's feat_const_batch)
    g_block: int = -1           # G block whose activations are compared (-1 = the last block before the head)
    d_block: int = -2           # D block whose spatial feature feeds the patch-level head (-2 = second to last)
    anchors: int = 10           # anchor latents for image-level adversarial training (the paper's few-shot size)
    anchor_every: int = 4       # every this many steps the batch is drawn near the anchors (the paper's subspace_freq)
    anchor_std: float = 0.05    # spread of latents around an anchor (the paper's subspace_std)


class CDC(Strategy):
    """Cross-domain distance consistency (Ojha et al. 2021).

    For the first `pairs` latents of the G batch, softmax over each one's cosine similarities to the
    others, computed on a G block's activations; the loss is KL(target || frozen source G), averaged
    over the pairs x (pairs - 1) entries as the paper's code does, times `kl_weight`. D scores whole
    images on steps whose latents are drawn near a few anchors and patches (a 1x1 conv on an
    intermediate D feature) otherwise. Departure: one G block, not a random layer per latent.
    """

    name = "cdc"
    OptionsType = CDCOptions
    wants_g_features = True
    paper = "Few-shot image generation via cross-domain correspondence, Ojha et al. 2021"

    def validate(self) -> None:
        o = self.options
        if o.kl_weight < 0 or o.pairs < 4 or o.anchors < 1 or o.anchor_every < 1 or o.anchor_std < 0:
            raise UserError(f"cdc needs kl_weight >= 0, pairs >= 4, anchors >= 1, anchor_every >= 1 and "
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
        self.features_through = ctx.G.features_through  # how this family chains blocks (stylegan2 passes w and skips)
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 104729)
        self.anchor_z = torch.randn(self.options.anchors, ctx.G.latent_dim, device=ctx.device, generator=gen)
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
            self.extra_d_modules["patch_head"] = nn.Conv2d(channels, 1, kernel_size=1)

    def _anchor_step(self, step: int | None) -> bool:
        return step is not None and step % self.options.anchor_every == 0

    def map_latent(self, z: torch.Tensor, step: int | None) -> torch.Tensor:
        if not self._anchor_step(step):
            return z
        # Deterministic in z (no extra random state): anchor i, perturbed by a scaled copy of z.
        idx = torch.arange(z.shape[0], device=z.device) % self.anchor_z.shape[0]
        return self.anchor_z[idx] + self.options.anchor_std * z

    def discriminate(self, D: nn.Module, images: torch.Tensor, step: int) -> torch.Tensor:
        logits, feats = D(images, return_features=True)
        patches = self.extra_d_modules["patch_head"](feats[self.options.d_block]).flatten(1)
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
