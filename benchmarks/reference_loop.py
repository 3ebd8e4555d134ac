"""The plain PyTorch DCGAN loop as people write it after the PyTorch examples: the reference.

A torchvision-style dataset with per-sample ToTensor/Normalize, a DataLoader, BCE-with-logits,
two Adam optimisers, no Accelerate. Same `dcgan` network and batch as ours; our numbers are
reported as ratios to it, measured in the same process run.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class GreyImages(Dataset):
    """uint8 [N, 1, H, W] images served one PIL image at a time, as torchvision datasets do."""

    def __init__(self, images: torch.Tensor):
        self.images = images[:, 0].numpy()
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(np.asarray(self.images[i]), mode="L")), 0


class ReferenceLoop:
    """One `step()` = one D update on real+fake and one G update, PyTorch-example style."""

    def __init__(self, G: nn.Module, D: nn.Module, images: torch.Tensor, batch: int, device="cpu", seed: int = 0):
        torch.manual_seed(seed)
        self.G, self.D, self.device, self.batch = G.to(device), D.to(device), device, batch
        self.loader = DataLoader(GreyImages(images), batch_size=batch, shuffle=True, drop_last=True)
        self.batches = iter(self.loader)
        self.criterion = nn.BCEWithLogitsLoss()
        self.opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.latent_dim = G.latent_dim

    def _next_real(self) -> torch.Tensor:
        try:
            real, _ = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            real, _ = next(self.batches)
        return real.to(self.device)

    def step(self) -> None:
        real = self._next_real()
        b = real.size(0)
        ones = torch.ones(b, device=self.device)
        zeros = torch.zeros(b, device=self.device)
        # (1) D: maximise log D(x) + log(1 - D(G(z)))
        self.D.zero_grad()
        err_real = self.criterion(self.D(real), ones)
        err_real.backward()
        noise = torch.randn(b, self.latent_dim, device=self.device)
        fake = self.G(noise)
        err_fake = self.criterion(self.D(fake.detach()), zeros)
        err_fake.backward()
        self.opt_d.step()
        # (2) G: maximise log D(G(z))
        self.G.zero_grad()
        err_g = self.criterion(self.D(fake), ones)
        err_g.backward()
        self.opt_g.step()
        self.last_losses = (err_real + err_fake, err_g)
