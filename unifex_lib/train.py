"""The training engine: one loop, read top to bottom, with its features in small helpers.

``train(params)`` trains an :class:`~unifex_lib.models.EmbeddingModel` (backbone + neck) with a
margin head and writes everything into ``params.run_dir``::

    params.yaml  train.log  history.csv (step, epoch, lr, loss)  eval.csv (UnED tables)
    checkpoints/<name>.{safetensors,state.safetensors,json}  lr.png  loss.png  metric.png

Each iteration, in order (as in nanoGPT's ``train.py``): learning rate -> evaluation and
checkpoint (when due) -> forward/backward under autocast -> unscale/clip -> optimizer step ->
zero_grad -> log. Helpers in :mod:`unifex_lib.training`: schedules (warmup x cosine), optim
(Adam/AdamW/SGD, SAM), sampling (multi-domain batches, DDP shards, mid-epoch resume),
feature_cache (frozen backbone: features extracted once), checkpoint (safetensors + JSON,
atomic), distributed (torchrun). Launch on several GPUs or nodes with ``torchrun`` (see
docs/training.md); ``train`` reads torchrun's environment itself.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from unifex_lib.data.annotations import read_annotations, read_class_counts
from unifex_lib.data.dataset import ImageDataset, collate_skip_bad
from unifex_lib.data.transforms import create_transform, is_deterministic
from unifex_lib.models import TripletHead, create_head, create_model
from unifex_lib.params import Params, load_params, save_params
from unifex_lib.training.checkpoint import (delete_checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint,
                                            load_weights, prefixed, resolve_checkpoint, rng_states, save_checkpoint,
                                            set_rng_states, unprefixed)
from unifex_lib.training.distributed import DistInfo, barrier, cleanup, init_distributed, mean_over_ranks
from unifex_lib.training.feature_cache import (FeatureDataset, cache_key, cached_features, dataset_hash,
                                               valid_rows, weights_fingerprint)
from unifex_lib.training.optim import create_optimizer, set_lr
from unifex_lib.training.plots import plot_run
from unifex_lib.training.sampling import DomainBatchSampler, PKBatches
from unifex_lib.training.schedules import create_schedule

log = logging.getLogger("unifex.train")


class TrainNet(nn.Module):
    """Model + head -> loss. Inputs are images, or backbone features when ``from_features``.

    The head (margins, softmax) runs in fp32 outside autocast. A fully frozen backbone keeps
    itself in eval mode under ``train()``.
    """

    def __init__(self, model: nn.Module, head: nn.Module, from_features: bool = False):
        super().__init__()
        self.model, self.head, self.from_features = model, head, from_features

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.embed_features(x) if self.from_features else self.model(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.head.loss(embeddings.float(), labels)


def train(params: Params) -> dict:
    """Train as ``params`` says; returns ``run_dir``, ``best_checkpoint`` (its ``.safetensors``),
    ``best_metric``, ``best_value``, ``final_metrics`` (mean row of the last evaluation), ``steps`` and
    ``images_per_second`` (global, over the training steps of this call; evaluation excluded)."""
    t = params.train
    info = init_distributed(t.device)
    run_dir = Path(params.run_dir)
    _setup_logging(run_dir, info, params)
    torch.manual_seed(t.seed)
    amp_dtype = _amp_dtype(t.precision, info.device)
    if t.sam and amp_dtype == torch.float16:
        raise ValueError("sam=True cannot be combined with precision='fp16' (GradScaler cannot step with a "
                         "closure); use precision 'bf16' or 'fp32'")

    # model, head, data
    model = create_model(params.model, image_size=params.data.image_size).to(info.device)
    table = read_annotations(params.data_path(params.data.annotations))
    num_classes = int(table["label"].max()) + 1
    counts_file = params.data_path(params.data.class_counts)
    h = params.head
    head = create_head(h.head, num_classes, model.embedding_dim, k=h.k, s=h.s, m=h.m, m_min=h.m_min,
                       m_max=h.m_max, h=h.h, t_alpha=h.t_alpha, dynamic_s=h.dynamic_s, sample_rate=h.sample_rate,
                       class_counts=read_class_counts(counts_file, num_classes) if counts_file.is_file() else None)
    dataset, domains, cached = training_data(params, model, table, info)
    net = TrainNet(model, head, from_features=cached).to(info.device)
    if t.channels_last and not cached:
        net = net.to(memory_format=torch.channels_last)
    sampler = PKBatches(dataset.labels, t.batch_size, t.samples_per_class, t.seed, info.rank, info.world_size) \
        if isinstance(head, TripletHead) else \
        DomainBatchSampler(domains, t.batch_size, params.data.sampling, t.seed, info.rank, info.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=params.data.num_workers,
                        collate_fn=collate_skip_bad, pin_memory=info.device.type == "cuda",
                        generator=torch.Generator())
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = t.iterations or t.epochs * steps_per_epoch
    schedule = create_schedule(t, steps_per_epoch, total_steps)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = create_optimizer(trainable, t.optimizer, t.lr, t.weight_decay, t.momentum, t.sam, t.sam_rho)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)
    step, best = resume(params, net, optimizer, scaler, info) if t.resume else (0, None)
    start_step = step
    ddp_net = DistributedDataParallel(net, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
        if info.enabled else net
    net.train()
    log.info("%d train images (%d classes) in %d domains, %s; %d steps (%d per epoch), global batch %d on %d "
             "process(es), %s, %s", len(dataset), num_classes, len(set(domains)),
             "cached backbone features" if cached else "images", total_steps, steps_per_epoch, t.batch_size,
             info.world_size, info.device, amp_dtype or "fp32")

    if step == 0:  # the same random stream from here on, whatever the setup drew (e.g. feature extraction)
        torch.manual_seed(t.seed)
    batches = iterate_batches(loader, sampler, step, t.seed, info.device, t.channels_last and not cached)
    history = _History(run_dir / "history.csv", start_step, info.is_main)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not info.is_main, dynamic_ncols=True)
    final_metrics, train_seconds = {}, 0.0
    while True:
        # learning rate
        lr = schedule.lr_at(step)
        set_lr(optimizer, lr)
        # evaluation and checkpoint
        if step != start_step and is_checkpoint_step(step, t, steps_per_epoch, total_steps):
            history.flush()
            if info.is_main:
                final_metrics, best = evaluate_and_checkpoint(params, net, optimizer, scaler, step, steps_per_epoch,
                                                              schedule, best, info)
                net.train()
            barrier(info)
        if step == total_steps:
            break
        # forward/backward under autocast, unscale/clip (SAM: a second pass at w + e(w))
        started = time.perf_counter()
        x, y = next(batches)
        loss = forward_backward(ddp_net, x, y, amp_dtype, scaler, optimizer, trainable, t.grad_clip)
        # optimizer step, zero_grad
        if t.sam:
            optimizer.step(lambda: forward_backward(ddp_net, x, y, amp_dtype, scaler, optimizer, trainable,
                                                    t.grad_clip))
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # log
        loss_value = mean_over_ranks(loss.detach().float(), info).item()  # waits for the GPU
        train_seconds += time.perf_counter() - started
        images_per_second = (step - start_step) * t.batch_size / train_seconds
        history.add(step, step / steps_per_epoch, lr, loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}")
        if step % t.log_every == 0 or step == total_steps:
            log.info("step %d epoch %.2f loss %.5f lr %.3e %.0f img/s", step, step / steps_per_epoch, loss_value,
                     lr, images_per_second)
    bar.close()
    images_per_second = (step - start_step) * t.batch_size / max(train_seconds, 1e-9)
    result = {"run_dir": str(run_dir), "best_checkpoint": (best or {}).get("path"), "best_metric": t.best_metric,
              "best_value": (best or {}).get("value"), "final_metrics": final_metrics, "steps": step,
              "images_per_second": images_per_second}
    log.info("done: %s", result)
    _close_logging()
    cleanup(info)
    return result


def _amp_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype: None (fp32) on CPU or for ``fp32``; bf16/fp16 on CUDA."""
    if precision == "fp32":
        return None
    if device.type != "cuda":
        log.warning("precision=%s needs CUDA; training in fp32 on %s", precision, device)
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def forward_backward(net: nn.Module, x: torch.Tensor, y: torch.Tensor, amp_dtype: Optional[torch.dtype],
                     scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, trainable: list,
                     grad_clip: Optional[float]) -> torch.Tensor:
    """Loss under autocast, scaled backward, then unscale and clip the gradient norm to ``grad_clip``."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = net(x, y)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(trainable, grad_clip)
    return loss


def use_feature_cache(params: Params, model: nn.Module) -> bool:
    """Cache backbone features: feature_cache on, backbone fully frozen, deterministic train transform."""
    return (params.train.feature_cache and model.backbone.fully_frozen
            and is_deterministic(params.data.train_transform))


def training_data(params: Params, model: nn.Module, table: pd.DataFrame, info: DistInfo):
    """``(dataset, domains, cached)``: images, or cached backbone features (see :func:`use_feature_cache`)."""
    transform = create_transform(params.data.train_transform, model.data_config, train=True)
    images = ImageDataset.from_table(table, params.data.data_root, transform,
                                     bad_images_file=params.run_dir / "bad_images.csv")
    if not use_feature_cache(params, model):
        return images, table["domain"].tolist(), False
    backbone = model.backbone
    key = cache_key(backbone.model_id, weights_fingerprint(backbone),
                    f"{params.data.train_transform}:{transform!r}", dataset_hash(table["path"], params.data.data_root))
    features = cached_features(backbone, images, key, Path(params.output_dir) / "feature_cache",
                               batch_size=params.eval.eval_batch_size, device=info.device,
                               num_workers=params.data.num_workers, info=info)
    rows = valid_rows(features)
    return FeatureDataset(features, table["label"].iloc[rows].tolist(), rows), \
        table["domain"].iloc[rows].tolist(), True


def iterate_batches(loader: DataLoader, sampler: DomainBatchSampler, step: int, seed: int, device: torch.device,
                    channels_last: bool = False):
    """Endless ``(x, y)`` on ``device`` from step ``step`` on (epoch and position from the step)."""
    epoch, position = divmod(step, sampler.steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, start=position)
        loader.generator.manual_seed(seed * 100_003 + epoch)  # worker seeds: a function of (seed, epoch)
        for batch in loader:
            if batch is None:
                raise RuntimeError("every image of a batch failed to decode; see bad_images.csv in the run folder")
            x, y, _ = batch
            x = x.to(device, non_blocking=True)
            yield (x.to(memory_format=torch.channels_last) if channels_last else x), y.to(device, non_blocking=True)
        epoch, position = epoch + 1, 0


def is_checkpoint_step(step: int, t, steps_per_epoch: int, total_steps: int) -> bool:
    """Every ``checkpoint_every`` iterations (iteration mode) or epochs (epoch mode), and at the end."""
    every = t.checkpoint_every if t.iterations else t.checkpoint_every * steps_per_epoch
    return step % every == 0 or step == total_steps


def checkpoint_name(step: int, t, steps_per_epoch: int) -> str:
    """``step_0001500`` (the real step) in iteration mode, ``epoch_0003`` at the end of an epoch."""
    if t.iterations or step % steps_per_epoch:
        return f"step_{step:07d}"
    return f"epoch_{step // steps_per_epoch:04d}"


def evaluate(params: Params, model: nn.Module, device: torch.device) -> pd.DataFrame:
    """The UnED table (per domain and mean) of ``model`` on ``params.eval.eval_split``."""
    from unifex_lib.uned import evaluate_uned

    e = params.eval
    model.eval()
    return evaluate_uned(model, params.eval_root, domains=params.data.eval_domains, split=e.eval_split,
                         mode=e.eval_mode, transform=create_transform(params.data.eval_transform, model.data_config),
                         batch_size=e.eval_batch_size, device=str(device), metrics=e.metrics,
                         backend=e.knn_backend, num_workers=params.data.num_workers)


def evaluate_and_checkpoint(params: Params, net: TrainNet, optimizer, scaler, step: int, steps_per_epoch: int,
                            schedule, best: Optional[dict], info: DistInfo) -> tuple[dict, dict]:
    """Rank 0: evaluate, append to eval.csv, save the checkpoint, keep the best, redraw the plots."""
    t, run_dir = params.train, Path(params.run_dir)
    table = evaluate(params, net.model, info.device)
    table.insert(0, "epoch", step / steps_per_epoch)
    table.insert(0, "step", step)
    eval_csv = run_dir / "eval.csv"
    table.to_csv(eval_csv, mode="a", header=not eval_csv.is_file(), index=False)
    mean = table[table["domain"] == "mean"].iloc[0]
    if t.best_metric not in mean:
        raise ValueError(f"best_metric={t.best_metric!r} is not in the evaluation table; choose one of "
                         f"{', '.join(params.eval.metrics)}")
    name = checkpoint_name(step, t, steps_per_epoch)
    value = float(mean[t.best_metric])
    if best is None or value > best["value"]:
        best = {"name": name, "value": value, "step": step,
                "path": str(run_dir / "checkpoints" / f"{name}.safetensors")}
    state = {"step": step, "epoch": step // steps_per_epoch, "position": step % steps_per_epoch,
             "steps_per_epoch": steps_per_epoch, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "scheduler": {**dataclasses.asdict(schedule), "last_lr": schedule.lr_at(step)}, "rng": rng_states(),
             "best": best, "metrics": {k: float(v) for k, v in mean.items() if k in params.eval.metrics}}
    weights = {**prefixed(net.model.state_dict(), "model"), **prefixed(net.head.state_dict(), "head")}
    save_checkpoint(run_dir / "checkpoints", name, weights, state, t.keep_last, keep=[best["name"]])
    plot_run(run_dir, t.best_metric)
    log.info("step %d: %s; checkpoint %s (best %s %s = %.4f)", step, state["metrics"], name, best["name"],
             t.best_metric, best["value"])
    return state["metrics"], best


def resume(params: Params, net: TrainNet, optimizer, scaler, info: DistInfo) -> tuple[int, Optional[dict]]:
    """Load the newest checkpoint of the run folder; returns ``(step, best)`` (``(0, None)`` if there is none)."""
    newest = latest_checkpoint(Path(params.run_dir) / "checkpoints")
    if newest is None:
        log.info("resume=True but no checkpoint in %s; starting from step 0", Path(params.run_dir) / "checkpoints")
        return 0, None
    weights, state = load_checkpoint(newest)
    net.model.load_state_dict(unprefixed(weights, "model"))
    net.head.load_state_dict(unprefixed(weights, "head"))
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    if info.rank:  # the checkpoint holds rank 0's generators; other ranks get their own stream
        torch.manual_seed(params.train.seed + 1_000 * info.rank + state["step"])
    if info.is_main:
        _truncate_csv(Path(params.run_dir) / "eval.csv", state["step"])
    log.info("resumed from %s (step %d, epoch %d, position %d)", newest.stem, state["step"], state["epoch"],
             state["position"])
    return state["step"], state.get("best")


def load_checkpoint_model(run_dir_or_ckpt, device: str = "cpu"):
    """``(EmbeddingModel, Params)`` from a run folder (its best checkpoint) or a checkpoint file, in eval mode.

    The model is rebuilt from the run's ``params.yaml`` without downloading weights, then given the
    checkpoint's weights (safetensors; nothing is unpickled).
    """
    json_path = resolve_checkpoint(run_dir_or_ckpt)
    params = load_params(str(json_path.parent.parent / "params.yaml"))
    model = create_model(dataclasses.replace(params.model, pretrained=False), image_size=params.data.image_size)
    model.load_state_dict(unprefixed(load_weights(json_path), "model"))
    return model.to(device).eval(), params


class _History:
    """``history.csv`` rows (step, epoch, lr, loss), written by rank 0 at each checkpoint and at the end."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path, self.enabled, self.rows = path, enabled, []
        if enabled:
            _truncate_csv(path, start_step)

    def add(self, step: int, epoch: float, lr: float, loss: float) -> None:
        if self.enabled:
            self.rows.append({"step": step, "epoch": epoch, "lr": lr, "loss": loss})

    def flush(self) -> None:
        if self.enabled and self.rows:
            pd.DataFrame(self.rows).to_csv(self.path, mode="a", header=not self.path.is_file(), index=False)
            self.rows = []


