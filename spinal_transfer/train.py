"""Fine-tune on an image folder: one readable loop, top to bottom.

Stages follow the paper's scripts: each stage builds a fresh optimizer and scheduler and starts
from the previous stage's best weights. The best epoch is chosen on `cfg.select_on` (val by
default); the test split is evaluated once, at the end, with the chosen weights.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler
from tqdm.auto import tqdm

from . import data as D
from .checkpoint import atomic_save, atomic_write_text, safe_load
from .config import Stage, TrainConfig
from .heads import head_options
from .metrics import classification_metrics, plot_confusion, plot_curves, summary
from .surgery import build_model, get_head, head_param_names
from .transforms import DataConfig, build_transforms, resolve_data_config
from .utils import (all_gather_list, amp_dtype, any_rank, barrier, broadcast_object, init_distributed, is_main, log,
                    pick_device, rank, rng_state, seed_everything, set_rng_state, setup_logging, sum_over_ranks,
                    tune_cpu_allocator, use_channels_last, world_size)

AUX_LOSS_WEIGHT = 0.4   # Inception v3 / GoogLeNet auxiliary classifiers, as in their papers


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""


# --- data ----------------------------------------------------------------------------------------

class ShardSampler(Sampler[int]):
    """Evaluation sampler for torch.distributed: rank r takes indices r, r+W, ...; no padding, so
    every sample is counted exactly once when the shards are gathered."""

    def __init__(self, n: int, num_replicas: int, rank_: int):
        self.indices = list(range(rank_, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochShuffle(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch), so the order of epoch e does not depend on
    what ran before: a resumed run sees the same batches. Shards across ranks like DistributedSampler."""

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank_: int = 0):
        self.n, self.seed, self.num_replicas, self.rank, self.epoch = n, seed, num_replicas, rank_, 0
        self.per_rank = math.ceil(n / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.num_replicas - self.n]     # pad so ranks stay in step
        return iter(order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.per_rank


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**32)


def default_workers(cfg: TrainConfig) -> int:
    import os

    return cfg.workers if cfg.workers is not None else min(8, os.cpu_count() or 1)


def make_loader(samples: list, transform: Any, cfg: TrainConfig, train: bool, device: torch.device,
                sampler: Optional[Sampler] = None) -> DataLoader:
    workers = default_workers(cfg)
    ds = D.ImageDataset(samples, transform)
    if sampler is None and not train:
        sampler = ShardSampler(len(ds), world_size(), rank())
    return DataLoader(
        ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=D.collate_skip_bad, pin_memory=device.type == "cuda",
        drop_last=train and len(samples) >= 2 * cfg.batch_size * world_size(),   # no size-1 batch for BN heads
        persistent_workers=workers > 0 and not cfg.deterministic,
        worker_init_fn=_seed_worker, prefetch_factor=4 if workers > 0 else None)


def train_sampler(cfg: TrainConfig, samples: list, num_classes: int) -> Sampler:
    if cfg.class_balance == "sampler":
        g = torch.Generator().manual_seed(cfg.seed)
        return WeightedRandomSampler(D.balanced_sample_weights(samples, num_classes), len(samples), generator=g)
    return EpochShuffle(len(samples), cfg.seed, world_size(), rank())


# --- model, optimizer, schedule ------------------------------------------------------------------

