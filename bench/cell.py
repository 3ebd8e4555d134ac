"""Run one cell of the matrix in the current process group and turn it into a results record.

A cell: pretrain the pair's source (cached), transfer with the cell's strategy while recording an
FID curve, evaluate FID/KID/precision/recall and the transfer-fidelity metrics (ganlib.fewshot)
once at the end, and save grids. Any exception in a cell becomes a `failed` record with a one-line
reason; the matrix goes on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid, save_image

from bench import rundir
from bench.env import environment, host_environment
from bench.matrix import Cell, Matrix
from bench.outcome import agree, source_lock_timeout
from ganlib.data import load_images, to_float
from ganlib.errors import UserError
from ganlib.fewshot import training_positions, transfer_metrics
from ganlib.flops import matmul_peak_flops, precision_dtype
from ganlib.metrics import MetricConfig, evaluate_generator
from ganlib.pretrain import pretrain_source, source_meta
from ganlib.strategies import STRATEGIES
from ganlib.train import TrainingDiverged, train

LOG_FILE = "cell.log"          # per-cell log: what ran, how it ended, the traceback of a failure
EVAL_SEED = 4242               # latents of every evaluation (the same for every cell, so curves compare)
NEAREST_FILE = "nearest.png"   # few-shot cells: samples above their nearest training shots
NEAREST_SHOWN = 8              # samples in nearest.png (the first of the final evaluation: typical ones)


def identity(matrix: Matrix, cell: Cell, run_id: str) -> dict[str, Any]:
    """The fields that say which cell a record belongs to."""
    return {
        "schema": 1, "run_id": run_id, "matrix": matrix.name, "cell_id": cell.id,
        "strategy": cell.arm, "strategy_options": cell.strategy.options,
        "augment": cell.augment.id, "augment_options": cell.augment.options,
        "pair": cell.pair.id, "source": cell.pair.source_text, "target": str(cell.pair.target),
        "network": cell.network.name, "size": cell.network.size, "setup": cell.setup, "seed": cell.seed,
    }


def cell_config(matrix: Matrix, cell: Cell) -> dict[str, Any]:
    """The cell's full configuration, as recorded and sent to W&B."""
    return {
        "transfer": matrix.train_config(cell).to_dict(),
        "source_pretrain": source.to_dict() if (source := matrix.source_config(cell)) else None,
        "strategy": {"name": cell.strategy.name, "id": cell.strategy.id, "options": cell.strategy.options},
        "augment": {"name": cell.augment.name, "id": cell.augment.id, "options": cell.augment.options},
        "metrics": dataclasses.asdict(matrix.metrics),
        "setup": matrix.setup(cell.setup).accelerate,
        "network": dataclasses.asdict(cell.network),
    }


def skipped_record(matrix: Matrix, cell: Cell, run_id: str, reason: str) -> dict[str, Any]:
    """A cell that never ran (its setup needs hardware this machine lacks); env: this machine's."""
    return {**identity(matrix, cell, run_id), "status": "skipped", "reason": reason,
            "config": cell_config(matrix, cell), "metrics": {}, "curves": {}, "artifacts": {},
            "env": host_environment()}


def failed_record(matrix: Matrix, cell: Cell, run_id: str, reason: str) -> dict[str, Any]:
    """A cell that could not finish outside run_cell (its launch died); env: this machine's."""
    return {**skipped_record(matrix, cell, run_id, reason), "status": "failed"}


def _reason(err: BaseException) -> str:
    if isinstance(err, (UserError, TrainingDiverged)):
        return str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of memory: " + str(err).splitlines()[0][:200]
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}{where}"


