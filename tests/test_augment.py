"""Tests for ganlib/augment.py: every registered augmentation is differentiable, random per image,
applied to everything D sees in the loop; ADA's p follows the over-fitting heuristic."""

from __future__ import annotations

import pytest
import torch

from ganlib.augment import AUGMENTS, _shift, build_augment
from ganlib.config import TrainConfig
from ganlib.errors import UserError
from ganlib.nets import NetConfig, build_networks
from ganlib.train import Trainer

# Options that switch every op on (ADA starts at p = 0, where it is the identity).
ALWAYS_ON = {"ada": {"p_init": 1.0}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", AUGMENTS.names())
@pytest.mark.parametrize("channels", [1, 3])
def test_gradients_reach_g_through_the_augmentation(name, channels):
    torch.manual_seed(0)
    G, D = build_networks(NetConfig("dcgan", 28, channels, 16, 8))
    augment = build_augment(name, ALWAYS_ON.get(name))
    fake = G(torch.randn(6, 16))
    seen = augment(fake, _gen())
    assert seen.shape == fake.shape and seen.dtype == fake.dtype
    D(seen).sum().backward()
    for n, p in G.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", [n for n in AUGMENTS.names() if n != "none"])
def test_every_image_gets_its_own_random_parameters(name):
    """DiffAugment and ADA draw parameters per image (the official codes' rand(N, 1, 1, 1)); the same
    image repeated comes out differently, and the same generator state gives the same output."""
    x = torch.rand(1, 3, 16, 16).mul(2).sub(1).repeat(8, 1, 1, 1)
    augment = build_augment(name, ALWAYS_ON.get(name))
    out = augment(x, _gen(1))
    distinct = {tuple(img.flatten().tolist()) for img in out}
    assert len(distinct) >= 6
    assert torch.equal(out, augment(x, _gen(1)))
    assert not torch.equal(out, augment(x, _gen(2)))


def test_diffaugment_cuts_out_a_square_of_half_the_side_in_every_image():
    x = torch.full((16, 1, 28, 28), -1.0)
    out = build_augment("diffaugment")(x, _gen())
    zeros = (out == 0).flatten(1).sum(1)
    # cutout of side 14 clipped at the border covers at least 7x7 pixels; translation fill adds more
    assert (zeros >= 49).all()
    assert (build_augment("none")(x, _gen()) == x).all()


@pytest.mark.parametrize("reflect", [False, True])
def test_shift_matches_a_pixel_loop(reflect):
    x = torch.randn(3, 2, 6, 5)
    dy, dx = torch.tensor([-2, 0, 1]), torch.tensor([1, -2, 2])
    out = _shift(x, dy, dx, reflect)
    expected = torch.zeros_like(x)
    for i in range(3):
        for r in range(6):
            for c in range(5):
                sr, sc = r + int(dy[i]), c + int(dx[i])
                if reflect:
                    sr = -sr if sr < 0 else (2 * 5 - sr if sr > 5 else sr)
                    sc = -sc if sc < 0 else (2 * 4 - sc if sc > 4 else sc)
                if 0 <= sr < 6 and 0 <= sc < 5:
                    expected[i, :, r, c] = x[i, :, sr, sc]
    assert torch.equal(out, expected)


def _drive_ada(score: float, steps: int, ada=None):
    """Feed ADA a D that scores every real at `score`; returns p after each step."""
    ada = ada or build_augment("ada", {"interval": 2, "ramp_kimg": 0.1})
    trace = []
    for step in range(steps):
        ada.observe(torch.full((8,), score))
        ada.end_step(step, lambda t: t)
        trace.append(float(ada.p))
    return ada, trace


def test_ada_p_rises_when_d_overfits_and_falls_when_it_does_not():
    ada, up = _drive_ada(+5.0, 10)
    # r_t = 1 > 0.6: every 2 steps p grows by 16 images / 100 images
    assert up == pytest.approx([0, 0.16, 0.16, 0.32, 0.32, 0.48, 0.48, 0.64, 0.64, 0.80], abs=1e-6)
    _, down = _drive_ada(-5.0, 12, ada)
    assert down[-1] == 0.0 and all(b <= a for a, b in zip(down, down[1:]))
    # r_t = 0.5 (half the reals scored positive) is under the target: p falls too
    half = build_augment("ada", {"interval": 1, "ramp_kimg": 0.1, "p_init": 0.5})
    half.observe(torch.tensor([5.0, 5.0, -5.0, -5.0]))
    half.end_step(0, lambda t: t)
    assert float(half.p) == pytest.approx(0.46)


def test_ada_p_uses_the_statistics_of_every_process():
    """The sign statistics are summed over processes before p moves, so p is the same on all."""
    ada = build_augment("ada", {"interval": 1, "ramp_kimg": 0.1})
    ada.observe(torch.full((8,), -1.0))           # this process alone: r_t = -1, p would stay 0
    other = torch.tensor([24.0, 24.0, 24.0])       # the other processes: 24 reals, all scored positive
    ada.end_step(0, lambda t: t + other)          # r_t = (24 - 8) / 32 = 0.5 ... below 0.6: falls
    assert float(ada.p) == 0.0
    ada.observe(torch.full((8,), -1.0))
    ada.end_step(1, lambda t: t + torch.tensor([40.0, 40.0, 40.0]))  # r_t = 32 / 48 = 0.67 > 0.6
    assert float(ada.p) == pytest.approx(48 / 100)


def test_augment_options_are_checked():
    with pytest.raises(UserError, match="no option 'bogus'"):
        build_augment("ada", {"bogus": 1})
    with pytest.raises(UserError, match="interval=2.5"):
        build_augment("ada", {"interval": 2.5})
    with pytest.raises(UserError, match="ada needs"):
        build_augment("ada", {"target": 1.5})
    with pytest.raises(UserError, match="unknown augment 'flip'"):
        build_augment("flip")
    assert build_augment("ada", {"interval": "3"}).options.interval == 3


# --- in the training loop ---------------------------------------------------------------------------

def _trainer(tmp_path, augment: str, **overrides) -> Trainer:
    cfg = TrainConfig(net="dcgan", size=28, width=8, latent_dim=16, batch=8, steps=4, log_every=1, warmup_steps=0,
                      progress=False, data="mnist5k:classes=5-9:n=25", strategy="scratch", augment=augment,
                      out=str(tmp_path / augment), **overrides)
    return Trainer(cfg)


@pytest.mark.parametrize("augment", ["none", "diffaugment"])
def test_d_sees_augmented_reals_and_fakes_in_both_phases(tmp_path, augment):
    """Every batch D scores (reals and fakes in the D phase, fakes in the G phase) is augmented, with
    the same policy; MNIST pixels and tanh outputs are never exactly 0, cutout's holes are."""
    trainer = _trainer(tmp_path, augment)
    seen = []
    trainer.D.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    trainer.step(0)
    assert len(seen) == 3  # D phase: real, fake; G phase: fake
    holes = [(batch == 0).flatten(1).sum(1) for batch in seen]
    if augment == "none":
        assert all((h == 0).all() for h in holes)
    else:
        assert all((h >= 49).all() for h in holes)


def test_ada_p_is_a_curve_of_the_training_run(tmp_path):
    trainer = _trainer(tmp_path, "ada", augment_options={"interval": 1, "ramp_kimg": 0.01})
    trainer.run()
    curve = [row["aug/p"] for row in trainer.train_curve]
    assert len(curve) == 4 and all(0.0 <= p <= 1.0 for p in curve)
    assert len(set(curve)) > 1  # 8 images per step over a 10-image ramp: p moves every step


@pytest.mark.parametrize("augment", ["diffaugment", "ada"])
def test_resume_mid_interval_reproduces_the_run(tmp_path, crash_after_first_checkpoint, augment):
    """The augmentation stream and ADA's p and part-interval statistics are checkpointed: a run that
    dies after its step-3 checkpoint (mid ADA interval) and resumes ends bitwise where an
    uninterrupted run does, with the same p curve."""
    from safetensors.torch import load_file

    from ganlib.train import train

    opts = dict(net="dcgan", size=28, width=8, latent_dim=16, batch=8, steps=8, ckpt_every=3, log_every=1,
                warmup_steps=0, progress=False, data="mnist5k:classes=5-9:n=25", strategy="scratch",
                augment=augment, r1_gamma=1.0, r1_interval=2,
                augment_options={"interval": 2, "ramp_kimg": 0.05, "p_init": 0.5} if augment == "ada" else {})
    a = train(TrainConfig(**opts, out=str(tmp_path / "a")))
    crash_after_first_checkpoint(lambda: train(TrainConfig(**opts, out=str(tmp_path / "b"))))
    b = train(TrainConfig(**opts, out=str(tmp_path / "b"), resume=True))
    assert b.curves["train"] == a.curves["train"]
    for stem in ("generator", "discriminator"):
        wa, wb = (load_file(str(tmp_path / run / f"{stem}.safetensors")) for run in ("a", "b"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), stem
    if augment == "ada":
        assert len({row["aug/p"] for row in a.curves["train"]}) > 1


@pytest.mark.parametrize("augment", ["diffaugment", "ada"])
def test_augmented_training_runs_in_bf16(tmp_path, augment):
    trainer = _trainer(tmp_path, augment, mixed_precision="bf16", r1_gamma=1.0, r1_interval=2,
                       augment_options={"p_init": 1.0} if augment == "ada" else {})
    result = trainer.run()
    assert result.metrics["env/mixed_precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result.metrics.items() if k.startswith("loss/"))
