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
    lam: float = 5e3            # weight of the EWC penalty (Li et al. use 5e8 on 256 px StyleGAN; our Fisher is larger)
    fisher_samples: int = 256   # latents used to estimate the Fisher information at the source weights
    fisher_batch: int = 16      # latents per gradient in the Fisher estimate (a per-batch estimator, see docs)


class EWC(Strategy):
    """All of G and D, with lambda * sum_i F_i (theta_i - theta_src_i)^2 on G (Li et al. 2020).

    F_i is the mean squared gradient of the G loss with respect to G's weights at the source weights,
    estimated over `fisher_samples` latents in batches of `fisher_batch` (BatchNorm needs batches).
    """

    name = "ewc"
    OptionsType = EWCOptions
    paper = "Few-shot image generation with elastic weight consolidation, Li et al. 2020"

    def validate(self) -> None:
        if self.options.lam < 0:
            raise UserError(f"ewc lam={self.options.lam} must be >= 0")
        if self.options.fisher_samples < 2 or self.options.fisher_batch < 2:
            raise UserError("ewc fisher_samples and fisher_batch must be >= 2")

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        G, D = ctx.G, ctx.D
        params = [p for p in G.parameters() if p.requires_grad]
        buffers = [b.clone() for b in (*G.buffers(), *D.buffers())]  # the estimate must not move BN stats
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 7919)
        fisher = [torch.zeros_like(p) for p in params]
        batches = max(1, self.options.fisher_samples // self.options.fisher_batch)
        for _ in range(batches):
            z = torch.randn(self.options.fisher_batch, G.latent_dim, device=ctx.device, generator=gen)
            loss = ctx.loss.g_loss(D(G(z)))
            grads = torch.autograd.grad(loss, params)
            torch._foreach_addcmul_(fisher, grads, grads, value=1.0 / batches)
        for b, saved in zip((*G.buffers(), *D.buffers()), buffers):
            b.copy_(saved)
        D.zero_grad(set_to_none=True)
        self.fisher = fisher
        self.anchor = [p.detach().clone() for p in params]

    def g_extra_losses(self, ctx: GStepContext) -> dict[str, torch.Tensor]:
        params = [p for p in ctx.G.parameters() if p.requires_grad]
        diffs = torch._foreach_sub([p.float() for p in params], self.anchor)
        terms = [(f * d * d).sum() for f, d in zip(self.fisher, diffs)]
        return {"ewc": self.options.lam * torch.stack(terms).sum()}


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

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        torch.manual_seed(ctx.seed + 31)
        self.extra_g_modules["miner"] = Miner(ctx.G.latent_dim, self.options.hidden or ctx.G.latent_dim)

    def stage1_steps(self) -> int:
        s = self.options.stage1_steps
        return self._total_steps // 2 if s == -1 else min(s, self._total_steps)

    def plan(self, step: int) -> StepPlan:
        return StepPlan(g_body=step >= self.stage1_steps())

    def map_latent(self, z: torch.Tensor, step: int | None) -> torch.Tensor:
        return self.extra_g_modules["miner"](z)


@dataclass
class CDCOptions(Options):
    kl_weight: float = 1000.0   # weight of the distance-consistency loss (the paper's lambda)
    g_block: int = -1           # G block whose activations are compared (-1 = the last block before the head)
    d_block: int = -2           # D block whose spatial feature feeds the patch-level head (-2 = second to last)
    anchors: int = 10           # anchor latents for image-level adversarial training (the paper's few-shot size)
    anchor_every: int = 4       # every this many steps the batch is drawn near the anchors (the paper's subspace_freq)
    anchor_std: float = 0.05    # spread of latents around an anchor


class CDC(Strategy):
    """Cross-domain distance consistency (Ojha et al. 2021).

    For the batch's latents, softmax over pairwise cosine similarities of a G block's activations;
    KL(target || frozen source G) weighted by `kl_weight`. D scores whole images on steps whose
    latents are drawn near a few anchors and patches (a 1x1 conv on an intermediate D feature)
    otherwise. Departure: one G block, not a random choice of layers per step.
    """

    name = "cdc"
    OptionsType = CDCOptions
    wants_g_features = True
    paper = "Few-shot image generation via cross-domain correspondence, Ojha et al. 2021"

    def validate(self) -> None:
        o = self.options
        if o.kl_weight < 0 or o.anchors < 1 or o.anchor_every < 1 or o.anchor_std < 0:
            raise UserError("cdc needs kl_weight >= 0, anchors >= 1, anchor_every >= 1, anchor_std >= 0")

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
        if ctx.batch_size < 4:
            raise UserError(f"cdc needs batch >= 4 latents for its similarity distribution (got {ctx.batch_size})")
        self.source_G = copy.deepcopy(ctx.G).requires_grad_(False)
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 104729)
        self.anchor_z = torch.randn(self.options.anchors, ctx.G.latent_dim, device=ctx.device, generator=gen)
        size = ctx.G.image_shape
        with torch.no_grad():
            _, feats = ctx.D(torch.zeros(2, *size, device=ctx.device), return_features=True)
        channels = feats[self.options.d_block].shape[1]
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
        feat = ctx.g_features[self.options.g_block].float().flatten(1)
        with torch.no_grad():
            self.source_G.train(ctx.G.training)
            _, src_feats = self.source_G(ctx.z, return_features=True)
            src = src_feats[self.options.g_block].float().flatten(1)
        log_p_target = F.log_softmax(_pairwise_cosine(feat), dim=1)
        log_p_source = F.log_softmax(_pairwise_cosine(src), dim=1)
        kl = (log_p_target.exp() * (log_p_target - log_p_source)).sum(1).mean()
        return {"cdc": self.options.kl_weight * kl}


def _pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of rows, the diagonal (self-similarity) removed: [N, N-1]."""
    x = F.normalize(x, dim=1)
    sim = x @ x.T
    n = sim.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return sim[mask].view(n, n - 1)