def param_groups(model: nn.Module, cfg: TrainConfig, lr: float) -> list[dict]:
    head_keys = set(head_param_names(model))
    head, backbone = [], []
    for name, p in model.named_parameters():
        (head if name in head_keys else backbone).append(p)
    return [{"params": head, "lr": lr, "name": "head"},
            {"params": backbone, "lr": lr * cfg.backbone_lr_mult, "name": "backbone"}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, stage: Stage, steps_per_epoch: int):
    """(scheduler, steps per epoch-call): StepLR steps once per epoch (the paper); cosine steps per update."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "step":
        return sched.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma), "epoch"
    if cfg.scheduler == "none":
        return sched.LambdaLR(opt, lambda _: 1.0), "epoch"
    total = max(1, stage.epochs * steps_per_epoch)
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    cosine = sched.CosineAnnealingLR(opt, T_max=total - warm)
    if warm == 0:
        return cosine, "step"
    return sched.SequentialLR(opt, [sched.LinearLR(opt, 1e-3, 1.0, total_iters=warm), cosine], [warm]), "step"


def set_trainable(model: nn.Module, frozen: bool) -> None:
    """Frozen backbone: no gradients and eval-mode BN/dropout, so its features stay fixed."""
    head_keys = set(head_param_names(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in head_keys or not frozen)
    model.train()
    if frozen:
        model.eval()
        for path in model.spinal_info.head_paths:
            model.get_submodule(path).train()


def compute_loss(out: Any, target: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
    """Main logits, plus auxiliary classifiers' losses (Inception/GoogLeNet in train mode)."""
    if isinstance(out, tuple):
        main, *aux = out
        return criterion(main, target) + AUX_LOSS_WEIGHT * sum(criterion(a, target) for a in aux if a is not None)
    return criterion(out, target)


