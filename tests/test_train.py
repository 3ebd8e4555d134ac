"""The training loop end to end: outputs, determinism, precision, bad input, divergence,
kill-and-resume (bitwise) and two-process DDP on CPU (gloo)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from ganlib import checkpoint as ckpt
from ganlib import train as train_module
from ganlib.distributed import make_accelerator
from ganlib.losses import GANLoss
from ganlib.nets import NetConfig, build_networks
from ganlib.registry import Registry
from ganlib.train import SAMPLES_BYTES, Trainer, TrainingDiverged, main, output_bytes, train

TINY_ARGS = ["--width", "8", "--batch", "8", "--data", "mnist5k:classes=0-1:n=64", "--no-progress",
             "--log-every", "2", "--warmup-steps", "1"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_bitwise(dir_a: Path, dir_b: Path, names: list[str]) -> None:
    """Every tensor of every named .safetensors file is bitwise identical in both directories."""
    for name in names:
        a, b = weights(dir_a / f"{name}.safetensors"), weights(dir_b / f"{name}.safetensors")
        assert a.keys() == b.keys(), name
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{name}: {differ[:5]} differ"


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under `folder` (to prove nothing was written)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Call the CLI in-process; (exit code, stderr lines)."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err.strip().splitlines()


def cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ganlib.train", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


# --- one run ------------------------------------------------------------------------------------


def test_a_run_writes_weights_samples_metrics_and_a_checkpoint(tiny_config):
    cfg = tiny_config(steps=4, warmup_steps=1, log_every=2)
    result = train(cfg)
    out = Path(cfg.out)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint", "discriminator.safetensors", "generator.safetensors", "metrics.json", "samples.png"]
    assert ckpt.read_meta(out / "checkpoint")["step"] == 4

    m = json.loads((out / "metrics.json").read_text())
    assert m == result.metrics
    assert all("/" in k for k in m), [k for k in m if "/" not in k]
    for key in ("timing/img_per_s", "timing/step_time_p50_ms", "timing/step_time_p90_ms", "timing/wall_s",
                "resources/peak_mem_gb", "resources/mem_kind", "resources/optimizer_state_bytes",
                "params/trainable", "params/frozen", "loss/D", "loss/G"):
        assert m[key] is not None, key
    assert m["env/num_processes"] == 1 and m["env/mixed_precision"] == "no" and m["env/device"] == "cpu"
    assert m["timing/timed_steps"] == 3  # 4 steps, the first one is warm-up
    assert m["timing/img_per_s"] == pytest.approx(3 * 8 / m["timing/timed_s"])
    assert m["timing/timed_s"] < m["timing/train_s"] < m["timing/wall_s"]
    assert m["timing/step_time_p50_ms"] <= m["timing/step_time_p90_ms"]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    n_params = sum(t.numel() for name in ("generator", "discriminator")
                   for k, t in weights(out / f"{name}.safetensors").items() if not k.endswith(buffers))
    assert m["params/trainable"] == n_params and m["params/frozen"] == 0
    assert m["resources/optimizer_state_bytes"] >= 2 * 4 * n_params  # Adam: two fp32 moments per parameter

    assert [row["step"] for row in result.curves["train"]] == [2, 4]
    assert all(torch.isfinite(torch.tensor(row["loss/D"])) for row in result.curves["train"])
    grid = Image.open(out / "samples.png")
    assert grid.size == (8 * 29 + 1, 8 * 29 + 1)  # 64 samples of 28 px, 8 a row, 1 px padding


def test_only_warmup_steps_reports_no_speed_rather_than_zero(tiny_config, capsys):
    cfg = tiny_config(steps=2, warmup_steps=5)
    assert train(cfg).metrics["timing/img_per_s"] is None
    code, err = run_main([*TINY_ARGS, "--steps", "2", "--warmup-steps", "5", "--out", cfg.out + "2"], capsys)
    assert code == 0, err  # the summary line prints n/a instead of failing on a missing figure


def test_same_config_and_seed_give_bitwise_identical_weights(tiny_config, tmp_path):
    opts = dict(steps=4, r1_gamma=1.0, r1_interval=2, ema_decay=0.9)
    a = tiny_config(**opts, out=str(tmp_path / "a"))
    b = tiny_config(**opts, out=str(tmp_path / "b"))
    c = tiny_config(**opts, seed=1, out=str(tmp_path / "c"))
    for cfg in (a, b, c):
        train(cfg)
    names = ["generator", "discriminator", "generator_ema"]
    assert_bitwise(tmp_path / "a", tmp_path / "b", names)
    with pytest.raises(AssertionError):
        assert_bitwise(tmp_path / "a", tmp_path / "c", ["generator"])


def test_how_often_a_run_evaluates_does_not_change_its_weights(tiny_config, tmp_path):
    """StyleGAN2 trains from the global random stream (noise inputs, style mixing); an evaluation
    that draws from it too must not shift what training draws."""
    opts = dict(net="stylegan2", size=32, width=1, latent_dim=16, steps=4, ema_decay=0.9)
    train(tiny_config(**opts, eval_every=0, out=str(tmp_path / "quiet")))
    train(tiny_config(**opts, eval_every=1, out=str(tmp_path / "eval")), eval_fn=_sample_mean)
    assert_bitwise(tmp_path / "quiet", tmp_path / "eval", ["generator", "discriminator", "generator_ema"])


def test_lazy_r1_runs_on_the_steps_of_its_interval_and_reaches_d(tiny_config, tmp_path):
    # stylegan2-ada's lazy regularisation: R1 on steps 0, 3 and 6 of 7 only, and what D learns changes
    lazy = train(tiny_config(steps=7, log_every=1, r1_gamma=1.0, r1_interval=3, out=str(tmp_path / "r1")))
    assert [row["step"] for row in lazy.curves["train"] if "loss/D/r1" in row] == [1, 4, 7]
    train(tiny_config(steps=7, log_every=1, out=str(tmp_path / "none")))
    with pytest.raises(AssertionError):
        assert_bitwise(tmp_path / "r1", tmp_path / "none", ["discriminator"])


def test_bf16_on_cpu_runs_and_says_so(tiny_config, tmp_path):
    fp32 = train(tiny_config(out=str(tmp_path / "fp32")))
    AcceleratorState._reset_state(True)  # a second precision in one process
    bf16 = train(tiny_config(mixed_precision="bf16", out=str(tmp_path / "bf16")))
    assert fp32.metrics["env/mixed_precision"] == "no"
    assert bf16.metrics["env/mixed_precision"] == "bf16"
    assert json.loads((tmp_path / "bf16" / "metrics.json").read_text())["env/mixed_precision"] == "bf16"
    g = weights(tmp_path / "bf16" / "generator.safetensors")
    assert all(t.dtype != torch.bfloat16 for t in g.values())  # autocast: fp32 master weights
    with pytest.raises(AssertionError):  # autocast really ran the networks in bf16
        assert_bitwise(tmp_path / "fp32", tmp_path / "bf16", ["generator"])


def test_fp16_on_cpu_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = cli([*TINY_ARGS, "--steps", "2", "--mixed-precision", "fp16", "--out", str(out)])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "fp16" in lines[0], proc.stderr
    assert not out.exists()


# --- bad input: exit 2, one line, nothing written -------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--net", "nope"], "'nope'"),
    (["--data", "nope"], "'nope'"),
    (["--loss", "nope"], "'nope'"),
    (["--strategy", "nope"], "'nope'"),
    (["--size", "30"], "size=30"),
    (["--data", "mnist5k:classes=0:n=9999"], "n=9999"),
    (["--data", "mnist", "--data-root", "{empty}"], "mnist"),
    (["--strategy", "freeze_d", "--strategy-opt", "layers=9"], "layers=9"),
    (["--strategy", "freeze_d", "--strategy-opt", "layerz=1"], "layerz"),
    (["--strategy", "minegan"], "--source"),
    (["--strategy", "finetune", "--source", "{empty}"], "source generator"),
    (["--strategy", "finetune", "--source", "{empty}/missing"], "missing: no such directory"),
    (["--lr-g", "nan"], "lr_g=nan must be a finite number"),
    (["--beta1", "1.5"], "beta1=1.5"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, words, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    argv = [a.replace("{empty}", str(empty)) for a in args]
    code, err = run_main([*TINY_ARGS, "--steps", "2", *argv, "--out", str(out)], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not out.exists()
    assert list(empty.iterdir()) == []


@pytest.fixture
def finished_run(tiny_config):
    """A finished 2-step run (with its checkpoint) to resume from."""
    cfg = tiny_config(steps=2)
    train(cfg)
    return Path(cfg.out)


@pytest.mark.parametrize("damage, extra, words", [
    ("meta.json", [], "corrupt"),
    ("generator.safetensors", [], "corrupt"),
    ("optim.pt", [], "unreadable"),
    ("rng-rank0.safetensors", [], "corrupt"),
    (None, ["--lr-g", "1e-3"], "different configuration (--lr-g 0.0002 in the checkpoint, 0.001 now)"),
    (None, ["--steps", "3"], "different configuration (--steps 2 in the checkpoint, 3 now)"),
])
def test_bad_resume_exits_2_and_changes_nothing(finished_run, damage, extra, words, capsys):
    if damage:
        path = finished_run / "checkpoint" / damage
        path.write_bytes(path.read_bytes()[:40])
    before = snapshot(finished_run)
    steps = [] if "--steps" in extra else ["--steps", "2"]
    code, err = run_main([*TINY_ARGS, *steps, *extra, "--resume", "--out", str(finished_run)], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert snapshot(finished_run) == before


def test_resume_in_another_precision_exits_2_and_changes_nothing(finished_run, capsys, monkeypatch):
    # same flags, but `accelerate launch` now configures bf16: the checkpoint was written in fp32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)
    before = snapshot(finished_run)
    code, err = run_main([*TINY_ARGS, "--steps", "2", "--resume", "--out", str(finished_run)], capsys)
    assert code == 2
    assert len(err) == 1 and "precision 'no'" in err[0] and "'bf16'" in err[0], err
    assert snapshot(finished_run) == before


def _save_source(folder: Path, seed: int = 123) -> Path:
    """A source directory of freshly initialised tiny dcgan weights (what a transfer loads)."""
    folder.mkdir()
    torch.manual_seed(seed)
    G, D = build_networks(NetConfig("dcgan", 28, 1, 100, 8))
    ckpt.save_weights(folder / "generator.safetensors", G)
    ckpt.save_weights(folder / "discriminator.safetensors", D)
    return folder


def test_resume_accepts_strategy_options_however_written(tiny_config, tmp_path, capsys):
    # CLI strings, YAML ints and defaults are one configuration: the fingerprint must agree.
    source = _save_source(tmp_path / "source")
    cfg = tiny_config(steps=2, strategy="freeze_d", strategy_options={"layers": 1}, source=str(source))
    train(cfg)
    before = snapshot(Path(cfg.out))
    code, err = run_main([*TINY_ARGS, "--steps", "2", "--strategy", "freeze_d", "--source", str(source),
                          "--resume", "--out", cfg.out], capsys)
    assert code == 0, err
    after = snapshot(Path(cfg.out))
    for name in ("generator.safetensors", "discriminator.safetensors", "checkpoint/optim.pt"):
        assert after[name] == before[name], name  # resumed at the end: nothing left to train


# --- divergence ------------------------------------------------------------------------------------


@pytest.fixture
def nan_loss(monkeypatch):
    """Make the loop's `nonsat` loss NaN from the third D step on (the loop, not the loss, is tested)."""
    calls = {"d": 0}

    def d_loss(real, fake):
        calls["d"] += 1
        value = real.float().mean() - fake.float().mean()
        return value * float("nan") if calls["d"] >= 3 else value

    losses = Registry("loss")
    losses.register("nonsat", GANLoss("nonsat", d_loss, lambda fake: -fake.float().mean()))
    monkeypatch.setattr(train_module, "LOSSES", losses)