def _truncate_csv(path: Path, step: int) -> None:
    """Drop the rows after ``step`` (written after the checkpoint a run resumes from)."""
    if path.is_file():
        table = pd.read_csv(path)
        table[table["step"] <= step].to_csv(path, index=False)


def _setup_logging(run_dir: Path, info: DistInfo, params: Params) -> None:
    if not info.is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    save_params(params, run_dir / "params.yaml")
    _close_logging()
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if not params.train.resume:  # a fresh run replaces an earlier run of the same name
        old = list_checkpoints(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
        if old:
            log.warning("resume=False: deleting %d checkpoint(s) of an earlier run in %s", len(old), run_dir)
        for path in old:
            delete_checkpoint(path)
        for name in ("eval.csv", "history.csv"):
            (run_dir / name).unlink(missing_ok=True)


def _close_logging() -> None:
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


def main(argv=None) -> dict:
    """Command line for ``torchrun`` (or plain ``python -m unifex_lib.train``)::

        torchrun --nproc_per_node 4 -m unifex_lib.train params/default.yaml -p lr 0.01 -p run_name big

    ``-p NAME VALUE`` overrides a flat parameter (VALUE read as YAML: ``-p iterations 500``, ``-p sam true``).
    """
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description="Train an embedding model (unifex_lib.train).")
    parser.add_argument("params_file", help="parameter file (YAML)")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override a flat parameter; repeatable")
    args = parser.parse_args(argv)
    return train(load_params(args.params_file, **{name: yaml.safe_load(value) for name, value in args.param}))


if __name__ == "__main__":
    main()
