"""StyleGAN2 checkpoints in the format of rosinality/stylegan2-pytorch (CDC's and its successors' format).

Such a file is a `torch.save`d dict with the state dicts `g_ema`, `g` and `d` (and optimiser states,
`args`, ... which are ignored). It is read with `torch.load(weights_only=True)`: no code runs while
reading it; `argparse.Namespace` (the reference's `args`) is the one class allowed besides tensors.

Names map by prefix onto `ganlib.nets.stylegan2` (whose sub-module names follow the reference):
    style.{i+1}.       -> blocks.0.layers.{i}.          (mapping; style.0 is the parameter-free pixel norm)
    input.input        -> blocks.1.const
    conv1. / to_rgb1.  -> blocks.1.conv. / blocks.1.to_rgb.
    convs.{2k}. / convs.{2k+1}. / to_rgbs.{k}.  -> blocks.{k+2}.conv0. / .conv1. / .to_rgb.
    noises.noise_0 / noise_{2k+1} / noise_{2k+2} -> blocks.1.conv / blocks.{k+2}.conv0 / conv1 .noise_const
    D: convs. -> blocks.;  final_conv. -> head.conv.;  final_linear.0. / .1. -> head.fc. / head.out.
Modulated conv weights (`...conv.weight` in G) are [1, out, in, k, k] there and [out, in, k, k] here.
The reference also saves its resampling filters (`...kernel`); they are fixed by the architecture, so
they are checked against ours and not stored.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from ganlib.envpath import expand_path
from ganlib.errors import UserError
from ganlib.nets import NetConfig, build_networks
from ganlib.nets.stylegan2 import fir_kernel

FAMILY_NAME = "stylegan2"
STATE_KEYS = ("g_ema", "g", "d")

_G_RULES = [
    (r"style\.(\d+)\.(.+)", lambda m: f"blocks.0.layers.{int(m[1]) - 1}.{m[2]}"),
    (r"input\.input", lambda m: "blocks.1.const"),
    (r"conv1\.(.+)", lambda m: f"blocks.1.conv.{m[1]}"),
    (r"to_rgb1\.(.+)", lambda m: f"blocks.1.to_rgb.{m[1]}"),
    (r"convs\.(\d+)\.(.+)", lambda m: f"blocks.{int(m[1]) // 2 + 2}.conv{int(m[1]) % 2}.{m[2]}"),
    (r"to_rgbs\.(\d+)\.(.+)", lambda m: f"blocks.{int(m[1]) + 2}.to_rgb.{m[2]}"),
    (r"noises\.noise_0", lambda m: "blocks.1.conv.noise_const"),
    (r"noises\.noise_(\d+)",
     lambda m: f"blocks.{(int(m[1]) - 1) // 2 + 2}.conv{(int(m[1]) - 1) % 2}.noise_const"),
]
_D_RULES = [
    (r"convs\.(.+)", lambda m: f"blocks.{m[1]}"),
    (r"final_conv\.(.+)", lambda m: f"head.conv.{m[1]}"),
    (r"final_linear\.0\.(.+)", lambda m: f"head.fc.{m[1]}"),
    (r"final_linear\.1\.(.+)", lambda m: f"head.out.{m[1]}"),
]


def _is_filter(name: str) -> bool:
    return name.endswith(("blur.kernel", "upsample.kernel")) or re.fullmatch(r"convs\.\d+\.(conv2|skip)\.0\.kernel", name) is not None


def _reference_shape(ours: str, tensor: torch.Tensor, rules) -> tuple[int, ...]:
    """The reference's shape for our tensor `ours` (G's modulated conv weights carry a leading 1)."""
    modulated = rules is _G_RULES and ours.endswith("conv.weight")
    return (1, *tensor.shape) if modulated else tuple(tensor.shape)


def map_name(name: str, rules) -> str | None:
    """Our name for a reference name, or None when no rule matches."""
    for pattern, rename in rules:
        m = re.fullmatch(pattern, name)
        if m:
            return rename(m)
    return None


def read_checkpoint(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The `g_ema`, `g` and `d` state dicts of a reference checkpoint; UserError for anything else.
    `path` may name environment variables (`$GANBENCH_STYLEGAN2_FFHQ`: ganlib.envpath)."""
    path = expand_path(str(path), "--source-checkpoint")
    if not path.is_file():
        raise UserError(f"--source-checkpoint {path} does not exist; pass a rosinality-format .pt file")
    try:
        # torch warns about pickle protocols on odd input; the error below says what matters, once
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if refused:  # a well-formed pickle that names classes: loading it would run their code
            raise UserError(f"--source-checkpoint {path} cannot be read without running its code "
                            f"(weights-only load refused: {refused[0][:120]}); save plain state dicts") from None
        raise UserError(f"--source-checkpoint {path} is truncated or not a torch checkpoint "
                        f"(unpickling failed)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"--source-checkpoint {path} is truncated or not a torch checkpoint ({first})") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), dict) for k in STATE_KEYS):
        found = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise UserError(f"--source-checkpoint {path} is not a rosinality StyleGAN2 checkpoint: it needs the "
                        f"state dicts {', '.join(STATE_KEYS)}; found {found}")
    return {k: data[k] for k in STATE_KEYS}


def infer_config(g_state: dict[str, torch.Tensor], where: str = "checkpoint") -> NetConfig:
    """The `stylegan2` NetConfig a reference generator state dict was made with, read from shapes."""
    try:
        latent = g_state["style.1.weight"].shape[1]
        rgb_levels = len({k.split(".")[1] for k in g_state if k.startswith("to_rgbs.")})
        top = g_state[f"to_rgbs.{rgb_levels - 1}.conv.weight"] if rgb_levels else g_state["to_rgb1.conv.weight"]
    except (KeyError, IndexError, AttributeError):
        raise UserError(f"{where}: g_ema is not a StyleGAN2 generator (no style.1.weight / to_rgb layers)") from None
    size = 2 ** (rgb_levels + 2)
    channels, c_top = top.shape[1], top.shape[2]
    # channels_at(size, width) = min(8 width, 512 width / size): invert at the top resolution
    width = c_top * size // 512 if size > 64 else c_top // 8
    return NetConfig(FAMILY_NAME, size, channels, latent_dim=latent, width=max(width, 1))


def to_ganlib(state: dict[str, torch.Tensor], module: torch.nn.Module, rules, what: str) -> dict[str, torch.Tensor]:
    """Rename a reference state dict onto `module`'s names, strictly: every key must map, every
    tensor of `module` must be given, shapes must agree; the first problem is a one-line UserError."""
    own = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if _is_filter(name):
            if tensor.shape != (4, 4) or not (torch.allclose(tensor, fir_kernel()) or
                                              torch.allclose(tensor, fir_kernel(4.0))):
                raise UserError(f"{what}: {name} is not the [1, 3, 3, 1] resampling filter this network uses")
            continue
        ours = map_name(name, rules)
        if ours is None or ours not in own:
            raise UserError(f"{what}: key {name!r} has no counterpart in this stylegan2 network "
                            f"(another architecture or size?)")
        expected = _reference_shape(ours, own[ours], rules)
        if tuple(tensor.shape) != expected:
            raise UserError(f"{what}: key {name!r} has shape {tuple(tensor.shape)}, this network expects "
                            f"{expected} (another size or width?)")
        out[ours] = tensor.reshape(own[ours].shape)
    missing = [k for k in own if k not in out]
    if missing:
        raise UserError(f"{what}: this network's {missing[0]!r} is not in the checkpoint (another size?)")
    return out


def from_ganlib(module: torch.nn.Module, rules, reference_names: list[str]) -> dict[str, torch.Tensor]:
    """The reverse mapping: `module`'s tensors under the reference names (filters regenerated)."""
    own = module.state_dict()
    out = {}
    for name in reference_names:
        if _is_filter(name):
            out[name] = fir_kernel(4.0) if name.endswith(("blur.kernel", "upsample.kernel")) else fir_kernel()
        else:
            ours = map_name(name, rules)
            out[name] = own[ours].clone().reshape(_reference_shape(ours, own[ours], rules))
    return out


def load_source_checkpoint(path: str | Path, cfg: NetConfig, G: torch.nn.Module, D: torch.nn.Module) -> None:
    """Load a reference checkpoint into freshly built `G`, `D` of config `cfg` (G from `g_ema`, as CDC
    does; `g` is checked to have the same names and shapes). Nothing is changed on error."""
    if cfg.name != FAMILY_NAME:
        raise UserError(f"--source-checkpoint loads rosinality StyleGAN2 checkpoints and needs --net stylegan2, "
                        f"not --net {cfg.name}")
    states = read_checkpoint(path)
    found = infer_config(states["g_ema"], f"--source-checkpoint {path}")
    ours = (cfg.size, cfg.channels, cfg.latent_dim, cfg.width)
    theirs = (found.size, found.channels, found.latent_dim, found.width)
    if ours != theirs:
        raise UserError(f"--source-checkpoint {path} holds a {found.size} px, {found.channels}-channel StyleGAN2 with "
                        f"latent_dim {found.latent_dim} and width {found.width}; this run builds size={cfg.size}, "
                        f"channels={cfg.channels}, latent_dim={cfg.latent_dim}, width={cfg.width}: set "
                        f"--size {found.size} --latent-dim {found.latent_dim} --width {found.width}")
    n_mlp = len([k for k in states["g_ema"] if re.fullmatch(r"style\.\d+\.weight", k)])
    depth = len(G.blocks[0].layers)
    if n_mlp != depth:
        raise UserError(f"--source-checkpoint {path}: its mapping network has {n_mlp} layers, stylegan2 with "
                        f"latent_dim={cfg.latent_dim} has {depth}")
    g = to_ganlib(states["g_ema"], G, _G_RULES, f"--source-checkpoint {path} g_ema")
    to_ganlib(states["g"], G, _G_RULES, f"--source-checkpoint {path} g")
    d = to_ganlib(states["d"], D, _D_RULES, f"--source-checkpoint {path} d")
    G.load_state_dict(g, strict=True)
    D.load_state_dict(d, strict=True)


def export_checkpoint(G: torch.nn.Module, D: torch.nn.Module, g_names: list[str], d_names: list[str]) -> dict:
    """`G`, `D` as a reference-format dict (g_ema = g = G) under the given reference key lists."""
    g = from_ganlib(G, _G_RULES, g_names)
    return {"g_ema": g, "g": {k: v.clone() for k, v in g.items()}, "d": from_ganlib(D, _D_RULES, d_names)}


def build_from_checkpoint(path: str | Path):
    """(NetConfig, G, D) built from the shapes in a reference checkpoint and loaded from it."""
    states = read_checkpoint(path)
    cfg = infer_config(states["g_ema"], f"--source-checkpoint {path}")
    G, D = build_networks(cfg)
    load_source_checkpoint(path, cfg, G, D)
    return cfg, G, D