def test_a_diverging_run_raises(tiny_config, nan_loss):
    with pytest.raises(TrainingDiverged, match="loss/D became nan at step 4"):
        train(tiny_config(steps=6, log_every=2))


def test_a_diverging_run_exits_1_with_an_error_line(tmp_path, nan_loss, capsys):
    code, err = run_main([*TINY_ARGS, "--steps", "6", "--out", str(tmp_path / "out")], capsys)
    assert code == 1
    assert err[-1].startswith("error: loss/D became nan")


def test_log_hook_sees_each_curve_row_as_it_is_appended(tiny_config):
    seen, lengths = [], []
    trainer = None

    def log_fn(curve, row):  # called from inside the loop: the row is already in the curve, nothing later is
        seen.append((curve, dict(row)))
        lengths.append(len(getattr(trainer, f"{curve}_curve")))

    cfg = tiny_config(steps=6, log_every=2, eval_every=3)
    trainer = Trainer(cfg, eval_fn=lambda step, gen, z: {"fid": float(step)}, log_fn=log_fn)
    result = trainer.run()
    assert [row for curve, row in seen if curve == "train"] == result.curves["train"]
    assert [row for curve, row in seen if curve == "fid"] == result.curves["fid"]
    assert [r["step"] for c, r in seen] == [0, 2, 3, 4, 6, 6]  # in the order training produced them
    assert lengths == [1, 1, 2, 2, 3, 3]


