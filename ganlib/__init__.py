"""ganlib: GAN networks, datasets, transfer strategies, metrics and one Accelerate training loop."""

__version__ = "0.1.0"
