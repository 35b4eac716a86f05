"""Training machinery shared by both phases: one process or torchrun, sharded batches, checkpoints, resume.

One process runs on the CPU (or the GPU when there is one)::

    rtrt train embeddings ...

Several processes run under torchrun, which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR;
``setup`` then starts DistributedDataParallel with gloo on the CPU and nccl on GPUs::

    torchrun --nproc_per_node=2 -m rtrt.trainer.cli embeddings ...

Every rank sees its own shard of each global batch (``DistributedSampler`` order: rank r takes
positions r, r + N, ... of the epoch's permutation, so the union over ranks of step k is the same
global batch a single process takes). Only rank 0 writes files.

Determinism and resume: the order of epoch e depends only on (seed, e) and the RNGs are reseeded from
(seed, e) when it starts, so a run resumed from the checkpoint written at the end of epoch e-1
continues exactly as the uninterrupted run. Checkpoints (``last.pt`` with the trainable state and
the optimizer, ``config.json`` beside it) are written atomically at the end of every epoch.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as torch_dist

from rtrt.runtime.bundle import atomic_write_bytes, atomic_write_json
from rtrt.runtime.errors import InputError

__all__ = [
    "Dist",
    "setup",
    "teardown",
    "seed_all",
    "cosine_lr",
    "RunFiles",
    "Checkpoint",
    "Metrics",
    "fit",
    "check_output",
    "config_dict",
]


@dataclass
class Dist:
    """Where this process sits in the job."""

    rank: int = 0  # global rank (RANK)
    world_size: int = 1  # number of processes (WORLD_SIZE)
    local_rank: int = 0  # rank on this machine (LOCAL_RANK): picks the GPU
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))  # where training runs

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a no-op in one process)."""
        if self.distributed:
            torch_dist.all_reduce(t)
        return t

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel around ``module`` when there are several processes."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def log(self, message: str) -> None:
        """A line on stderr from rank 0 only."""
        if self.is_main:
            print(message, file=sys.stderr, flush=True)