# --- kill and resume -------------------------------------------------------------------------------


def _sample_mean(step, gen, map_latent):
    """An evaluation hook that draws from the global RNG, as a metric's sampler may."""
    return {"sample_mean": float(gen(map_latent(torch.randn(4, gen.latent_dim))).mean())}


def test_resume_after_a_crash_reproduces_weights_and_curves(tiny_config, tmp_path, crash_after_first_checkpoint):
    # in-process, fast: the run dies right after its first checkpoint (step 3, between two log reads)
    opts = dict(steps=8, ckpt_every=3, log_every=2, eval_every=3, r1_gamma=1.0, r1_interval=3, ema_decay=0.9)
    a = train(tiny_config(**opts, out=str(tmp_path / "a")), eval_fn=_sample_mean)
    crash_after_first_checkpoint(lambda: train(tiny_config(**opts, out=str(tmp_path / "b")), eval_fn=_sample_mean))
    assert ckpt.read_meta(tmp_path / "b" / "checkpoint")["step"] == 3
    b = train(tiny_config(**opts, out=str(tmp_path / "b"), resume=True), eval_fn=_sample_mean)

    assert_bitwise(tmp_path / "a", tmp_path / "b", ["generator", "discriminator", "generator_ema"])
    assert [row["step"] for row in b.curves["fid"]] == [0, 3, 6, 8]
    strip = lambda rows: [{k: v for k, v in row.items() if k != "wall_s"} for row in rows]  # noqa: E731
    assert strip(b.curves["fid"]) == strip(a.curves["fid"])
    assert b.curves["train"] == a.curves["train"]  # step 4's row still averages steps 3 and 4
    assert b.metrics["loss/D"] == a.metrics["loss/D"]
    assert b.curves["fid"][1]["wall_s"] <= b.curves["fid"][2]["wall_s"]  # seconds carry over the restart