def run_cell(accelerator, matrix: Matrix, cell: Cell, run_dir: Path, run_id: str,
             cache_dir: Path | None = None, sink=None) -> dict[str, Any]:
    """Run one cell on every process of the group; returns the same outcome on every process.

    `sink` (a bench.wandb_sink.WandbSink, main process): the cell's W&B run opens here and follows
    training live; the caller finishes it with `sink.log_cell(record)` once the record is on disk.
    """
    started = time.perf_counter()
    record = {**identity(matrix, cell, run_id), "status": "ok", "reason": None,
              "config": cell_config(matrix, cell), "env": environment(accelerator)}
    live = sink.start_cell(record) if sink is not None else None
    cell_dir = run_dir / rundir.cell_dir(cell.id)
    error = ""
    try:
        metrics, curves, artifacts = _run(accelerator, matrix, cell, run_dir, cell_dir, cache_dir, live)
        record.update(metrics=metrics, curves=curves, artifacts=artifacts)
    except Exception as err:  # one cell failing must not stop the matrix
        if isinstance(err, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        error = traceback.format_exc()
        record.update(status="failed", reason=_reason(err), metrics={}, curves={},
                      artifacts={"dir": rundir.cell_dir(cell.id)})
    record.setdefault("metrics", {})["timing/wall_s"] = time.perf_counter() - started
    record["artifacts"]["log"] = f"{rundir.cell_dir(cell.id)}/{LOG_FILE}"
    record = agree(accelerator, record)  # one rank failing fails the cell on every rank
    if accelerator.is_main_process:
        _write_log(cell_dir / LOG_FILE, record, error)
    return record


def _write_log(path: Path, record: dict[str, Any], error: str) -> None:
    """The cell's log for a person: status, losses and FID over time, final metrics, the traceback."""
    lines = [f"cell {record['cell_id']} (run {record['run_id']}): {record['status']}"
             + (f": {record['reason']}" if record["reason"] else "")]
    for row in record["curves"].get("train", []):
        lines.append("train " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in row.items()))
    for row in record["curves"].get("fid", []):
        lines.append(f"fid   step {row['step']}  wall_s {row['wall_s']}  fid {row.get('fid')}")
    lines += [f"{key} = {value}" for key, value in sorted(record["metrics"].items())]
    if error:
        lines += ["", error.rstrip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _run(accelerator, matrix: Matrix, cell: Cell, run_dir: Path, cell_dir: Path,
         cache_dir: Path | None, live=None) -> tuple[dict, dict, dict]:
    cfg = matrix.train_config(cell, out=str(cell_dir), progress=False)
    network = cell.network
    channels = cell.pair.channels

    # the whole target domain for FID (few-shot training sees only n of it), or the pair's eval set
    domain = load_images(cell.pair.eval_target, network.size, channels)
    real = domain.images
    target = load_images(cell.pair.target, network.size, channels).images
    real_key = f"{cell.pair.eval_target}|{network.size}px|{channels}ch"
    m = matrix.metrics
    num_samples = min(m.num_samples, real.shape[0]) if m.cap_at_real else m.num_samples
    final_cfg = MetricConfig(extractor=m.extractor, num_samples=num_samples,
                             precision_recall=m.precision_recall, inception_weights=m.inception_weights,
                             cache_dir=str(cache_dir) if cache_dir else None, more_fake_than_real=not m.cap_at_real)
    curve_cfg = dataclasses.replace(final_cfg, num_samples=min(m.curve_samples, num_samples), precision_recall=False)

    metrics: dict[str, Any] = {"timing/source_pretrain_s": None, "timing/source_cache_hit": None}  # no source
    source_dir = ""
    if STRATEGIES.get(cfg.strategy).loads_source and not cfg.source_checkpoint:  # a given checkpoint: no pretraining
        src_cfg = matrix.source_config(cell, progress=False)
        # cache_dir is the cache root (as $GANBENCH_CACHE): sources live in its sources/ (ganlib.pretrain)
        entry, hit = pretrain_source(src_cfg, Path(cache_dir) / "sources" if cache_dir else None, accelerator,
                                     lock_timeout_s=source_lock_timeout(accelerator.num_processes))
        metrics["timing/source_pretrain_s"] = source_meta(entry).get("pretrain_s")
        metrics["timing/source_cache_hit"] = hit
        source_dir = str(entry)
    cfg = dataclasses.replace(cfg, source=source_dir)

    eval_seconds = [0.0]

    def curve_point(step: int, G, map_latent) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        result = evaluate_generator(accelerator, G, real, real_key, curve_cfg, seed=EVAL_SEED, transform_z=map_latent)
        eval_seconds[0] += time.perf_counter() - t0
        if live is not None:  # main process only: the grid the cell will end with, as it is now
            live.log_samples(step, lambda: _sample_grid(G, map_latent, cfg.latent_dim))
        return {"fid": result.get("quality/fid")} if "quality/fid" in result else None

    def transfer_fidelity(fake: torch.Tensor) -> dict[str, Any]:
        """Main process only: ganlib.fewshot's metrics of the final samples, and nearest.png."""
        separate = None if cell.pair.shots_in_eval else target  # a separate eval set holds no shot
        fidelity = transfer_metrics(fake, cell.pair.target, domain, m.extractor, device=accelerator.device,
                                    inception_weights=m.inception_weights, shots=separate,
                                    intra_lpips=m.intra_lpips)
        if fidelity.nearest is not None:
            shots = target if separate is not None else real[training_positions(cell.pair.target, real.shape[0])]
            _save_nearest(fake[:NEAREST_SHOWN], shots[fidelity.nearest[:NEAREST_SHOWN]], cell_dir / NEAREST_FILE)
        return fidelity.metrics

    result = train(cfg, accelerator, eval_fn=curve_point if m.eval_every else None,
                   log_fn=live.log_row if live is not None else None)
    t0 = time.perf_counter()
    quality = evaluate_generator(accelerator, result.generator, real, real_key, final_cfg, seed=EVAL_SEED,
                                 transform_z=result.map_latent, extra=transfer_fidelity)
    eval_seconds[0] += time.perf_counter() - t0
    if quality.get("quality/status") == "failed":
        raise TrainingDiverged(f"evaluation failed: {quality.get('quality/reason')}")

    tm = result.metrics
    transfer_s = tm["timing/train_s"]
    metrics.update({k: v for k, v in tm.items() if not k.startswith("env/")})
    metrics.update(quality)
    metrics.update({
        "timing/transfer_s": transfer_s,
        "timing/eval_s": eval_seconds[0],
        "timing/device_seconds": transfer_s * accelerator.num_processes,
        **_utilisation(accelerator, tm),
        **_time_to_target(result.curves.get("fid", []), m.target_fid),
        **_best_curve_point(result.curves.get("fid", [])),
    })
    if accelerator.is_main_process:
        cell_dir.mkdir(parents=True, exist_ok=True)
        save_image(to_float(target[:64]).float() * 0.5 + 0.5, cell_dir / "real.png", nrow=8, padding=1)
        (cell_dir / "curves.json").write_text(json.dumps(result.curves))
    accelerator.wait_for_everyone()
    here = rundir.cell_dir(cell.id)
    artifacts = {"dir": here, "samples": f"{here}/samples.png", "real": f"{here}/real.png"}
    if cell.pair.target.n is not None:  # the same decision transfer_metrics makes, known on every rank
        artifacts["nearest"] = f"{here}/{NEAREST_FILE}"
    return metrics, result.curves, artifacts


def _save_nearest(samples: torch.Tensor, shots: torch.Tensor, path: Path) -> None:
    """Samples (top row) above the training image nearest to each (bottom row), uint8 [k, C, H, W] each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(to_float(torch.cat([samples, shots])) * 0.5 + 0.5, path, nrow=samples.shape[0], padding=1)


def _sample_grid(G, map_latent, latent_dim: int) -> torch.Tensor:
    """An 8x8 grid of G's samples at fixed latents (seed EVAL_SEED), (3, H, W) in [0, 1], on the CPU.
    Its own generator and G in eval mode: drawing it changes no random stream and no statistic."""
    device = next(G.parameters()).device
    z = torch.randn(64, latent_dim, generator=torch.Generator().manual_seed(EVAL_SEED)).to(device)
    images = G(map_latent(z)).float().clamp(-1, 1) * 0.5 + 0.5
    return make_grid(images.cpu(), nrow=8, padding=1)


_PEAKS: dict[str, float] = {}  # matmul peak FLOP/s per precision, measured once per launch


def _utilisation(accelerator, train_metrics: dict[str, Any]) -> dict[str, Any]:
    """The step's achieved FLOP/s as a fraction of this device's matmul peak in the same dtype."""
    precision = accelerator.mixed_precision
    if precision not in _PEAKS:
        _PEAKS[precision] = matmul_peak_flops(accelerator.device, precision_dtype(precision))
    achieved = train_metrics.get("perf/achieved_tflops")
    peak = _PEAKS[precision] / 1e12
    return {"perf/peak_tflops": peak, "perf/peak_fraction": achieved / peak if achieved else None}


def _best_curve_point(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The lowest FID on the curve and its step: a transfer that peaks early and then degrades (D
    overfitting n images) shows here, not in the final FID. Curve FIDs use `curve_samples`, so
    compare them with the curve's last point, not with the final `quality/fid`."""
    points = [p for p in curve if p.get("fid") is not None and math.isfinite(p["fid"])]
    if not points:
        return {"quality/curve_fid_best": None, "quality/curve_fid_best_step": None}
    best = min(points, key=lambda p: p["fid"])
    return {"quality/curve_fid_best": best["fid"], "quality/curve_fid_best_step": best["step"]}


def _time_to_target(curve: list[dict[str, Any]], target: float | None) -> dict[str, Any]:
    """Training seconds and steps until the curve first reaches `target` FID (None: never or no target)."""
    out: dict[str, Any] = {"timing/time_to_target_s": None, "timing/steps_to_target": None,
                           "quality/target_fid": target}
    if target is None:
        return out
    for point in curve:
        fid = point.get("fid")
        if fid is not None and fid <= target:
            out["timing/time_to_target_s"] = point["wall_s"]
            out["timing/steps_to_target"] = point["step"]
            break
    return out