def setup(device: str = "auto") -> Dist:
    """Read torchrun's environment (absent: one process) and pick the device.

    ``device``: ``auto`` (the GPU of this rank when CUDA is available, else the CPU), ``cpu`` or ``cuda``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def teardown(d: Dist) -> None:
    if d.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, base: float, warmup: int = 0) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay from ``base`` to ``base / 10``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def config_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_defaults(cls: type) -> dict[str, Any]:
    """A config dataclass's field defaults in ``config_dict``'s JSON form (fields without one left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return json.loads(json.dumps(out, default=str))


def check_output(out: str | os.PathLike, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse early (before any work) an output that exists without ``--overwrite``."""
    p = Path(out)
    if p.exists() and not overwrite:
        raise InputError(f"{p}: already exists; pass --overwrite to replace it")
    if p.exists() and not p.is_dir():
        raise InputError(f"{p}: exists and is not a bundle directory")
    return p


@dataclass
class RunFiles:
    """The files a run keeps next to its output bundle ``<out>``."""

    out: Path  # the bundle directory written at the end
    checkpoints: Path  # <out>.ckpt/: last.pt + config.json, rewritten every epoch
    metrics: Path  # <out>.metrics.jsonl: one JSON object per step and per epoch, appended

    @classmethod
    def for_output(cls, out: str | os.PathLike) -> "RunFiles":
        out = Path(out)
        return cls(out, out.with_name(out.name + ".ckpt"), out.with_name(out.name + ".metrics.jsonl"))


class Checkpoint:
    """``last.pt`` (loaded with ``weights_only=True``: tensors and plain containers only) + ``config.json``.

    ``ignore`` names config fields that may differ on ``--resume`` (flags that do not change the result).
    ``defaults``: what a field missing from a saved config (one written before the field existed) meant.
    """

    def __init__(self, directory: Path, config: Mapping[str, Any], ignore: tuple[str, ...] = (),
                 defaults: Mapping[str, Any] | None = None):
        self.directory = Path(directory)
        self.path = self.directory / "last.pt"
        self.config = dict(config)
        self.ignore = set(ignore)
        self.defaults = dict(defaults or {})

    def clear(self, d: Dist) -> None:
        """A fresh run starts without a stale checkpoint that a later ``--resume`` could pick up."""
        if d.is_main and self.directory.exists():
            shutil.rmtree(self.directory)
        d.barrier()

    def save(self, state: Mapping[str, Any], d: Dist) -> None:
        if d.is_main:
            buf = io.BytesIO()
            torch.save(dict(state), buf)
            atomic_write_bytes(self.path, buf.getvalue())
            atomic_write_json(self.directory / "config.json", self.config)
        d.barrier()

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, resume: bool, d: Dist) -> tuple[int, list]:
        """``(first epoch, history)``: restored from the checkpoint with ``--resume``, else a fresh start."""
        state = self.load() if resume else None
        if state is None:
            if not resume:
                self.clear(d)
            return 0, []
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["epoch"]) + 1
        d.log(f"resuming after epoch {start} from {self.path}")
        return start, list(state["history"])

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none; refuses a checkpoint of other settings."""
        if not self.path.is_file():
            return None
        try:
            saved = json.loads((self.directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{self.directory / 'config.json'}: unreadable checkpoint config ({e})") from None
        diff = sorted(
            k for k in set(saved) | set(self.config)
            if k not in self.ignore and saved.get(k, self.defaults.get(k)) != self.config.get(k)
        )
        if diff:
            k = diff[0]
            raise InputError(
                f"{self.directory}: checkpoint was made with other settings ({k}: {saved.get(k, self.defaults.get(k))!r} now {self.config.get(k)!r}); "
                "run without --resume to start over"
            )
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"{self.path}: unreadable checkpoint ({type(e).__name__})") from None


class Metrics:
    """Appends one JSON object per line to ``path`` (rank 0 only)."""

    def __init__(self, path: Path, d: Dist):
        self.path = Path(path)
        self.enabled = d.is_main

    def log(self, **record: Any) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def _shard(num_samples: int, d: Dist, seed: int, epoch: int) -> list[int]:
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(num_samples), num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def fit(
    d: Dist,
    *,
    num_samples: int,
    global_batch: int,
    epochs: int,
    seed: int,
    optimizer: torch.optim.Optimizer,
    lr: float,
    warmup: int,
    step: Callable[[list[int], int], dict[str, float]],
    state: Callable[[], dict[str, Any]],
    checkpoint: Checkpoint,
    metrics: Metrics,
    desc: str,
    start_epoch: int = 0,
    history: list[dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """Run epochs ``start_epoch .. epochs-1``; return ``history`` (summaries of earlier epochs) plus theirs.

    ``step(indices, global_count)`` trains on this rank's sample indices of one global batch of
    ``global_count`` samples and returns this rank's per-sample means (``loss`` and any parts).
    The learning rate follows ``cosine_lr`` over all steps of the run. ``state()`` is what the
    end-of-epoch checkpoint holds, besides the epoch number and the history.
    """
    from tqdm import tqdm

    if global_batch % d.world_size:
        raise InputError(f"--batch-size {global_batch} is not divisible by the {d.world_size} processes")
    local_batch = global_batch // d.world_size
    per_rank = math.ceil(num_samples / d.world_size)
    steps_per_epoch = math.ceil(per_rank / local_batch)
    total = steps_per_epoch * epochs
    summaries = list(history or [])
    for epoch in range(start_epoch, epochs):
        seed_all(seed * 1000 + epoch)
        order = _shard(num_samples, d, seed, epoch)
        sums: dict[str, float] = {}
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}", disable=not d.is_main, file=sys.stderr, leave=False)
        for k in range(steps_per_epoch):
            idx = order[k * local_batch:(k + 1) * local_batch]
            count = d.all_reduce(torch.tensor([float(len(idx))], device=d.device)).item()
            gstep = epoch * steps_per_epoch + k
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(gstep, total, lr, warmup)
            parts = step(idx, int(count))
            names = sorted(parts)
            # Sample-weighted means over all ranks, for the log and the bar.
            vec = d.all_reduce(torch.tensor([parts[n] * len(idx) for n in names], device=d.device, dtype=torch.float64))
            means = {n: float(v) / count for n, v in zip(names, vec.tolist())}
            for n, v in means.items():
                sums[n] = sums.get(n, 0.0) + v * count
            seen += int(count)
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{means['loss']:.4f}", samples_s=f"{rate:.1f}")
            bar.update(1)
            metrics.log(kind="step", epoch=epoch, step=gstep, lr=optimizer.param_groups[0]["lr"], samples=int(count), **means)
        bar.close()
        seconds = time.perf_counter() - t0
        summary = {"epoch": epoch, **{n: v / max(seen, 1) for n, v in sums.items()}, "samples": seen,
                   "seconds": round(seconds, 3), "samples_per_s": round(seen / max(seconds, 1e-9), 3)}
        summaries.append(summary)
        metrics.log(kind="epoch", **summary)
        d.log(f"{desc} epoch {epoch + 1}/{epochs}: loss {summary['loss']:.4f}, {summary['samples_per_s']:.1f} samples/s")
        checkpoint.save({**state(), "epoch": epoch, "history": summaries}, d)
    return summaries
