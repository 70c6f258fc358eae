"""The one training loop used by every stage (gallery, query, supernet, retrain, study).

A stage supplies a *task*: an ``nn.Module`` whose ``forward(x, y, index, step)`` returns
``(loss, logs)``. The loop owns everything else: batching + augmentation, optimizer and the
warm-up/cosine schedule, bf16 autocast, channels_last, DDP (torchrun, gloo on CPU), atomic
checkpoints with exact resume (mid-epoch too), metrics JSONL and progress. SIGTERM stops it cleanly at
the next step boundary, after a checkpoint (:mod:`cmpnas.training.signals`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmpnas import progress
from cmpnas.config import TrainConfig
from cmpnas.data.batching import fetch_batch
from cmpnas.data.transforms import augment_batch, normalize_batch
from cmpnas.devices import resolve_precision
from cmpnas.distributed import DistInfo, init_distributed
from cmpnas.errors import CmpnasError, Terminated
from cmpnas.io import append_jsonl, read_jsonl, write_text_atomic
from cmpnas.training.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from cmpnas.training.signals import SigtermFlag


@dataclass
class TrainResult:
    steps: int
    epochs: float
    seconds: float
    images_per_second: float
    final_loss: float
    resumed_from_step: int = 0
    gflops_per_second: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    precision: str = "fp32"  # what ran (``auto`` resolved)


def epoch_order(n: int, epoch: int, seed: int, info: DistInfo) -> np.ndarray:
    """Deterministic shuffled order for an epoch; every rank gets an equal-length shard."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // info.world_size
    return perm[info.rank * per_rank : (info.rank + 1) * per_rank]


def cosine_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return factor


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on BN/bias (1-d) parameters, as SPOS/timm do."""
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def schedule_steps(n_images: int, cfg: TrainConfig, world_size: int = 1) -> tuple[int, int]:
    """(steps per epoch, total steps) of a schedule: what the loop runs, for tasks that plan by step."""
    per_rank_batch = max(1, cfg.batch_size // world_size)
    steps_per_epoch = (n_images // world_size) // per_rank_batch
    return steps_per_epoch, max(1, math.ceil(cfg.epochs * steps_per_epoch))


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(module, cfg.optim.weight_decay)
    factories = {
        "sgd": lambda: torch.optim.SGD(
            groups,
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0,
        ),
        "adamw": lambda: torch.optim.AdamW(groups, lr=cfg.optim.lr),
    }
    return factories[cfg.optim.name]()


def run_identity(stage: str, task: nn.Module, cfg: TrainConfig, extra: str = "") -> str:
    """What a checkpoint must match to be resumed: stage, parameter shapes, training config."""
    h = hashlib.sha256(stage.encode())
    for k, v in task.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)}".encode())
    h.update(cfg.model_dump_json().encode())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def trim_metrics(path: Path, step: int) -> None:
    """Keep the log lines up to ``step``: a killed run logged steps that the resumed run does again, and a
    kill in the middle of an append can leave a torn last line."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if isinstance(r, dict) and int(r.get("step", 0)) <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if not kept:
        path.unlink()
    elif text != path.read_text(encoding="utf-8", errors="replace"):
        write_text_atomic(path, text)


def _terminated(stage: str, step: int, total_steps: int) -> Terminated:
    return Terminated(
        f"Stage '{stage}' stopped by SIGTERM at step {step}/{total_steps}; its checkpoint is saved.",
        "rerun the same command with --resume to continue exactly where it stopped (cmpnas run resumes by "
        "itself)",
    )


