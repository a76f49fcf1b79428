"""The training loop of ``densenet-fused train``: SGD with Nesterov momentum, the step schedule,
one epoch of training and one of validation, a checkpoint and a metrics row per epoch."""
import os
import random
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import FORMAT, plot_metrics, rng_state, save_checkpoint, set_rng_state, write_metrics
from .config import CHECKPOINT, METRICS, dist_env, lr_factor
from .data import EpochIndices, SeededSamples
from .guard import NonFiniteWatch
from .plan import Plan


@dataclass
class Session:
    """One process's training run: the plan, the process group's shape and what fit built."""
    plan: Plan
    world: int
    rank: int
    model: nn.Module = None           # what the step calls (DistributedDataParallel under torchrun)
    raw: nn.Module = None             # the model itself: validation, state_dict
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    train_sampler: object = None
    train_loader: object = None
    val_loader: object = None
    loader_generator: torch.Generator = None  # the training loader's: worker seeds, reseeded per epoch
    graphed: object = None                    # GraphedStep under --cuda-graphs
    start: int = 0
    rows: List[dict] = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.plan.device.type == "cuda"

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def reduce(self, *values) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.plan.device if self.cuda else "cpu")
        if self.distributed:
            torch.distributed.all_reduce(t)
        return t.tolist()


def _start_processes(plan: Plan) -> Session:
    world, rank, _ = dist_env()
    s = Session(plan, world, rank)
    if s.cuda:
        torch.cuda.set_device(plan.device)
    if s.distributed:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if s.cuda else "gloo")
        # each rank its own RNG stream (dropout); augmentation is seeded per sample (data.SeededSamples)
        torch.manual_seed(plan.args.seed + 1 + rank)
        random.seed(plan.args.seed + 1 + rank)
    return s


