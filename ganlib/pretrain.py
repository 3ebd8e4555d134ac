"""Source pretraining, cached on disk: eight strategies on one pair pretrain their source once.

A source is G and D trained from scratch on the source dataset by the one training loop. The cache
entry's name is a hash of everything that determines those weights (network, size, width, latent
size, channels, the canonical dataset spec, steps, batch, seed, loss, learning rates, betas, R1,
EMA, precision and the number of processes), as stylegan2-ada keys its cached dataset statistics.
Layout of an entry, `<cache_dir>/<key>/`:
    generator.safetensors, discriminator.safetensors   the source weights (what `--source` reads)
    samples.png, metrics.json                           what the pretraining run wrote
    meta.json                                           written last: the completeness marker, with
                                                        the SHA-256 of both weight files (checked on
                                                        every hit; a mismatch is retrained)

Run it:  python -m ganlib.pretrain --net dcgan --data mnist5k:classes=0-4 --steps 2000
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from ganlib import checkpoint as ckpt
from ganlib.cache import cache_root, file_sha256
from ganlib.config import ArgumentParser, TrainConfig, add_arguments, from_arguments
from ganlib.data import DataSpec
from ganlib.distributed import broadcast_object, make_accelerator, shutdown
from ganlib.errors import UserError, exit_on_user_error
from ganlib.preflight import check_writable
from ganlib.train import train

WEIGHT_FILES = ("generator.safetensors", "discriminator.safetensors")
LOCK_TIMEOUT_ENV = "GANBENCH_LOCK_TIMEOUT_S"  # longest wait for another job's pretraining of the same source, s
LOCK_TIMEOUT_S = 3600.0  # its default: a long pretraining elsewhere; bench sets it below its collective timeout
KEY_VERSION = 2  # bump when a cached source would come out different (2: NHWC on CPU, whole-map matmuls)

# Besides the run-only fields and the options that are off (TrainConfig.key_fields leaves those
# out), the fields a source's key ignores: how the kernels run, and what pretraining replaces
# (strategy, source). Every other field, including ones added later, is part of the key: a needless
# cache miss costs time, a wrong hit gives wrong weights.
_NOT_IN_KEY = frozenset({
    "compile", "memory_format", "strategy", "strategy_options", "source",
    "mixed_precision",  # replaced by the precision the accelerator actually runs
    "augment", "augment_options",  # a source is always pretrained without augmentation
})


def default_cache_dir() -> Path:
    """`$GANBENCH_CACHE/sources`, or `~/.cache/ganbench/sources` when the variable is unset."""
    return cache_root() / "sources"


def source_config(cfg: TrainConfig) -> TrainConfig:
    """The config a source is trained with: `cfg` from scratch, no source, no resume, no eval, and no
    augmentation (every strategy and augmentation of a pair transfers from the same source)."""
    return dataclasses.replace(cfg, strategy="scratch", strategy_options={}, source="", resume=False,
                               eval_every=0, ckpt_every=0, augment="none", augment_options={})


def source_key_fields(cfg: TrainConfig, num_processes: int, mixed_precision: str) -> dict[str, Any]:
    """The values that determine a source's weights (shown in meta.json so a key can be explained).

    `num_processes` counts because the batch is per process; `mixed_precision` is what the
    accelerator runs ("no", "bf16", "fp16"), not the config's "" (= whatever the launcher chose).
    """
    fields = {k: v for k, v in source_config(cfg).key_fields().items() if k not in _NOT_IN_KEY}
    fields["data"] = str(DataSpec.parse(cfg.data))
    fields["channels"] = cfg.channels or DataSpec.parse(cfg.data).channels
    fields["mixed_precision"] = mixed_precision or "no"
    fields["num_processes"] = int(num_processes)
    fields["key_version"] = KEY_VERSION
    return fields


def source_key(cfg: TrainConfig, num_processes: int = 1, mixed_precision: str = "no") -> str:
    """Cache entry name for the source `cfg` would pretrain: `<net>-<size>px-<data slug>-<hash>`."""
    fields = source_key_fields(cfg, num_processes, mixed_precision)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.net}-{cfg.size}px-{DataSpec.parse(cfg.data).slug}-{digest}"


def is_complete(entry: Path) -> bool:
    """Whether a cache entry holds a finished source (meta.json is written last)."""
    entry = Path(entry)
    return all((entry / name).is_file() for name in (*WEIGHT_FILES, ckpt.META))


def damage(entry: Path) -> str | None:
    """Why a complete cache entry cannot be trusted (a checksum that differs or is absent), or None."""
    try:
        expected = json.loads((Path(entry) / ckpt.META).read_text()).get("sha256") or {}
    except (OSError, ValueError):
        return "meta.json unreadable"
    for name in WEIGHT_FILES:
        if name not in expected:
            return f"{name} has no checksum (made by an older ganbench)"
        if file_sha256(Path(entry) / name) != expected[name]:
            return f"{name} does not match its checksum"
    return None


def source_meta(entry: Path) -> dict[str, Any]:
    """A cache entry's meta.json: key fields, `pretrain_s` (the original wall seconds), when it was made."""
    try:
        return json.loads((Path(entry) / ckpt.META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"source cache entry {entry} is incomplete or corrupt ({err.__class__.__name__}); "
                        "delete it and rerun") from None


def lock_timeout() -> float:
    """Seconds to wait for a source another job is pretraining: $GANBENCH_LOCK_TIMEOUT_S or LOCK_TIMEOUT_S."""
    value = os.environ.get(LOCK_TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else LOCK_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise UserError(f"{LOCK_TIMEOUT_ENV}={value!r} must be a number of seconds >= 0")
    return seconds


@contextlib.contextmanager
def _lock(path: Path, timeout_s: float, poll_s: float = 0.2) -> Iterator[None]:
    """An exclusive advisory lock on `path` (flock), held by this process until the block ends.

    Waits at most `timeout_s`, then raises naming the holder (host, pid and since when, which the
    holder writes into the file), so a stuck job elsewhere is visible instead of a silent wait.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "an unknown process"
                    raise UserError(f"source cache lock {path} still held after {timeout_s:.0f} s by {holder}; "
                                       f"wait for that job, stop it, or raise {LOCK_TIMEOUT_ENV}") from None
                time.sleep(poll_s)
        try:
            handle.truncate(0)
            handle.write(f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
            handle.flush()
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def pretrain_source(cfg: TrainConfig, cache_dir: Path | None = None, accelerator=None,
                    lock_timeout_s: float | None = None) -> tuple[Path, bool]:
    """Train (or reuse) the source for `cfg`; returns (cache entry directory, whether it was a hit).

    `cfg` describes the source run (its `data` is the source dataset, its `steps` the pretraining
    steps); its strategy, source, out and resume are ignored. Every process must call this: on a
    miss all processes train together (the one loop, strategy scratch) into a temporary directory
    that the main process renames into place. Concurrent jobs on one machine serialise on a lock
    file per key, so a second job waits (at most `lock_timeout()`) and then reuses the first job's
    result (`lock_timeout_s`, default `lock_timeout()`; under several processes keep it below the
    collective timeout, as the others wait in a broadcast meanwhile). A hit whose weights do not
    match their checksums is retrained, with a warning.
    `cache_dir` defaults to `default_cache_dir()`.
    """
    cfg.validate()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    accelerator = accelerator or make_accelerator(cfg.mixed_precision, compile=cfg.compile)
    fields = source_key_fields(cfg, accelerator.num_processes, accelerator.mixed_precision)
    key = source_key(cfg, accelerator.num_processes, accelerator.mixed_precision)
    entry = cache_dir / key

    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            check_writable(cache_dir, "source cache", "set GANBENCH_CACHE to a writable directory")
            stack.enter_context(_lock(cache_dir / f".{key}.lock",
                                           lock_timeout() if lock_timeout_s is None else lock_timeout_s))
            hit = is_complete(entry)  # checked under the lock: another job may just have finished it
            why = damage(entry) if hit else None
            if why:
                warnings.warn(f"cached source {entry} is damaged ({why}); retraining it", stacklevel=2)
                hit = False
        else:
            hit = None
        hit = broadcast_object(accelerator, hit)
        if hit:
            return entry, True

        tmp = cache_dir / f".{key}.tmp{os.getpid()}"
        tmp = Path(broadcast_object(accelerator, str(tmp)))  # the main process's name on every process
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        started = time.perf_counter()
        try:
            result = train(dataclasses.replace(source_config(cfg), out=str(tmp)), accelerator)
            if accelerator.is_main_process:
                shutil.rmtree(tmp / "checkpoint", ignore_errors=True)  # optimiser state: not part of a source
                meta = {"key": key, "fields": fields, "pretrain_s": time.perf_counter() - started,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "img_per_s": result.metrics.get("timing/img_per_s"),
                        "sha256": {name: file_sha256(tmp / name) for name in WEIGHT_FILES}}
                (tmp / ckpt.META).write_text(json.dumps(meta, indent=1, sort_keys=True))
                if entry.exists():  # an incomplete or damaged leftover (a sound one would have been a hit)
                    shutil.rmtree(entry)
                os.replace(tmp, entry)
        finally:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
    return entry, False


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--cache-dir", default="", help="source cache directory; default $GANBENCH_CACHE/sources")
    args = parser.parse_args(argv)
    cfg = from_arguments(args)
    accelerator = make_accelerator(cfg.mixed_precision, compile=cfg.compile)
    entry, hit = pretrain_source(cfg, Path(args.cache_dir) if args.cache_dir else None, accelerator)
    if accelerator.is_main_process:
        cost = source_meta(entry)["pretrain_s"]
        print(f"{'reused' if hit else 'pretrained'} source {entry} (pretraining took {cost:.1f} s)")
    shutdown(accelerator)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
