"""Tests for ganlib/strategies: every registered strategy trains exactly what the issue's table says.

Each strategy runs a few steps from one tiny source checkpoint (pretrained once per session through
the source cache) and the tensors are compared bitwise: the parameters the table freezes are
unchanged, every other one changed, checked at the phase boundary too for the strategies that
change what trains mid-run. The table lives here, written from the issue, not read from the code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ganlib.train as train_module
from ganlib.config import TrainConfig
from ganlib.errors import USER_ERROR_EXIT_CODE, UserError
from ganlib.nets import NETWORKS, NetConfig, build_networks
from ganlib.pretrain import pretrain_source
from ganlib.strategies import STRATEGIES, build_strategy
from ganlib.train import train

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DATA = "mnist5k:classes=0-4"
TARGET_DATA = "mnist5k:classes=5-9:n=25"
TINY = dict(width=8, latent_dim=16, batch=8, log_every=1, warmup_steps=0, progress=False, seed=0)
FAMILIES = {"dcgan": dict(net="dcgan", size=28), "resnet": dict(net="resnet", size=32),
            "mlp": dict(net="mlp", size=28), "stylegan2": dict(net="stylegan2", size=32)}
STEPS = 4  # transfer steps; the phase boundary of two_phase and minegan is at STEPS // 2
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run as fast on one intra-op thread; two threads that spin-wait on a busy
    two-core machine made the same runs 10-30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the table, as sets of frozen parameter names -----------------------------------------
# Each strategy is a list of segments (from, to, what is frozen in between), with the points "start"
# (step 0), "boundary" (step steps // 2, where two_phase and minegan switch) and "end" (the output
# files). A frozen name is ("generator" | "discriminator" | extra name, parameter name).

def _names(module: nn.Module, prefix: str) -> set[tuple[str, str]]:
    return {(prefix, n) for n, _ in module.named_parameters()}


def _none(G, D, options):
    return set()


def _all_g(G, D, options):
    return _names(G, "generator")


def _all_d(G, D, options):
    return _names(D, "discriminator")


def _d_input_blocks(G, D, options):
    k = options.get("layers", 1)
    return {("discriminator", n) for n, _ in D.named_parameters()
            if any(n.startswith(f"blocks.{i}.") for i in range(k))}


def _g_except_norm_affine(G, D, options):
    norm = {f"{mn}.{pn}" for mn, m in G.named_modules() if isinstance(m, NORM_TYPES)
            for pn, _ in m.named_parameters(recurse=False)}
    # StyleGAN2 has no normalisation layers: the issue names its style affines (`modulation`) instead.
    return {("generator", n) for n, _ in G.named_parameters() if n not in norm and ".modulation." not in n}


Segment = tuple[str, str, Callable]
TABLE: dict[str, list[Segment]] = {
    "scratch": [("start", "end", _none)],
    "finetune": [("start", "end", _none)],
    "freeze_d": [("start", "end", _d_input_blocks)],
    "two_phase": [("start", "boundary", _all_g), ("boundary", "end", _all_d)],
    "scale_shift": [("start", "end", _g_except_norm_affine)],
    "ewc": [("start", "end", _none)],
    "minegan": [("start", "boundary", _all_g), ("boundary", "end", _none)],
    "cdc": [("start", "end", _none)],
}


def options_for(strategy: str, steps: int) -> dict[str, Any]:
    """Options that put the phase boundary of two_phase and minegan at steps // 2 (and a cheap Fisher)."""
    return {"two_phase": {"split": 0.5}, "minegan": {"stage1_steps": steps // 2},
            "ewc": {"fisher_samples": 32, "fisher_batch": 8}}.get(strategy, {})


def points_of(snapshots: dict[int, Any], steps: int) -> dict[str, Any]:
    return {"start": snapshots[0], "boundary": snapshots[steps // 2], "end": snapshots[steps]}
EXTRA_LOSSES = {"ewc": {"loss/G/ewc"}, "cdc": {"loss/G/cdc"}}
EXTRA_FILES = {"minegan": {"miner"}, "cdc": {"patch_head"}}


def _permanently_frozen(name, G, D, options) -> set[tuple[str, str]]:
    """Frozen in every segment: these get no optimiser state at all."""
    sets = [fn(G, D, options) for _, _, fn in TABLE[name]]
    return set.intersection(*sets)


# --- running a strategy and looking at its tensors -------------------------------------------------

@pytest.fixture(scope="session")
def source(tmp_path_factory) -> Callable[[str], Path]:
    """`source(family)` -> a tiny pretrained source dir for that family, made once per session."""
    cache = tmp_path_factory.mktemp("sources")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            cfg = TrainConfig(**FAMILIES[family], **TINY, data=SOURCE_DATA, steps=3,
                              out=str(cache / "unused"))
            made[family], _ = pretrain_source(cfg, cache)
        return made[family]

    return get


@dataclass
class Run:
    """What one transfer run left behind, as {file stem: {parameter name: tensor}}."""

    cfg: TrainConfig
    source: dict[str, dict[str, torch.Tensor]]
    snapshots: dict[int, dict[str, dict[str, torch.Tensor]]]  # step -> parameters at that step
    final: dict[str, dict[str, torch.Tensor]]                 # the output files (state dicts)
    metrics: dict[str, Any]
    curves: dict[str, list]
    G: nn.Module = field(repr=False, default=None)
    D: nn.Module = field(repr=False, default=None)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(module, "module", module)  # DDP-wrapped extras
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def capture_modules(monkeypatch) -> dict[str, Any]:
    """Make the loop's strategies record the G and D they set up (the live, unwrapped modules)."""
    captured: dict[str, Any] = {}
    real_build = train_module.build_strategy

    def build(name, options):
        strategy = real_build(name, options)
        setup = strategy.setup

        def recording_setup(ctx):
            captured["G"], captured["D"], captured["strategy"] = ctx.G, ctx.D, strategy
            setup(ctx)

        strategy.setup = recording_setup
        return strategy

    monkeypatch.setattr(train_module, "build_strategy", build)
    return captured


def snapshot(captured) -> dict[str, dict[str, torch.Tensor]]:
    strategy = captured["strategy"]
    extras = {**strategy.extra_g_modules, **strategy.extra_d_modules}
    return {"generator": _params(captured["G"]), "discriminator": _params(captured["D"]),
            **{name: _params(m) for name, m in extras.items()}}


def load_dir(path: Path, names=("generator", "discriminator")) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(Path(path) / f"{name}.safetensors")) for name in names}


def run_strategy(monkeypatch, tmp_path, source, strategy, family="dcgan", steps=STEPS, snap_every=None,
                 **overrides) -> Run:
    """Train `strategy` for `steps` from the session source, snapshotting every `snap_every` steps."""
    options = overrides.pop("strategy_options", options_for(strategy, steps))
    captured = capture_modules(monkeypatch)
    snapshots: dict[int, dict] = {}

    def eval_fn(step, gen, map_latent):
        snapshots[step] = snapshot(captured)

    src = source(family)
    cfg = TrainConfig(**{**FAMILIES[family], **TINY, "data": TARGET_DATA, "steps": steps,
                         "strategy": strategy, "strategy_options": options,
                         "source": str(src) if STRATEGIES.get(strategy).loads_source else "/nonexistent/source",
                         "out": str(tmp_path / f"{strategy}-{family}"),
                         "eval_every": snap_every or steps // 2, **overrides})
    result = train(cfg, eval_fn=eval_fn)
    extra_names = tuple(EXTRA_FILES.get(strategy, ()))
    return Run(cfg=cfg, source=load_dir(src), snapshots=snapshots,
               final=load_dir(cfg.out, ("generator", "discriminator") + extra_names),
               metrics=result.metrics, curves=result.curves, G=captured["G"], D=captured["D"])


def assert_frozen_exactly(before, after, frozen: set[tuple[str, str]], what: str) -> None:
    """Frozen parameters are bitwise equal, every other parameter changed."""
    wrong_changed, wrong_same = [], []
    for stem, params in before.items():
        for name, old in params.items():
            same = torch.equal(old, after[stem][name])
            if (stem, name) in frozen and not same:
                wrong_changed.append(f"{stem}.{name}")
            elif (stem, name) not in frozen and same:
                wrong_same.append(f"{stem}.{name}")
    assert not wrong_changed, f"{what}: frozen parameters changed: {wrong_changed[:5]}"
    assert not wrong_same, f"{what}: trainable parameters did not change: {wrong_same[:5]}"


def only_params(state: dict[str, dict[str, torch.Tensor]], like) -> dict[str, dict[str, torch.Tensor]]:
    """The parameters of `like` found in the state dicts `state` (drops BN statistics, SN vectors)."""
    return {stem: {n: state[stem][n] for n in like[stem]} for stem in like if stem in state}


def check_table(run: Run, name: str) -> None:
    """Every segment of the table holds; the end point is the output files."""
    snapshots = {**run.snapshots, run.cfg.steps: only_params(run.final, run.snapshots[0])}
    points = points_of(snapshots, run.cfg.steps)
    for start, stop, frozen_fn in TABLE[name]:
        frozen = frozen_fn(run.G, run.D, run.cfg.strategy_options)
        assert_frozen_exactly(points[start], points[stop], frozen, f"{name} {start}..{stop}")


# Every strategy on every family that supports it in fp32, and on dcgan in bf16 autocast.
CASES = [pytest.param(s, f, "no", id=f"{s}-{f}") for s in STRATEGIES.names() for f in FAMILIES
         if not (s == "cdc" and not NETWORKS.get(FAMILIES[f]["net"]).spatial_d_features)]
CASES += [pytest.param(s, f, "bf16", id=f"{s}-{f}-bf16") for s in STRATEGIES.names() for f in ("dcgan", "stylegan2")]


def test_table_covers_every_registered_strategy():
    missing = sorted(set(STRATEGIES.names()) - set(TABLE))
    assert not missing, f"add a TABLE row (what trains when) for the new strategies {missing}"


@pytest.mark.parametrize("strategy,family,precision", CASES)
def test_trains_exactly_what_the_table_says(monkeypatch, tmp_path, source, strategy, family, precision):
    run = run_strategy(monkeypatch, tmp_path, source, strategy, family, mixed_precision=precision)
    assert run.metrics["env/mixed_precision"] == precision
    assert all(torch.isfinite(torch.tensor(v)) for k, v in run.metrics.items() if k.startswith("loss/"))
    check_table(run, strategy)

    # Step 0: transfer strategies start from the source, scratch from its own seeded init.
    start = run.snapshots[0]
    src = only_params(run.source, {k: start[k] for k in ("generator", "discriminator")})
    if STRATEGIES.get(strategy).loads_source:
        assert_frozen_exactly(src, start, _all_g(run.G, run.D, {}) | _all_d(run.G, run.D, {}), "step 0")
    else:
        torch.manual_seed(run.cfg.seed)
        G0, D0 = build_networks(NetConfig(run.cfg.net, run.cfg.size, 1, run.cfg.latent_dim, run.cfg.width))
        fresh = {"generator": _params(G0), "discriminator": _params(D0)}
        assert all(torch.equal(start[s][n], fresh[s][n]) for s in fresh for n in fresh[s])
        assert any(not torch.equal(start[s][n], src[s][n]) for s in src for n in src[s])

    # Outputs keep the source's parameter names (and buffers); extras are saved beside them.
    for stem in ("generator", "discriminator"):
        assert set(run.final[stem]) == set(run.source[stem]), stem
    assert set(run.final) - {"generator", "discriminator"} == EXTRA_FILES.get(strategy, set())

    # Frozen parameters get no optimiser state: Adam keeps two fp32 moments per trainable element
    # and one fp32 step per trainable tensor, for G, D and the extras.
    frozen = _permanently_frozen(strategy, run.G, run.D, run.cfg.strategy_options)
    trainable = [t for stem, params in start.items() for n, t in params.items() if (stem, n) not in frozen]
    numel = sum(t.numel() for t in trainable)
    assert run.metrics["params/trainable"] == numel
    assert run.metrics["params/frozen"] == sum(t.numel() for s, p in start.items() for n, t in p.items()
                                               if (s, n) in frozen)
    assert run.metrics["resources/optimizer_state_bytes"] == 8 * numel + 4 * len(trainable)

    # Extra losses are logged with the ordinary ones, in the metrics and in every curve row.
    extra = {k for k in run.metrics if k.startswith("loss/G/") or k.startswith("loss/D/")}
    assert extra == EXTRA_LOSSES.get(strategy, set())
    for row in run.curves["train"]:
        assert EXTRA_LOSSES.get(strategy, set()) <= set(row)


def _l2_from_source(run: Run) -> float:
    src = only_params(run.source, run.snapshots[0])["generator"]
    return sum((run.final["generator"][n] - t).square().sum() for n, t in src.items()).sqrt().item()


def test_ewc_with_large_lambda_moves_g_less_than_finetune(monkeypatch, tmp_path, source):
    finetune = run_strategy(monkeypatch, tmp_path, source, "finetune", steps=8)
    cheap = options_for("ewc", 8)
    ewc = run_strategy(monkeypatch, tmp_path, source, "ewc", steps=8, strategy_options={**cheap, "lam": 1e9})
    weak = run_strategy(monkeypatch, tmp_path / "weak", source, "ewc", steps=8,
                        strategy_options={**cheap, "lam": 1e-9})
    assert _l2_from_source(ewc) < 0.5 * _l2_from_source(finetune)
    # With lambda ~ 0 EWC is finetune up to float rounding: the penalty itself is what holds G back.
    assert _l2_from_source(weak) == pytest.approx(_l2_from_source(finetune), rel=1e-3)
    assert ewc.metrics["loss/G/ewc"] > 1e3 * weak.metrics["loss/G/ewc"] > 0


def _source_g(source, family: str) -> nn.Module:
    torch.manual_seed(0)
    G, _ = build_networks(NetConfig(FAMILIES[family]["net"], FAMILIES[family]["size"], 1, TINY["latent_dim"],
                                    TINY["width"]))
    G.load_state_dict(load_file(str(source(family) / "generator.safetensors")))
    return G.eval()


@pytest.mark.parametrize("family", ["mlp", "dcgan"])
def test_minegan_stage1_reaches_the_images_and_leaves_g_bitwise(monkeypatch, tmp_path, source, family):
    """In stage 1 G runs with the source BatchNorm statistics: every G tensor, buffers included, is the
    source's, and the samples for fixed z move, because the miner's shift and scale of the latents
    is no longer normalised away."""
    run = run_strategy(monkeypatch, tmp_path, source, "minegan", family, steps=6,
                       strategy_options={"stage1_steps": 6}, lr_g=2e-3)
    for name, t in run.source["generator"].items():
        assert torch.equal(run.final["generator"][name], t), name
    from ganlib.strategies.regularized import Miner

    G = _source_g(source, family)
    miner = Miner(TINY["latent_dim"], TINY["latent_dim"])
    miner.load_state_dict(run.final["miner"])
    z = torch.randn(64, TINY["latent_dim"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = G(z), G(miner(z))
    moved = (after - before).abs().mean() / before.std(0).mean()
    assert moved > 0.02, f"samples moved by {moved:.4f} of their spread"


def test_scale_shift_keeps_the_source_statistics_and_every_non_affine_tensor(monkeypatch, tmp_path, source):
    run = run_strategy(monkeypatch, tmp_path, source, "scale_shift", "dcgan", steps=4)
    affine = {n for n, _ in run.G.named_parameters() if ("generator", n) not in
              _g_except_norm_affine(run.G, run.D, {})}
    kept = [n for n in run.source["generator"] if n not in affine]
    assert any("running_mean" in n for n in kept) and any("num_batches_tracked" in n for n in kept)
    for name in kept:
        assert torch.equal(run.final["generator"][name], run.source["generator"][name]), name
    assert all(not torch.equal(run.final["generator"][n], run.source["generator"][n]) for n in affine)


@pytest.mark.parametrize("family", ["mlp", "dcgan"])
def test_ewc_fisher_is_the_mean_squared_per_sample_gradient(source, family):
    """torch.func's vectorised per-sample gradients against a plain loop, one latent at a time, with
    G's and D's BatchNorm on their source statistics."""
    from ganlib.losses import LOSSES
    from ganlib.strategies.regularized import fisher_mode, per_sample_fisher

    torch.manual_seed(0)
    cfg = NetConfig(FAMILIES[family]["net"], FAMILIES[family]["size"], 1, TINY["latent_dim"], TINY["width"])
    G, D = build_networks(cfg)
    for module, stem in ((G, "generator"), (D, "discriminator")):
        module.load_state_dict(load_file(str(source(family) / f"{stem}.safetensors")))
    g_loss = LOSSES.get("nonsat").g_loss
    z = torch.randn(10, TINY["latent_dim"], generator=torch.Generator().manual_seed(3))
    names = [n for n, _ in G.named_parameters()]
    state = {k: v.clone() for k, v in (*G.state_dict().items(), *D.state_dict(prefix="D.").items())}
    params = [p for _, p in G.named_parameters()]
    expected = [torch.zeros_like(p) for p in params]
    with fisher_mode(G, D, z, chunk=4):
        fisher = per_sample_fisher(G, D, g_loss, names, z, chunk=4)
        for i in range(z.shape[0]):
            grads = torch.autograd.grad(g_loss(D(G(z[i:i + 1]))), params)
            for e, g in zip(expected, grads):
                e.add_(g.square() / z.shape[0])
    assert G.training and D.training  # modes restored, and every buffer
    after = {**G.state_dict(), **D.state_dict(prefix="D.")}
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    for n, e in zip(names, expected):
        torch.testing.assert_close(fisher[n], e, rtol=1e-4, atol=1e-12, msg=n)
    assert any(e.abs().sum() > 0 for e in expected)


def test_cdc_draws_near_one_anchor_per_training_image_and_scores_shallow_patches(source):
    from ganlib.losses import LOSSES
    from ganlib.strategies import SetupContext

    torch.manual_seed(0)
    G, D = build_networks(NetConfig("dcgan", 28, 1, TINY["latent_dim"], TINY["width"]))
    cdc = build_strategy("cdc")
    assert cdc.options.anchor_std == 0.1
    cdc.setup(SetupContext(G=G, D=D, family=NETWORKS.get("dcgan"), loss=LOSSES.get("nonsat"),
                           device=torch.device("cpu"), seed=0, total_steps=1, batch_size=8, num_images=25))
    assert cdc.anchor_z.shape == (25, TINY["latent_dim"])
    z = torch.randn(200, TINY["latent_dim"])
    near = cdc.map_latent(z, 0, {})                    # step 0 is an anchor step
    offsets = near - 0.1 * z                           # each row: one of the anchors
    hits = (offsets[:, None] - cdc.anchor_z[None]).norm(dim=2).min(1)
    assert hits.values.max() < 1e-5
    assert len(set(hits.indices.tolist())) > 20        # random anchors, not the first batch-size ones
    assert torch.equal(cdc.map_latent(z, 1, {}), z)    # other steps: the ordinary prior
    images = torch.zeros(3, 1, 28, 28)
    assert cdc.discriminate(D, images, 1, cdc.extra_d_modules).shape == (3, 14 * 14)  # patches of D's first block (14x14)
    assert cdc.discriminate(D, images, 0, cdc.extra_d_modules).shape == (3,)


def test_freeze_d_freezes_one_block_by_default():
    assert build_strategy("freeze_d").options.layers == 1


def test_scratch_never_reads_the_source(monkeypatch, tmp_path, source):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("generator", "discriminator"):
        (corrupt / f"{name}.safetensors").write_bytes(b"not a safetensors file")
    cfg = TrainConfig(**FAMILIES["dcgan"], **TINY, data=TARGET_DATA, steps=1, strategy="scratch",
                      source=str(corrupt), out=str(tmp_path / "scratch"))
    train(cfg)  # would raise UserError if it read the corrupt files ...
    with pytest.raises(UserError, match="corrupt"):  # ... as finetune does
        train(TrainConfig(**{**cfg.to_dict(), "strategy": "finetune", "out": str(tmp_path / "ft")}))


def test_ewc_penalty_is_zero_at_the_source_and_grows_with_distance(source):
    """The penalty is sum_i F_i (theta_i - theta_src_i)^2 with F the mean squared G-loss gradient."""
    from ganlib.losses import LOSSES
    from ganlib.strategies import GStepContext, SetupContext

    torch.manual_seed(0)
    G, D = build_networks(NetConfig("dcgan", 28, 1, TINY["latent_dim"], TINY["width"]))
    for module, stem in ((G, "generator"), (D, "discriminator")):
        module.load_state_dict(load_file(str(source("dcgan") / f"{stem}.safetensors")))
    ewc = build_strategy("ewc", {"lam": 2.0, "fisher_samples": 8, "fisher_batch": 4})
    buffers = {k: v.clone() for k, v in G.state_dict().items()}
    ewc.setup(SetupContext(G=G, D=D, family=NETWORKS.get("dcgan"), loss=LOSSES.get("nonsat"),
                           device=torch.device("cpu"), seed=0, total_steps=1, batch_size=8))
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in buffers.items())  # BN stats untouched
    assert all((f >= 0).all() for f in ewc.fisher) and any((f > 0).any() for f in ewc.fisher)
    ctx = GStepContext(step=0, z=torch.zeros(1), fake=torch.zeros(1), G=G)
    assert ewc.g_extra_losses(ctx)["ewc"].item() == 0.0
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.01)
    expected = 2.0 * sum((f * 0.01 ** 2).sum() for f in ewc.fisher)
    assert ewc.g_extra_losses(ctx)["ewc"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_cdc_loss_is_zero_when_target_equals_source_and_positive_after_a_change(source):
    from ganlib.losses import LOSSES
    from ganlib.strategies import GStepContext, SetupContext

    torch.manual_seed(0)
    G, D = build_networks(NetConfig("dcgan", 28, 1, TINY["latent_dim"], TINY["width"]))
    cdc = build_strategy("cdc")
    cdc.setup(SetupContext(G=G, D=D, family=NETWORKS.get("dcgan"), loss=LOSSES.get("nonsat"),
                           device=torch.device("cpu"), seed=0, total_steps=1, batch_size=8, num_images=25))
    z = torch.randn(8, TINY["latent_dim"])
    _, feats = G(z, return_features=True)
    assert cdc.g_extra_losses(GStepContext(step=1, z=z, fake=None, g_features=feats, G=G))["cdc"].item() \
        == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        G.blocks[-1][1].weight.mul_(torch.linspace(0.1, 3.0, G.blocks[-1][1].weight.numel()))
    _, feats = G(z, return_features=True)
    loss = cdc.g_extra_losses(GStepContext(step=1, z=z, fake=None, g_features=feats, G=G))["cdc"]
    assert loss.item() > 0 and loss.requires_grad


# --- bad input: one line, UserError, exit code 2 ----------------------------------------------------

BAD = [
    pytest.param(dict(strategy="nope"), "unknown strategy 'nope'", id="unknown-strategy"),
    pytest.param(dict(strategy="freeze_d", strategy_options={"depth": 1}), "no option 'depth'", id="unknown-option"),
    pytest.param(dict(strategy="freeze_d", strategy_options={"layers": "two"}), "layers='two'", id="bad-type"),
    pytest.param(dict(strategy="freeze_d", strategy_options={"layers": 2.5}), "layers=2.5", id="fractional-int"),
    pytest.param(dict(strategy="freeze_d", strategy_options={"layers": 3}), "D has 3 blocks", id="layers-too-many"),
    pytest.param(dict(strategy="freeze_d", strategy_options={"layers": 0}), "must be >= 1", id="layers-zero"),
    pytest.param(dict(strategy="two_phase", strategy_options={"split": 1.0}), "strictly between", id="split-1"),
    pytest.param(dict(strategy="two_phase", strategy_options={"split": 0}), "strictly between", id="split-0"),
    pytest.param(dict(strategy="two_phase", strategy_options={"split": "nan"}), "split='nan'", id="split-nan"),
    pytest.param(dict(strategy="ewc", strategy_options={"lam": -1}), "lam=-1", id="ewc-negative"),
    pytest.param(dict(strategy="cdc", net="mlp"), "cdc needs a discriminator with a spatial", id="cdc-mlp"),
    pytest.param(dict(strategy="cdc", batch=3), "batch=3", id="cdc-small-batch"),
    pytest.param(dict(strategy="finetune", size=32), "does not match this network", id="source-other-size"),
    pytest.param(dict(strategy="finetune", net="resnet", size=32), "does not match", id="source-other-net"),
    pytest.param(dict(strategy="finetune", width=16), "does not match", id="source-other-width"),
    pytest.param(dict(strategy="finetune", source="/nonexistent/dir"), "/nonexistent/dir: no such directory",
                 id="source-missing"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_input_is_one_clear_line_before_anything_is_written(tmp_path, source, overrides, message):
    out = tmp_path / "out"
    values = {**FAMILIES["dcgan"], **TINY, "data": TARGET_DATA, "steps": 2, "source": str(source("dcgan")),
              "out": str(out), **overrides}
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as err:
        train(TrainConfig(**values))
    assert "\n" not in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--strategy", "nope"], "invalid choice: 'nope'"),
    (["--strategy", "two_phase", "--strategy-opt", "split=1.5"], "split=1.5"),
    (["--strategy", "freeze_d", "--strategy-opt", "layers=5"], "D has 3 blocks"),
])
def test_cli_exits_2_with_one_line(tmp_path, source, capsys, args, message):
    argv = ["--net", "dcgan", "--size", "28", "--width", "8", "--latent-dim", "16", "--batch", "8",
            "--steps", "1", "--data", TARGET_DATA, "--source", str(source("dcgan")),
            "--out", str(tmp_path / "o"), "--no-progress", *args]
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(argv)
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_option_values_from_the_command_line_are_parsed_strictly():
    assert build_strategy("freeze_d", {"layers": "1"}).options.layers == 1
    assert build_strategy("two_phase", {"split": "0.25"}).options.split == 0.25
    assert build_strategy("minegan", {"stage1_steps": 3.0}).options.stage1_steps == 3
    for bad in ({"layers": True}, {"layers": "1.5"}, {"layers": "inf"}):
        with pytest.raises(UserError):
            build_strategy("freeze_d", bad)


# --- two processes (DDP on CPU) ---------------------------------------------------------------------

DDP_STRATEGIES = ("freeze_d", "two_phase", "minegan")
# freeze_d also runs with ADA: each rank augments its own images, p must be the same on both
DDP_AUGMENT = {"freeze_d": {"augment": "ada", "augment_options": {"interval": 1, "ramp_kimg": 0.16, "p_init": 0.5}}}
DDP_SCRIPT = textwrap.dedent('''
    """Run freeze_d, two_phase and minegan under DDP; every rank saves its own parameter snapshots."""
    import json, sys
    from pathlib import Path

    from safetensors.torch import save_file

    import ganlib.train as T
    from ganlib.config import TrainConfig
    from ganlib.distributed import make_accelerator, shutdown

    source, out_root, options = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    AUGMENT = %(augment)r
    accelerator = make_accelerator("no")
    rank = accelerator.process_index
    captured = {}
    real_build = T.build_strategy

    def build(name, opts):
        strategy = real_build(name, opts)
        setup = strategy.setup
        def recording_setup(ctx):
            captured.update(G=ctx.G, D=ctx.D, strategy=strategy)
            setup(ctx)
        strategy.setup = recording_setup
        return strategy

    T.build_strategy = build

    def params(module):
        module = getattr(module, "module", module)
        return {n: p.detach().cpu().clone() for n, p in module.named_parameters()}

    ada_p = []  # this rank's ADA probability after every step (freeze_d runs with ada)
    real_step = T.Trainer.step

    def recording_step(self, step):
        logs = real_step(self, step)
        if self.cfg.augment == "ada":
            ada_p.append(float(self.augment.p))
        return logs

    T.Trainer.step = recording_step

    for name in %(strategies)r:
        out = out_root / name

        def eval_fn(step, gen, map_latent):
            s = captured["strategy"]
            mods = {"generator": captured["G"], "discriminator": captured["D"],
                    **s.extra_g_modules, **s.extra_d_modules}
            flat = {f"{stem}/{n}": t.contiguous() for stem, m in mods.items() for n, t in params(m).items()}
            save_file(flat, str(out_root / f"{name}-rank{rank}-step{step}.safetensors"))

        cfg = TrainConfig(**json.loads(sys.argv[4]), width=8, latent_dim=16, batch=8, steps=%(steps)d,
                          data="mnist5k:classes=5-9:n=25", strategy=name, strategy_options=options.get(name, {}),
                          source=source, out=str(out), eval_every=%(steps)d // 2, log_every=1,
                          warmup_steps=0, progress=False, **AUGMENT.get(name, {}))
        result = T.train(cfg, accelerator, eval_fn=eval_fn)
        (out_root / f"{name}-rank{rank}-metrics.json").write_text(json.dumps(result.metrics))
    (out_root / f"ada-p-rank{rank}.json").write_text(json.dumps(ada_p))
    shutdown(accelerator)
''') % {"strategies": DDP_STRATEGIES, "steps": STEPS, "augment": DDP_AUGMENT}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dcgan", "stylegan2"])
def test_ddp_two_processes_train_what_the_table_says(tmp_path, source, family):
    script = tmp_path / "ddp_strategies.py"
    script.write_text(DDP_SCRIPT)
    out_root = tmp_path / "ddp"
    out_root.mkdir()
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(script), str(source(family)), str(out_root),
           json.dumps({name: options_for(name, STEPS) for name in DDP_STRATEGIES}), json.dumps(FAMILIES[family])]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    src = load_dir(source(family))
    torch.manual_seed(0)
    G, D = build_networks(NetConfig(FAMILIES[family]["net"], FAMILIES[family]["size"], 1, TINY["latent_dim"],
                                    TINY["width"]))
    for name in DDP_STRATEGIES:
        options = options_for(name, STEPS)
        per_rank = []
        for rank in (0, 1):
            snapshots = {}
            for step in (0, STEPS // 2, STEPS):
                flat = load_file(str(out_root / f"{name}-rank{rank}-step{step}.safetensors"))
                nested: dict[str, dict[str, torch.Tensor]] = {}
                for key, t in flat.items():
                    stem, param = key.split("/", 1)
                    nested.setdefault(stem, {})[param] = t
                snapshots[step] = nested
            per_rank.append(snapshots)
            points = points_of(snapshots, STEPS)
            assert_frozen_exactly(only_params(src, points["start"]), points["start"],
                                  _all_g(G, D, {}) | _all_d(G, D, {}), f"{name} rank {rank} step 0")
            for start, stop, frozen_fn in TABLE[name]:
                assert_frozen_exactly(points[start], points[stop], frozen_fn(G, D, options),
                                      f"{name} rank {rank} {start}..{stop}")
            # No optimiser state for frozen tensors on any rank.
            frozen = _permanently_frozen(name, G, D, options)
            trainable = [t for stem, p in points["start"].items() for n, t in p.items() if (stem, n) not in frozen]
            metrics = json.loads((out_root / f"{name}-rank{rank}-metrics.json").read_text())
            assert metrics["env/num_processes"] == 2
            assert metrics["resources/optimizer_state_bytes"] == \
                8 * sum(t.numel() for t in trainable) + 4 * len(trainable)
        # DDP keeps the replicas identical: every tensor agrees across ranks at every point.
        for step, stems in per_rank[0].items():
            for stem, params in stems.items():
                for n, t in params.items():
                    assert torch.equal(t, per_rank[1][step][stem][n]), f"{name} {stem}.{n} step {step}"
        # ADA's p is synchronised: the same on both ranks after every step, and it moved.
        if name in DDP_AUGMENT:
            p0, p1 = (json.loads((out_root / f"ada-p-rank{r}.json").read_text()) for r in (0, 1))
            assert len(p0) == STEPS and p0 == p1 and len(set(p0)) > 1, (p0, p1)
        # Rank 0 wrote the outputs, with the final weights every rank holds.
        final = load_dir(out_root / name)
        for stem in ("generator", "discriminator"):
            assert all(torch.equal(final[stem][n], t) for n, t in per_rank[1][STEPS][stem].items())


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES.names()])
def test_every_strategy_trains_stylegan2_with_path_length_regularisation(monkeypatch, tmp_path, source, strategy):
    """The field's settings (fewshot-ffhq: path length every 4 G steps) on every strategy: a frozen mapping
    (scale_shift trains the style affines only) or a frozen G (minegan's first stage) must still train."""
    # (Before the fix, scale_shift and minegan cells failed: "does not require grad".)
    run = run_strategy(monkeypatch, tmp_path, source, strategy, "stylegan2", pl_weight=2.0, pl_interval=1)
    check_table(run, strategy)
    rows = run.curves["train"]
    with_pl = [row["step"] for row in rows if "loss/G/pl" in row]
    # G's own weights train from the phase boundary on in minegan (miner first) and two_phase (D first)
    late = strategy in ("minegan", "two_phase")
    g_trains = [row["step"] for row in rows if not late or row["step"] > STEPS // 2]  # rows count from 1
    assert with_pl == g_trains, (with_pl, g_trains)   # every step G's own weights train, and only then