def _build(s: Session) -> None:
    """Model on the device (wrapped for DDP), optimizer and schedule."""
    args, device = s.plan.args, s.plan.device
    model = s.plan.model.to(device)
    if s.cuda:
        model = model.to(memory_format=torch.channels_last)
    if s.distributed and args.sync_bn:  # fused blocks synchronize their own statistics; other norms: SyncBatchNorm
        from ...modules.sync_batchnorm import convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    s.raw = model
    if s.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if s.cuda else None)
    s.model = model
    s.optimizer = torch.optim.SGD(s.raw.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    epochs = args.epochs
    s.scheduler = torch.optim.lr_scheduler.LambdaLR(s.optimizer, lambda e: lr_factor(e, epochs))
    if args.cuda_graphs:
        from .graphs import GraphedStep
        s.graphed = GraphedStep(s.raw, dtype=torch.bfloat16)


def _resume(s: Session) -> bool:
    """Optimizer, schedule (with this run's --epochs and --lr), RNG states and metrics rows of the
    checkpoint; False: nothing left to do."""
    args, ck = s.plan.args, s.plan.checkpoint
    epochs = args.epochs
    s.optimizer.load_state_dict(ck["optimizer"])
    s.scheduler.load_state_dict(ck["scheduler"])
    s.start = start = int(ck["epoch"])
    s.scheduler.base_lrs = [args.lr for _ in s.optimizer.param_groups]  # a new --lr applies from here on
    for group in s.optimizer.param_groups:
        group["initial_lr"] = args.lr
        group["lr"] = args.lr * lr_factor(start, epochs)
    s.rows = [dict(r) for r in ck["metrics"]]
    if s.world == 1 and ck.get("world_size", 1) == 1:
        set_rng_state(ck["rng"], s.plan.device)  # the run goes on as if never stopped
    elif s.distributed:
        torch.manual_seed(args.seed + 1 + s.rank + s.world * start)
        random.seed(args.seed + 1 + s.rank + s.world * start)
    if start >= epochs:
        if s.main:
            print(f"densenet-fused train: {args.out} already holds {start} epochs (--epochs {epochs}); nothing to do")
        return False
    return True


def _make_loaders(s: Session) -> None:
    """The shuffle order from (--seed, epoch), each image's augmentation from (--seed, epoch, index):
    the same batches with any --workers, in a resumed run as in an uninterrupted one."""
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    args, data = s.plan.args, s.plan.data
    sampler = DistributedSampler(data.train, num_replicas=s.world, rank=s.rank, shuffle=True, seed=args.seed)
    s.train_sampler = EpochIndices(sampler)
    val_set = Subset(data.val, range(s.rank, len(data.val), s.world)) if s.distributed else data.val
    loader_kw = dict(num_workers=args.workers, pin_memory=s.cuda, persistent_workers=args.workers > 0)
    # own generators: the loaders draw their workers' base seeds there, not from the global RNG
    s.loader_generator = torch.Generator()
    s.train_loader = DataLoader(SeededSamples(data.train, args.seed), batch_size=s.plan.batch_size,
                                sampler=s.train_sampler, drop_last=bool(args.cuda_graphs),
                                generator=s.loader_generator, **loader_kw)
    s.val_loader = DataLoader(val_set, batch_size=s.plan.batch_size, shuffle=False,
                              generator=torch.Generator().manual_seed(args.seed), **loader_kw)


def _prepare_out(s: Session) -> None:
    """Rank 0, before the first epoch: OUT made, temporary files of an interrupted save removed,
    metrics.csv rewritten from the checkpoint's rows (a crash between the two writes lost none)."""
    out = s.plan.args.out
    os.makedirs(out, exist_ok=True)
    for name in (CHECKPOINT + ".tmp", METRICS + ".tmp"):
        stale = os.path.join(out, name)
        if os.path.exists(stale):
            os.remove(stale)
            print(f"  removed {stale}, left by an interrupted save")
    if s.plan.checkpoint is not None:
        write_metrics(os.path.join(out, METRICS), s.rows)


def _announce(s: Session) -> None:
    plan, args, data = s.plan, s.plan.args, s.plan.data
    n_params = sum(p.numel() for p in s.raw.parameters())
    what = f"{args.model}" + (f" depth {plan.depth} k={plan.config['growth_rate']}" if plan.depth else "")
    print(f"densenet-fused train: {what}{' (baseline: torchvision blocks)' if args.baseline else ''}, "
          f"{n_params / 1e6:.2f} M parameters, {data.kind} {len(data.train)} train / {len(data.val)} val "
          f"images, {len(data.classes)} classes, {data.image_size}x{data.image_size}, batch {plan.batch_size}"
          f"{f' x {s.world} processes' if s.distributed else ''}, {plan.device}"
          f"{' bf16 autocast, channels-last' if s.cuda else ' float32'}, epochs {s.start + 1}..{args.epochs}")
    for note in plan.notes:
        print("  " + note)


def _to_device(s: Session, x, y):
    x = x.to(s.plan.device, non_blocking=True)
    y = y.to(s.plan.device, non_blocking=True)
    if s.cuda:
        x = x.to(memory_format=torch.channels_last)
    return x, y


def _eager_step(s: Session, x, y):
    with s.autocast():
        logits = s.model(x)
        loss = F.cross_entropy(logits, y)
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), logits.detach()


def _train_epoch(s: Session, epoch: int) -> dict:
    """One pass over the training set; the summed loss, correct count and images, over all processes.
    Raises guard.NonFinite (unless --allow-nonfinite) before anything of the epoch is written."""
    from tqdm import tqdm

    device, args = s.plan.device, s.plan.args
    s.train_sampler.set_epoch(epoch)
    s.loader_generator.manual_seed(args.seed * 100_003 + epoch)
    s.model.train()
    if s.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, steps = 0, len(s.train_loader)
    watch = None if args.allow_nonfinite else NonFiniteWatch(steps, device, s.world)
    t0 = time.perf_counter()
    with tqdm(s.train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", disable=not s.main,
              leave=True, file=sys.stderr) as bar:
        for step, (x, y) in enumerate(bar):
            x, y = _to_device(s, x, y)
            loss, logits = s.graphed(x, y) if s.graphed is not None else _eager_step(s, x, y)
            if watch is not None:
                watch.record(step, loss, s.raw.parameters())
            s.optimizer.step()
            n = y.numel()
            loss_sum += loss.double() * n
            correct += (logits.argmax(1) == y).sum()
            seen += n
            if watch is not None and watch.due(step):
                watch.check(epoch + 1, step + 1)
            if s.main and (step % 10 == 0 or step == steps - 1):
                _show_progress(s, bar, loss_sum, correct, seen, t0)
        if s.cuda:
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    loss, n_correct, n_seen = s.reduce(loss_sum.item(), correct.item(), seen)
    return {"loss": loss, "correct": n_correct, "seen": n_seen, "elapsed": elapsed, "peak_mb": _peak_mb(s)}