# --- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def predict_logits(model: nn.Module, loader: Iterable, device: torch.device, dtype: Optional[torch.dtype],
                   channels_last: bool = False, desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor, list]:
    """Logits and targets of every sample in the loader, gathered over ranks (each sample once)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module     # evaluation is per rank: no collective inside forward (shards may differ in length)
    model.eval()
    logits, targets, skipped = [], [], []
    for x, y, bad in tqdm(loader, desc=desc, leave=False, disable=not is_main()):
        skipped += bad
        if len(x) == 0:
            continue
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, dtype):
            out = model(x)
        logits.append(out.float().cpu())
        targets.append(y)
    logits_t = torch.cat(logits) if logits else torch.zeros(0, 0)
    targets_t = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    if world_size() > 1:
        import torch.distributed as dist

        parts: list = [None] * world_size()
        dist.all_gather_object(parts, (logits_t, targets_t, skipped))
        logits_t = torch.cat([p[0] for p in parts if len(p[0])])
        targets_t = torch.cat([p[1] for p in parts])
        skipped = [s for p in parts for s in p[2]]
        # Undo ShardSampler's rank interleaving (rank r held samples r, r+W, ... minus its bad files).
        W, n = world_size(), len(loader.dataset)
        paths = [p for p, _ in getattr(loader.dataset, "samples", [])]
        index = []
        for r, p in enumerate(parts):
            bad_r = {b[0] for b in p[2]}
            index += [i for i in range(r, n, W) if not paths or paths[i] not in bad_r]
        order = torch.as_tensor(index, dtype=torch.long).argsort()
        logits_t, targets_t = logits_t[order], targets_t[order]
    return logits_t, targets_t, skipped


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- checkpoints ---------------------------------------------------------------------------------

def _state_dict(module: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def checkpoint_meta(cfg: TrainConfig, classes: list[str], dc: DataConfig, model: nn.Module) -> dict:
    """What a checkpoint needs to rebuild its model and preprocessing without the run directory."""
    return {"config": cfg.to_dict(), "classes": list(classes), "data_config": asdict(dc),
            "head_info": model.spinal_info.to_dict()}


def load_run_checkpoint(path: str | Path) -> dict:
    """RUN directory or checkpoint file -> the checkpoint dict (best.pt for a run directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "best.pt"
    ckpt = safe_load(p)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{p} is not a spinal-transfer checkpoint (expected keys 'model' and 'config')")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> tuple[nn.Module, TrainConfig, DataConfig, list[str]]:
    """Rebuild the architecture offline (weights=None), then load the checkpoint's weights."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    classes = ckpt["classes"]
    info = ckpt["head_info"]
    model = build_model(cfg.backbone, len(classes), head=cfg.head, weights=None, replace=info["replace"],
                        **head_options(cfg))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg, DataConfig(**ckpt["data_config"]), classes


# --- the loop ------------------------------------------------------------------------------------

def train_one_epoch(fwd: nn.Module, raw: nn.Module, loader: Iterable, opt: torch.optim.Optimizer, cfg: TrainConfig,
                    device: torch.device, *, dtype: Optional[torch.dtype], channels_last: bool, criterion: nn.Module,
                    scaler: torch.amp.GradScaler, sched: Any = None, mixup: Any = None, ema: Any = None,
                    progress: Optional[dict] = None, skipped: Optional[list] = None, desc: str = "train",
                    on_step: Optional[Callable[[], None]] = None) -> tuple[float, int, float]:
    """One pass over `loader`: forward `fwd`, step `opt` every `cfg.accum_steps` batches (and `sched`,
    when it steps per optimizer step). Returns (mean loss over every rank's images, images seen on this
    rank, seconds). Unreadable files met go to `skipped`; `progress["step"]` counts optimizer steps;
    `on_step` is called after every batch (benchmarks time steps with it)."""
    progress = {"step": 0} if progress is None else progress
    t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
    bad_loss = torch.zeros((), dtype=torch.bool, device=device)
    bar = tqdm(loader, desc=desc, leave=False, disable=not is_main())
    opt.zero_grad(set_to_none=True)
    for i, (x, y, bad) in enumerate(bar):
        if skipped is not None:
            skipped += bad
        if cfg.limit_train_batches is not None and i >= cfg.limit_train_batches:
            break
        if mixup is not None and len(x) % 2:          # timm's Mixup pairs samples
            x, y = x[:-1], y[:-1]
        if len(x) < 2:                                 # BatchNorm cannot train on one sample
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            x, y = mixup(x, y)
        with _autocast(device, dtype):
            loss = compute_loss(fwd(x), y, criterion)
        bad_loss |= ~torch.isfinite(loss.detach())
        scaler.scale(loss / cfg.accum_steps).backward()
        last_batch = i + 1 == len(loader) or i + 1 == cfg.limit_train_batches
        if (i + 1) % cfg.accum_steps == 0 or last_batch:
            if cfg.clip_grad is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            progress["step"] += 1
            if ema is not None:
                ema.update(raw, step=progress["step"])
            if sched is not None:
                sched.step()
        loss_sum += loss.detach().float() * len(x)
        seen += len(x)
        if i % cfg.log_interval == 0:      # the only host-device syncs in the loop
            if any_rank(bad_loss):         # every rank stops together
                break
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen * world_size() / (time.perf_counter() - t0):.1f}",
                            lr=f"{opt.param_groups[0]['lr']:.2e}")
        if on_step is not None:
            on_step()
    if any_rank(bad_loss):
        raise NonFiniteLoss(
            f"the training loss became NaN/inf in {desc}; stopped. The last good checkpoint is "
            f"{Path(cfg.out) / 'checkpoints' / 'last.pt'} (not overwritten). Try a lower --lr, --amp none, "
            f"or --clip-grad 1.0.")
    seconds = time.perf_counter() - t0
    totals = sum_over_ranks(torch.stack([loss_sum.float(), torch.tensor(float(seen), device=device)]))
    return (totals[0] / totals[1].clamp(min=1)).item(), seen, seconds


# --- the run -------------------------------------------------------------------------------------

def run(cfg: TrainConfig, resume: Optional[str | Path] = None) -> dict:
    """Fine-tune according to `cfg`; write RUN/ (see README); return the report."""
    ckpt = None
    if resume is not None:
        last = Path(resume) / "checkpoints" / "last.pt"
        if not last.is_file():
            raise FileNotFoundError(f"cannot resume: {last} does not exist (the run saved no epoch yet)")
        ckpt = safe_load(last)
        cfg = dataclasses.replace(TrainConfig.from_dict(ckpt["config"]), out=str(resume))   # the run may have moved
    cfg.validate()
    init_distributed(cfg.device)
    device = pick_device(cfg.device)
    tune_cpu_allocator(device)
    run_dir = Path(cfg.out)
    setup_logging(run_dir)
    seed_everything(cfg.seed, cfg.deterministic)

    # Data: splits are fixed once and saved, so a rerun or resume sees the same files.
    # Rank 0 scans (or reads RUN/splits.json) and every rank takes its lists: one split for all ranks.
    splits = broadcast_object(D.resolve_splits(cfg.data, run_dir, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
                              if is_main() else None)
    classes, C = splits.classes, len(splits.classes)
    model = build_model(cfg.backbone, C, head=cfg.head, weights=cfg.weights, replace=cfg.replace,
                        **head_options(cfg))
    for note in model.spinal_info.notes:
        log.info(note)
    dc = resolve_data_config(cfg, model, cfg.backbone, cfg.weights)
    cfg = dataclasses.replace(cfg, img_size=dc.img_size, resize_size=dc.resize_size, mean=list(dc.mean), std=list(dc.std),
                      interpolation=dc.interpolation, workers=default_workers(cfg))
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        atomic_write_text(run_dir / "classes.json", json.dumps(classes, indent=1))
    skipped = list(splits.skipped)
    log.info(f"{C} classes; train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)} images; "
             f"{len(skipped)} files skipped (see {run_dir / 'skipped_files.txt'})")
    lrs = ", ".join(f"{s.lr:g}" for s in cfg.resolved_stages())
    log.info(f"world size {world_size()}; batch {cfg.batch_size} per device, global batch "
             f"{cfg.batch_size * world_size()}" + (f" x {cfg.accum_steps} accumulation steps" if cfg.accum_steps > 1 else "")
             + f"; lr {lrs} (as given: not scaled with the global batch)")

    dtype = amp_dtype(cfg.amp, device)
    channels_last = use_channels_last(cfg.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    raw = model
    if cfg.sync_bn and world_size() > 1:
        if device.type == "cuda":
            raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
        else:      # torch's SyncBatchNorm raises on CPU input in training
            log.warning("--sync-bn needs CUDA (torch's SyncBatchNorm); on CPU each process keeps its own BN statistics")
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(raw, decay=cfg.ema_decay)

    def wrap(frozen: bool) -> nn.Module:
        """What the loop calls: the head alone on cached features, else the whole model; under
        torchrun a DDP wrapper, rebuilt whenever the set of trainable parameters changes."""
        set_trainable(raw, frozen)
        m = get_head(raw) if cfg.cache_features else raw
        if world_size() > 1:
            m = nn.parallel.DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(m) if cfg.compile else m

    train_tf, eval_tf = build_transforms(cfg, dc, train=True), build_transforms(cfg, dc, train=False)
    train_samples = splits.train
    if cfg.cache_features:
        # The frozen backbone runs once per split (eval preprocessing, no augmentation); rank 0
        # computes, every rank then reads the same memory-mapped files.
        from .features import cached_split, feature_loader

        log.info("cached-feature mode: the backbone runs once without augmentation; training sees the stored features")
        set_trainable(raw, True)
        cached = {}
        for turn in ("compute", "load"):
            if turn == "load" or is_main():
                for name in ("train", "val", "test"):
                    cached[name] = cached_split(raw, name, getattr(splits, name), eval_tf, cfg, dc, run_dir, device,
                                                dtype, make_loader)
            barrier()
        train_samples = cached["train"][1]
        skipped += [b for *_, bad in cached.values() for b in bad]
        sampler = train_sampler(cfg, train_samples, C)
        train_loader = feature_loader(cached["train"][0], cfg, sampler, True)
        val_loader, test_loader = (feature_loader(cached[n][0], cfg, ShardSampler(len(cached[n][0]), world_size(), rank()),
                                                  False) for n in ("val", "test"))
        channels_last = False            # inputs are feature vectors now
    else:
        sampler = train_sampler(cfg, train_samples, C)
        train_loader = make_loader(train_samples, train_tf, cfg, True, device, sampler)
        val_loader = make_loader(splits.val, eval_tf, cfg, False, device)
        test_loader = make_loader(splits.test, eval_tf, cfg, False, device)
    weight = D.class_weights(train_samples, C).to(device) if cfg.class_balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=C)
        criterion = SoftTargetCrossEntropy()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    meta = checkpoint_meta(cfg, classes, dc, raw)
    wrapped_frozen: Optional[bool] = None

    # Progress through the schedule; restored from last.pt on resume.
    st = {"stage": 0, "stage_epoch": 0, "epoch": 0, "best": -1.0, "best_epoch": -1, "stage_best": -1.0,
          "step": 0}
    stages = cfg.resolved_stages()
    ckpt_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
        st.update(ckpt["progress"])
        log.info(f"resumed from {resume}: epoch {st['epoch']} (stage {st['stage'] + 1}, "
                 f"epoch {st['stage_epoch']} of it)")
        if is_main() and metrics_path.exists():       # drop epochs logged after the checkpoint
            rows = [r for r in metrics_path.read_text().splitlines() if r and json.loads(r)["epoch"] < st["epoch"]]
            atomic_write_text(metrics_path, "".join(r + "\n" for r in rows))
    elif is_main():
        metrics_path.unlink(missing_ok=True)

    for si, stage in enumerate(stages):
        if si < st["stage"]:
            continue
        opt = make_optimizer(raw, cfg, stage.lr)
        sched, sched_unit = make_scheduler(opt, cfg, stage, max(1, len(train_loader) // cfg.accum_steps))
        if ckpt is not None:
            set_rng_state(ckpt["rng"])
        if ckpt is not None and st["stage_epoch"] > 0:
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
        elif si > 0 and (ckpt_dir / "stage_best.pt").exists():   # the paper: next stage starts from this stage's best
            raw.load_state_dict(safe_load(ckpt_dir / "stage_best.pt")["model"])
        if st["stage_epoch"] == 0:
            st["stage_best"] = -1.0
        ckpt = None

        for e in range(st["stage_epoch"], stage.epochs):
            epoch = st["epoch"]
            frozen = cfg.freeze_backbone or epoch < cfg.freeze_epochs
            if frozen != wrapped_frozen:
                fwd, wrapped_frozen = wrap(frozen), frozen
            set_trainable(raw, frozen)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            # Augmentation randomness is a function of (seed, epoch): the main process's transform
            # for workers=0, each worker's via _seed_worker and the loader's generator otherwise.
            train_tf.set_random_seed(cfg.seed * 1_000_003 + epoch)
            train_loader.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)

            # ---- train one epoch ----
            train_loss, seen, train_time = train_one_epoch(
                fwd, raw, train_loader, opt, cfg, device, dtype=dtype, channels_last=channels_last,
                criterion=criterion, scaler=scaler, sched=sched if sched_unit == "step" else None, mixup=mixup,
                ema=ema, progress=st, skipped=skipped, desc=f"epoch {epoch + 1}/{sum(s.epochs for s in stages)}")
            if sched_unit == "epoch":
                sched.step()
            skipped = all_gather_list(skipped)     # rank 0 lists the unreadable files every rank met

            # ---- evaluate and select ----
            val_logits, val_y, bad = predict_logits(ema.module if ema is not None else fwd, val_loader, device, dtype, channels_last, "val")
            skipped += bad
            val_m = classification_metrics(val_logits, val_y, classes)
            row = {"epoch": epoch, "stage": si, "lr": opt.param_groups[0]["lr"], "train_loss": train_loss,
                   "train_images_per_s": seen * world_size() / max(train_time, 1e-9), "frozen": frozen,
                   "val": summary(val_m)}
            select = val_m
            if cfg.select_on == "test":
                test_logits, test_y, bad = predict_logits(ema.module if ema is not None else fwd, test_loader, device, dtype, channels_last, "test")
                select = classification_metrics(test_logits, test_y, classes)
                row["test"] = summary(select)
            score = select["top1"]
            st["epoch"], st["stage_epoch"] = epoch + 1, e + 1
            if st["stage_epoch"] == stage.epochs:
                st["stage"], st["stage_epoch"] = si + 1, 0
            eval_weights = _state_dict(ema.module if ema is not None else raw)
            if is_main():
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                if score > st["stage_best"]:
                    st["stage_best"] = score
                    if len(stages) > 1:
                        atomic_save({"model": _state_dict(raw)}, ckpt_dir / "stage_best.pt")
                if score > st["best"]:
                    st["best"], st["best_epoch"] = score, epoch
                    atomic_save({"model": eval_weights, "epoch": epoch, **meta}, ckpt_dir / "best.pt")
                atomic_save({"model": _state_dict(raw), "ema": None if ema is None else eval_weights,
                             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "scaler": scaler.state_dict(), "rng": rng_state(), "progress": dict(st), **meta},
                            ckpt_dir / "last.pt")
                D.write_skipped(run_dir, skipped)
            barrier()
            log.info(f"epoch {epoch + 1}: train loss {train_loss:.4f}, val top1 {val_m['top1']:.4f} "
                     f"loss {val_m['loss']:.4f}, {row['train_images_per_s']:.1f} img/s"
                     + (" (best)" if st["best_epoch"] == epoch else ""))

    # ---- final: chosen weights, test once ----
    best = safe_load(ckpt_dir / "best.pt")
    raw.load_state_dict(best["model"])
    fwd = get_head(raw) if cfg.cache_features else raw
    val_logits, val_y, _ = predict_logits(fwd, val_loader, device, dtype, channels_last, "val")
    test_logits, test_y, _ = predict_logits(fwd, test_loader, device, dtype, channels_last, "test")
    val_m, test_m = classification_metrics(val_logits, val_y, classes), classification_metrics(test_logits, test_y, classes)
    report = {"best_epoch": best["epoch"], "selected_on": cfg.select_on, "val": val_m, "test": test_m,
              "classes": classes, "num_skipped_files": len(set(p for p, _ in skipped)),
              "head": model_summary(raw)}
    if is_main():      # report.json last: its presence means the run finished
        write_predictions(run_dir / "test_predictions.csv", splits.test, test_logits, test_y, skipped)
        plot_curves(metrics_path, run_dir / "plots")
        plot_confusion(test_m["confusion_matrix"], classes, run_dir / "plots" / "confusion_test.png",
                       f"test confusion matrix (top-1 {test_m['top1']:.3f})")
        atomic_write_text(run_dir / "report.json", json.dumps(report, indent=1))
        log.info(f"best epoch {best['epoch'] + 1} (selected on {cfg.select_on}); "
                 f"test top1 {test_m['top1']:.4f}, top5 {test_m['top5']:.4f}, macro F1 {test_m['macro_f1']:.4f}")
    return report


def write_predictions(path: Path, samples: list, logits: torch.Tensor, targets: torch.Tensor, skipped: list) -> None:
    """Per-image test predictions (path, target, prediction), in sample order, for paired tests."""
    bad = {p for p, _ in skipped}
    paths = [p for p, _ in samples if p not in bad]
    if len(paths) != len(targets):          # a file failed at load time in another way: no pairing possible
        paths = [""] * len(targets)
    pred = logits.argmax(1).tolist() if len(logits) else []
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "target", "prediction"])
    writer.writerows(zip(paths, targets.tolist(), pred))
    atomic_write_text(path, buf.getvalue())


def model_summary(model: nn.Module) -> dict:
    info = model.spinal_info
    head = get_head(model)
    return {"backbone": info.backbone, "head": info.head, "feature_width": info.feature_width,
            "head_params": head.num_params(), "head_macs": head.macs(),
            "default_head_params": info.default_head_params, "default_head_macs": info.default_head_macs}


def evaluate(path: str | Path, data: str, split: str = "test", device_name: str = "auto",
             batch_size: Optional[int] = None, workers: Optional[int] = None) -> dict:
    """Metrics of a run's best checkpoint (or any checkpoint file) on one split of `data`.

    Uses the run's saved split file when `data` is the run's own folder, so the numbers match
    report.json exactly."""
    ckpt = load_run_checkpoint(path)
    model, cfg, dc, classes = model_from_checkpoint(ckpt)
    run_dir = Path(path) if Path(path).is_dir() else Path(path).parent.parent
    same = Path(data).resolve() == Path(cfg.data).resolve() and (run_dir / "splits.json").exists()
    splits = D.resolve_splits(data, run_dir if same else None, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    if splits.classes != classes:
        raise D.DataError(f"{data} has classes {splits.classes[:10]}..., the model was trained on {classes[:10]}...")
    cfg = dataclasses.replace(cfg, batch_size=batch_size or cfg.batch_size, workers=workers if workers is not None else cfg.workers)
    device = pick_device(device_name)
    tune_cpu_allocator(device)
    channels_last = use_channels_last(cfg.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loader = make_loader(getattr(splits, split), build_transforms(cfg, dc, train=False), cfg, False, device)
    logits, y, skipped = predict_logits(model, loader, device, amp_dtype(cfg.amp, device), channels_last, split)
    m = classification_metrics(logits, y, classes)
    m["num_skipped_files"] = len(skipped)
    return m