def training_device(info: DistInfo) -> torch.device:
    """CUDA (this rank's GPU under torchrun) when available, else the CPU."""
    if torch.cuda.is_available():
        import os

        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def train(
    task: nn.Module,
    dataset: Any,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    stage: str = "train",
    resume: bool = False,
    macs_per_image: int | None = None,
    identity_extra: str = "",
    on_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Train ``task`` on ``dataset``; checkpoints go to ``out_dir/checkpoint.pt`` (rank 0 only).

    ``on_start`` (rank 0) runs once the run is known to start or resume, e.g. to write ``config.yaml``: a
    foreign checkpoint is refused before anything in ``out_dir`` changes.
    """
    info = init_distributed()
    out = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * info.rank)

    n = len(dataset)
    per_rank_batch = max(1, cfg.batch_size // info.world_size)
    steps_per_epoch, total_steps = schedule_steps(n, cfg, info.world_size)
    if steps_per_epoch < 1:
        raise CmpnasError(
            f"Stage '{stage}': {n} training images is less than one batch of {cfg.batch_size}.",
            "lower the batch_size or use more data",
        )
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    device = training_device(info)
    task = task.to(device)
    if cfg.channels_last:
        task = task.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(task, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_warmup(total_steps, warmup))
    identity = run_identity(stage, task, cfg, identity_extra)

    step = 0
    losses: list[float] = []  # the last log_every losses are checkpointed: logged means stay exact on resume
    ckpt_path = out / CHECKPOINT_NAME
    if resume and ckpt_path.exists():
        payload = load_checkpoint(ckpt_path, identity)
        task.load_state_dict(payload["task"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        restore_rng(payload["rng"], gen)
        step = int(payload["step"])
        losses = [float(v) for v in payload.get("recent_losses", [])]
        progress.event("resume", stage=stage, message=f"{stage}: resuming at step {step}/{total_steps}")
    elif resume:
        progress.event("resume", stage=stage, message=f"{stage}: no checkpoint in {out}, starting fresh")
    resumed_from = step
    if info.is_main:
        trim_metrics(out / "metrics.jsonl", step)
    if on_start is not None and info.is_main:
        on_start()

    model: nn.Module = task
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            task,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(task, "dynamic_graph", False)),
        )

    def checkpoint() -> None:
        if info.is_main:
            save_checkpoint(
                ckpt_path,
                {
                    "identity": identity,
                    "step": step,
                    "task": task.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(gen),
                    "recent_losses": losses[-cfg.log_every :],
                },
            )

    precision = resolve_precision(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    task.train()
    bar = progress.Bar(total_steps - step, f"{stage}")
    t0 = time.perf_counter()
    last_ckpt = t0
    seen = 0
    history: list[dict[str, Any]] = []
    order_epoch, order = -1, np.empty(0, dtype=np.int64)
    loss_value = losses[-1] if losses else float("nan")
    stop = SigtermFlag()
    try:
        with stop:
            while step < total_steps:
                epoch, offset = divmod(step, steps_per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = epoch_order(n, epoch, cfg.seed, info), epoch
                idx = order[offset * per_rank_batch : (offset + 1) * per_rank_batch]
                imgs, labels = fetch_batch(dataset, idx.tolist())
                x = normalize_batch(imgs.to(device, non_blocking=True), mean, std)
                if cfg.augment:
                    x = augment_batch(x, gen)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                index = torch.as_tensor(idx, dtype=torch.int64)
                labels = labels.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss, logs = model(x, labels, index, step)
                if not torch.isfinite(loss):
                    raise CmpnasError(
                        f"Stage '{stage}': the loss became {float(loss.detach())} at step {step}.",
                        "lower the learning rate (optim.lr) or use precision: fp32",
                    )
                loss.backward()
                if hasattr(task, "after_backward"):
                    task.after_backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_([p for p in task.parameters() if p.grad is not None], cfg.grad_clip)
                if hasattr(task, "before_step"):
                    task.before_step(optimizer)
                optimizer.step()
                if hasattr(task, "after_step"):
                    task.after_step(optimizer)
                scheduler.step()
                step += 1
                seen += len(idx) * info.world_size
                loss_value = float(loss.detach())
                losses.append(loss_value)
                bar.update(1, seen, f"loss {loss_value:.3f}")
                if step % cfg.log_every == 0 or step == total_steps or step % steps_per_epoch == 0:
                    el = time.perf_counter() - t0
                    rec = {
                        "stage": stage,
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 3),
                        "loss": float(np.mean(losses[-cfg.log_every :])),
                        "lr": scheduler.get_last_lr()[0],
                        "img_per_s": seen / el if el > 0 else 0.0,
                        **logs,
                    }
                    history.append(rec)
                    if info.is_main:
                        append_jsonl(out / "metrics.jsonl", rec)
                saved = (
                    step % steps_per_epoch == 0 or step == total_steps or time.perf_counter() - last_ckpt > 60
                )
                if saved:
                    checkpoint()
                    last_ckpt = time.perf_counter()
                    if step % steps_per_epoch == 0 or step == total_steps:
                        el = time.perf_counter() - t0
                        eta = el / max(1, step - resumed_from) * (total_steps - step)
                        progress.event(
                            "epoch",
                            stage=stage,
                            message=(
                                f"{stage}: epoch {step / steps_per_epoch:.2f}/{cfg.epochs:g} loss {losses[-1]:.4f} "
                                f"{seen / el:,.0f} img/s, ETA {progress.format_seconds(eta)}"
                            ),
                        )
                if stop.agreed(info, device):
                    if not saved:
                        checkpoint()
                    raise _terminated(stage, step, total_steps)
            if stop.agreed(info, device):  # SIGTERM in the last step: its checkpoint is already saved
                raise _terminated(stage, step, total_steps)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    ips = seen / seconds if seconds > 0 else 0.0
    gflops = 3 * 2 * macs_per_image * ips / 1e9 if macs_per_image else None
    return TrainResult(
        step, step / steps_per_epoch, seconds, ips, loss_value, resumed_from, gflops, history, precision
    )