def _show_progress(s: Session, bar, loss_sum, correct, seen: int, t0: float) -> None:
    post = OrderedDict(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                       img_s=f"{seen * s.world / (time.perf_counter() - t0):.0f}")
    if s.cuda:
        post["mem"] = f"{torch.cuda.max_memory_allocated(s.plan.device) / 2 ** 20:.0f}MB"
    bar.set_postfix(post)


def _peak_mb(s: Session) -> Optional[float]:
    if not s.cuda:
        return None
    peak_mb = torch.cuda.max_memory_allocated(s.plan.device) / 2 ** 20
    if s.distributed:
        t = torch.tensor([peak_mb], device=s.plan.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        peak_mb = t.item()
    return peak_mb


def _validate(s: Session) -> dict:
    """Validation on the unwrapped model (no collective inside), rank 0's BN statistics."""
    device, raw = s.plan.device, s.raw
    if s.distributed:
        for b in raw.buffers():
            torch.distributed.broadcast(b, 0)
    raw.eval()
    v_loss = torch.zeros((), dtype=torch.float64, device=device)
    v_correct = torch.zeros((), dtype=torch.int64, device=device)
    v_seen = 0
    with torch.no_grad():
        for x, y in s.val_loader:
            x, y = _to_device(s, x, y)
            with s.autocast():
                logits = raw(x)
            v_loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
            v_correct += (logits.argmax(1) == y).sum()
            v_seen += y.numel()
    loss, correct, seen = s.reduce(v_loss.item(), v_correct.item(), v_seen)
    raw.train()
    return {"loss": loss, "correct": correct, "seen": seen}


def _write_epoch(s: Session, epoch: int, train: dict, val: dict) -> None:
    """Rank 0: the checkpoint, the metrics row and the plots of a finished epoch."""
    from tqdm import tqdm

    plan, out, epochs = s.plan, s.plan.args.out, s.plan.args.epochs
    peak_mb = train["peak_mb"]
    row = {"epoch": str(epoch + 1), "train_loss": f"{train['loss'] / train['seen']:.6f}",
           "train_acc": f"{train['correct'] / train['seen']:.6f}", "val_loss": f"{val['loss'] / val['seen']:.6f}",
           "val_acc": f"{val['correct'] / val['seen']:.6f}", "images_per_s": f"{train['seen'] / train['elapsed']:.1f}",
           "peak_mem_mb": "" if peak_mb is None else f"{peak_mb:.1f}"}
    s.rows.append(row)
    ck = {"format": FORMAT, "model": s.raw.state_dict(), "optimizer": s.optimizer.state_dict(),
          "scheduler": s.scheduler.state_dict(), "epoch": epoch + 1, "rng": rng_state(plan.device),
          "config": plan.config, "metrics": s.rows, "batch_size": plan.batch_size, "world_size": s.world}
    save_checkpoint(ck, out)  # first: the rows live in the checkpoint, metrics.csv is rewritten from them
    write_metrics(os.path.join(out, METRICS), s.rows)
    plot_metrics(s.rows, out)
    tqdm.write(f"epoch {epoch + 1}/{epochs}: train loss {row['train_loss']} acc {row['train_acc']} | "
               f"val loss {row['val_loss']} acc {row['val_acc']} | {row['images_per_s']} images/s"
               + (f" | peak {row['peak_mem_mb']} MB" if s.cuda else ""), file=sys.stderr)


def fit(plan: Plan) -> int:
    """Train ``plan`` up to --epochs (from its checkpoint with --resume); 0 when done."""
    s = _start_processes(plan)
    _build(s)
    if plan.checkpoint is not None and not _resume(s):
        if s.main:
            _prepare_out(s)  # a crash after the last checkpoint: its metrics row written now
        return 0
    _make_loaders(s)
    out = plan.args.out
    if s.main:
        _announce(s)
        _prepare_out(s)
    for epoch in range(s.start, plan.args.epochs):
        train = _train_epoch(s, epoch)
        s.scheduler.step()
        val = _validate(s)
        if s.main:
            _write_epoch(s, epoch, train, val)
    if s.main:
        print(f"densenet-fused train: wrote {os.path.join(out, METRICS)}, {os.path.join(out, CHECKPOINT)}, "
              f"{os.path.join(out, 'loss.png')}, {os.path.join(out, 'accuracy.png')}")
    return 0