def _kill_after_first_checkpoint(args: list[str], out: Path, steps: int) -> int:
    """Start the CLI, SIGKILL it once out/checkpoint holds a checkpoint; the step it had reached."""
    proc = subprocess.Popen([sys.executable, "-m", "ganlib.train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    meta = out / "checkpoint" / "meta.json"
    deadline = time.monotonic() + 240
    while not meta.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"run ended before it was killed: {err.decode()[-2000:]}"
    step = ckpt.read_meta(ckpt.find_checkpoint(out / "checkpoint"))["step"]
    assert 0 < step < steps and not (out / "metrics.json").exists()
    return step


def _kill_resume_equals_uninterrupted(tmp_path: Path, extra: list[str], names: list[str]) -> None:
    steps = 40
    args = [*TINY_ARGS, "--steps", str(steps), "--ckpt-every", "5", "--r1-gamma", "1", "--r1-interval", "3",
            "--ema-decay", "0.9", *extra]
    a, b = tmp_path / "a", tmp_path / "b"
    proc = cli([*args, "--out", str(a)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    _kill_after_first_checkpoint([*args, "--out", str(b)], b, steps)
    proc = cli([*args, "--resume", "--out", str(b)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ckpt.read_meta(b / "checkpoint")["step"] == steps
    assert_bitwise(a, b, ["generator", "discriminator", "generator_ema", *names])
    assert (a / "samples.png").read_bytes() == (b / "samples.png").read_bytes()
    assert sorted(p.name for p in b.iterdir() if p.name.startswith(".")) == []  # no temporaries left


@pytest.mark.slow
def test_kill_and_resume_equals_the_uninterrupted_run(tmp_path):
    _kill_resume_equals_uninterrupted(tmp_path, [], [])


@pytest.mark.slow
def test_kill_and_resume_with_an_extra_module_minegan(tmp_path):
    source = _save_source(tmp_path / "source")
    # stage 1 (G frozen) ends at step 20: the kill lands in stage 1 and the resume crosses into stage 2
    _kill_resume_equals_uninterrupted(tmp_path, ["--strategy", "minegan", "--source", str(source)], ["miner"])


# --- two processes (DDP over gloo on CPU) -------------------------------------------------------------

RANK_SCRIPT = '''
"""Train like `python -m ganlib.train`, then each rank saves its own final state dicts, metrics and
fingerprints of the batches and latents it drew."""
import json, sys, time
from pathlib import Path
from safetensors.torch import save_file
from ganlib.config import ArgumentParser, add_arguments, from_arguments
from ganlib.data import DeviceBatcher
from ganlib.distributed import make_accelerator, shutdown, unwrap
from ganlib.strategies.base import Strategy
from ganlib.train import train

parser = ArgumentParser()
add_arguments(parser)
cfg = from_arguments(parser.parse_args(sys.argv[1:]))
acc = make_accelerator(cfg.mixed_precision)
prepared = []
real_prepare = acc.prepare

def spy_prepare(*objs):  # train() prepares once: G, D, extras, optimisers
    result = real_prepare(*objs)
    prepared.extend(result)
    return result

acc.prepare = spy_prepare

# What this rank trains on: a fingerprint of every real batch and every training latent batch.
draws = {"data": [], "latent": []}
real_next, real_map_latent = DeviceBatcher.next, Strategy.map_latent

def spy_next(self, batch_size):
    batch = real_next(self, batch_size)
    draws["data"].append(batch.double().flatten(1).sum(1).tolist())
    return batch

def spy_map_latent(self, z, step, extras):
    if step is not None:  # training latents (evaluation and sample grids use fixed ones)
        draws["latent"].append(z.double().sum(1).tolist())
    return real_map_latent(self, z, step, extras)

DeviceBatcher.next, Strategy.map_latent = spy_next, spy_map_latent
start = time.perf_counter()
result = train(cfg, acc)
wall = time.perf_counter() - start
rank = acc.process_index
for module, name in zip(prepared[:2], ["generator", "discriminator"]):
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(acc, module).state_dict().items()}
    save_file(state, str(Path(cfg.out) / f"rank{rank}-{name}.safetensors"))
(Path(cfg.out) / f"rank{rank}-draws.json").write_text(json.dumps(draws))
(Path(cfg.out) / f"rank{rank}-metrics.json").write_text(json.dumps({**result.metrics, "test/wall_s": wall}))
shutdown(acc)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_2proc(target: list[str], args: list[str]) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *target, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_two_processes_end_with_identical_weights_and_count_both(tmp_path):
    script = tmp_path / "rank_weights.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out"
    steps, batch = 6, 8
    proc = _launch_2proc([str(script)], [*TINY_ARGS, "--steps", str(steps), "--r1-gamma", "1", "--r1-interval", "2",
                                         "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # parameters and BatchNorm running statistics alike, on both ranks and in the written files
    for name in ("generator", "discriminator"):
        r0, r1 = weights(out / f"rank0-{name}.safetensors"), weights(out / f"rank1-{name}.safetensors")
        written = weights(out / f"{name}.safetensors")
        assert r0.keys() == r1.keys() == written.keys()
        assert [k for k in r0 if not torch.equal(r0[k], r1[k])] == [], name
        assert [k for k in r0 if not torch.equal(r0[k], written[k])] == [], name

    m0 = json.loads((out / "rank0-metrics.json").read_text())
    m1 = json.loads((out / "rank1-metrics.json").read_text())
    walls = [m0.pop("test/wall_s"), m1.pop("test/wall_s")]  # each rank's own clock around train()
    assert m0 == m1 == json.loads((out / "metrics.json").read_text())
    assert m0["env/num_processes"] == 2 and len(m0["resources/peak_mem_gb_per_process"]) == 2
    # each process trains on its own real batches and latents: else the summed count below is one
    # process's work counted twice
    d0 = json.loads((out / "rank0-draws.json").read_text())
    d1 = json.loads((out / "rank1-draws.json").read_text())
    for kind in ("data", "latent"):
        assert len(d0[kind]) == len(d1[kind]) == steps, kind
        assert all(a != b for a, b in zip(d0[kind], d1[kind])), kind
    assert m0["timing/timed_steps"] == steps - 1
    # both processes' images count: steps x batch x 2 over the slowest process's timed seconds
    assert m0["timing/img_per_s"] * m0["timing/timed_s"] == pytest.approx((steps - 1) * batch * 2)
    per_process = m0["timing/timed_s_per_process"]
    assert m0["timing/timed_s"] == max(per_process)
    assert all(0 < timed < wall for timed, wall in zip(per_process, walls))


@pytest.mark.slow
def test_two_process_cli_exits_cleanly(tmp_path):
    out = tmp_path / "out"
    proc = _launch_2proc(["-m", "ganlib.train"], [*TINY_ARGS, "--steps", "3", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "abort" not in proc.stderr.lower()
    assert "over 2 process(es)" in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["env/num_processes"] == 2
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint", "discriminator.safetensors", "generator.safetensors", "metrics.json", "samples.png"]
    assert sorted(p.name for p in (out / "checkpoint").iterdir())[-2:] == ["rng-rank0.safetensors",
                                                                          "rng-rank1.safetensors"]



def test_compiled_run_writes_weights_a_transfer_can_load(tmp_path, monkeypatch, capsys):
    # A launch config's dynamo backend (as `accelerate launch --dynamo_backend` exports it) reaches
    # `prepare`: dynamo traces the networks. The eager backend wraps and traces them exactly as
    # inductor does, without minutes of compiling.
    from torch._dynamo.utils import counters

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    monkeypatch.setenv("GANBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # compiling sets it; restored after
    out = tmp_path / "out"
    torch._dynamo.reset()
    counters.clear()
    try:
        code, err = run_main([*TINY_ARGS, "--steps", "2", "--out", str(out)], capsys)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert code == 0, err[-20:]
    assert graphs >= 2  # G and D at least
    G, D = build_networks(NetConfig("dcgan", 28, 1, 100, 8))
    ckpt.load_weights(out / "generator.safetensors", G)  # no `_orig_mod.` prefix on the names
    ckpt.load_weights(out / "discriminator.safetensors", D)
    ckpt.load_weights(out / "checkpoint" / "generator.safetensors", G)


def test_compile_flag_asks_accelerate_for_inductor():
    assert make_accelerator("no", compile=True).state.dynamo_plugin.backend == "INDUCTOR"


def test_compile_option_compiles_the_networks(tiny_config, tmp_path, monkeypatch):
    # torch.compile is lazy: building the trainer wraps the networks, the first step would compile
    from torch._dynamo.eval_frame import OptimizedModule

    from ganlib.train import Trainer

    monkeypatch.setenv("GANBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    trainer = Trainer(tiny_config(compile=True))
    assert trainer.accelerator.state.dynamo_plugin.backend == "INDUCTOR"
    assert isinstance(trainer.G, OptimizedModule) and isinstance(trainer.D, OptimizedModule)
    AcceleratorState._reset_state(True)
    plain = Trainer(tiny_config())
    assert not isinstance(plain.G, OptimizedModule) and not isinstance(plain.D, OptimizedModule)


def test_compiling_keeps_kernels_in_the_ganbench_cache_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("GANBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    AcceleratorState._reset_state(True)
    make_accelerator("no")  # not compiling: inductor's settings untouched
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    AcceleratorState._reset_state(True)
    make_accelerator("no", compile=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert cache_dir() == default_cache_dir()  # torch writes its default into the variable as it looks
    AcceleratorState._reset_state(True)
    make_accelerator("no", compile=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    AcceleratorState._reset_state(True)
    make_accelerator("no", compile=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("memory_format, nhwc", [("auto", True), ("channels_last", True), ("contiguous", False)])
def test_memory_format_auto_is_channels_last_on_cpu(memory_format, nhwc, tmp_path):
    from ganlib.config import TrainConfig
    from ganlib.train import Trainer

    AcceleratorState._reset_state(True)
    cfg = TrainConfig(width=8, batch=8, data="mnist5k:classes=0-1:n=64", steps=1, out=str(tmp_path),
                      progress=False, memory_format=memory_format)
    trainer = Trainer(cfg, make_accelerator("no"))
    conv_weights = [p for m in (trainer.G, trainer.D) for p in m.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) == nhwc for p in conv_weights)
    before = [p.detach().clone() for p in conv_weights]
    logs = trainer.step(0)  # and a step trains in that format, and keeps it
    assert {"loss/D", "loss/G"} <= logs.keys() and all(torch.isfinite(v) for v in logs.values())
    assert all(not torch.equal(p, b) for p, b in zip(conv_weights, before))
    assert all(p.is_contiguous(memory_format=torch.channels_last) == nhwc for p in conv_weights)


# --- model FLOPs (perf/*) ----------------------------------------------------------------------------


def test_flops_per_step_is_the_hand_count_of_an_mlp_step(tiny_config):
    # One scratch step of the MLP pair, counted by hand in multiply-accumulates per sample (x2 for
    # FLOPs): G and D are Linear layers only (BatchNorm and activations are not counted).
    cfg = tiny_config(net="mlp", width=8, size=28, steps=2, warmup_steps=1, log_every=1)
    latent, hidden, pixels = cfg.latent_dim, 4 * cfg.width, cfg.size * cfg.size
    g = latent * hidden + 2 * hidden * hidden + hidden * pixels  # one G forward
    d = pixels * hidden + 2 * hidden * hidden + hidden           # one D forward
    macs = (g                      # G forward, once: D scores its images detached, G back-propagates them
            + 2 * d                # D forward on real and fake
            + 2 * d                # D phase backward: weight gradients of both forwards ...
            + 2 * (d - pixels * hidden)  # ... and input gradients, but not into the images
            + d + d                # G phase: D forward on fake, back through D (input gradients only: D frozen)
            + g + (g - latent * hidden))  # G's weight gradients, and input gradients but not into z
    metrics = train(cfg).metrics
    assert metrics["perf/flops_per_step"] == 2 * macs * cfg.batch
    timed_s = metrics["timing/timed_s"]
    assert metrics["perf/achieved_tflops"] == pytest.approx(
        metrics["perf/flops_per_step"] * metrics["timing/timed_steps"] / timed_s / 1e12)


# --- the output directory: never overwritten silently, checked before any compute ---------------

def test_existing_out_needs_resume_or_overwrite(finished_run, capsys):
    before = snapshot(finished_run)
    code, err = run_main([*TINY_ARGS, "--steps", "2", "--out", str(finished_run)], capsys)
    assert code == 2 and len(err) == 1 and "already holds a run" in err[0] and "--overwrite" in err[0], err
    assert snapshot(finished_run) == before
    code, err = run_main([*TINY_ARGS, "--steps", "2", "--seed", "1", "--overwrite", "--out", str(finished_run)], capsys)
    assert code == 0, err
    assert snapshot(finished_run)["generator.safetensors"] != before["generator.safetensors"]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a training step runs (the checks must come before any compute)."""
    def step(self, step):
        raise AssertionError("trained before the output directory was checked")
    monkeypatch.setattr(Trainer, "step", step)


def test_out_naming_a_file_is_refused_before_training(tmp_path, capsys, no_training):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        code, err = run_main([*TINY_ARGS, "--steps", "2", "--out", str(out)], capsys)
        assert code == 2 and len(err) == 1 and "is not writable" in err[0] and str(out) in err[0], err


def test_too_little_free_space_is_refused_before_training(tmp_path, capsys, no_training, monkeypatch):
    import ganlib.preflight as preflight

    usage = preflight.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    code, err = run_main([*TINY_ARGS, "--steps", "2", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and len(err) == 1 and "1 MiB free, the run needs about" in err[0], err


def test_output_estimate_counts_weights_moments_and_two_checkpoints():
    G, D = build_networks(NetConfig("dcgan", 28, 1, 100, 8))
    opt = torch.optim.Adam(list(G.parameters()) + list(D.parameters()))
    weights = sum(t.numel() * 4 for m in (G, D) for t in (*m.parameters(), *m.buffers()) if t.is_floating_point())
    weights += sum(t.numel() * t.element_size() for m in (G, D) for t in m.buffers() if not t.is_floating_point())
    moments = 2 * 4 * sum(p.numel() for m in (G, D) for p in m.parameters())
    assert output_bytes([G, D], opt.param_groups, None) == weights + 2 * (weights + moments) + SAMPLES_BYTES
