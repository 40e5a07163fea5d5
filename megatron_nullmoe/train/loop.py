"""The training run: megatron-core DDP, optimizer, LR schedule and forward-backward schedule.

One function, `train(cfg)`, runs on every rank (launched by torchrun, or one process alone).
Parallel sizes come from the recipe; data parallel is what remains of the world size. Routing
statistics are handed the batch's modality mask before each forward, so every log shows the
null-slot rate for vision and text tokens separately; the router itself never sees modality.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_nullmoe import dispatch_stats, routing_stats, set_vision_mask, update_null_budget
from megatron_nullmoe.dispatch.stats import DispatchStats
from megatron_nullmoe.routing.stats import RoutingStats
from megatron_nullmoe import _mcore, parallel
from megatron_nullmoe.train.checkpoint import Checkpointer
from megatron_nullmoe.train.config import ConfigError, RunConfig, save_config
from megatron_nullmoe.train.data.tokenizer import Tokenizer
from megatron_nullmoe.train.metrics import RunLog
from megatron_nullmoe.train.model import build_model, describe, image_tokens, null_config


def check(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """Checks what only a running job knows (world size); returns (dp size, micro-batches)."""
    from megatron_nullmoe.train.model import check_pipeline

    p, d = cfg.parallel, cfg.data
    for name in ("tensor", "expert"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}={getattr(p, name)}: give a size >= 1")
    check_pipeline(cfg)
    mp = p.tensor * p.pipeline
    if world_size % mp:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x "
                          f"parallel.pipeline = {mp}")
    dp = world_size // mp
    if (world_size // p.pipeline) % p.expert:
        raise ConfigError(f"parallel.expert={p.expert} must divide world size / pipeline = "
                          f"{world_size // p.pipeline} (experts spread over the data- and "
                          "tensor-parallel ranks; expert tensor parallelism is 1)")
    if cfg.model.num_experts % p.expert:
        raise ConfigError(f"model.num_experts={cfg.model.num_experts} is not divisible by "
                          f"parallel.expert={p.expert}")
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                          f"data.micro_batch_size x data-parallel size = {d.micro_batch_size} x {dp}")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last}: keep at least 1")
    if cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps}: train at least 1 step")
    if cfg.exit_after_steps is not None and cfg.exit_after_steps < 1:
        raise ConfigError(f"exit_after_steps={cfg.exit_after_steps}: give a number of steps >= 1, "
                          "or null to run to `steps`")
    return dp, d.global_batch_size // (d.micro_batch_size * dp)


def check_device(cfg: RunConfig) -> None:
    """What this machine can run: tensor parallelism needs TE on GPU."""
    if cfg.parallel.tensor > 1 and not (torch.cuda.is_available() and _mcore.have_te()):
        raise ConfigError(
            f"parallel.tensor={cfg.parallel.tensor} needs a GPU with Transformer Engine: "
            "megatron-core trains MoE layers with tensor parallelism only together with sequence "
            "parallelism, and its non-TE norms refuse sequence parallelism; use parallel.tensor=1")


def _dtype(cfg: RunConfig) -> torch.dtype:
    check_device(cfg)
    gpu = torch.cuda.is_available()
    if cfg.precision == "bf16" and not gpu:
        raise ConfigError("precision=bf16 needs a GPU; on CPU use precision=fp32 (or auto)")
    if cfg.precision == "auto":
        return torch.bfloat16 if gpu else torch.float32
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def _build_data(cfg: RunConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int):
    d = cfg.data
    if d.kind == "energon":
        if cfg.model.kind != "vlm":
            raise ConfigError("data.kind=energon holds image+caption samples: use model.kind=vlm "
                              "(or data.kind=jsonl for a GPT)")
        from megatron_nullmoe.train.data.energon import EnergonData

        return EnergonData(d.path, tokenizer, d.seq_length, cfg.model.vision.image_size,
                           image_tokens(cfg), d.micro_batch_size, dp_rank, dp_size, cfg.seed,
                           d.num_workers, d.shuffle_buffer_size)
    if cfg.model.kind != "gpt":
        raise ConfigError(f"data.kind={d.kind} is text only: use model.kind=gpt")
    if d.kind == "indexed":
        from megatron_nullmoe.train.data.indexed import IndexedData

        return IndexedData(
            d.path, d.valid_path, tokenizer, d.seq_length, d.micro_batch_size, dp_rank, dp_size,
            cfg.seed, train_samples=cfg.steps * d.global_batch_size,
            valid_samples=cfg.logging.eval_steps * d.micro_batch_size * dp_size,
            cache_dir=Path(cfg.dir) / "data_cache")
    from megatron_nullmoe.train.data.text import JsonlData

    return JsonlData(d.path, d.valid_path, tokenizer, d.seq_length, d.micro_batch_size, dp_rank,
                     dp_size, cfg.seed)


def _tokenizer(cfg: RunConfig) -> Tokenizer:
    path = cfg.data.tokenizer or str(Path(cfg.data.path) / "tokenizer.model")
    if cfg.data.tokenizer is None and cfg.data.kind != "energon":
        raise ConfigError(f"data.tokenizer is required for {cfg.data.kind} data (a sentencepiece "
                          ".model)")
    return Tokenizer(path)


class Trainer:
    def __init__(self, cfg: RunConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.process_groups_config import ProcessGroupCollection

        self.cfg = cfg
        backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
        parallel.init_distributed(backend=backend)
        self.rank, world = dist.get_rank(), dist.get_world_size()
        self.dp_size, self.num_micro = check(cfg, world)
        dtype = _dtype(cfg)
        parallel.init_model_parallel(cfg.parallel.tensor, cfg.parallel.expert, cfg.parallel.pipeline,
                                     cfg.seed)
        self.group = ps.get_data_parallel_group(with_context_parallel=True)
        # Ranks whose MoE layers see different tokens: with sequence parallelism (tensor > 1)
        # every tensor-parallel rank routes its own slice of the sequence.
        self.token_group = (ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
                            if cfg.parallel.tensor > 1 else self.group)
        self.pp_group = (ps.get_pipeline_model_parallel_group() if cfg.parallel.pipeline > 1
                         else None)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.run_dir = Path(cfg.dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"dir={cfg.dir!r} is a file; give a folder for the run")

        self.tokenizer = _tokenizer(cfg)
        model, self.info = build_model(cfg, self.tokenizer.vocab_size,
                                       ProcessGroupCollection.use_mpu_process_groups(), dtype)
        if dtype != torch.float32:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(model.config, model)
        self.model = model
        self.ddp = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        self.ddp.broadcast_params()
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, clip_grad=o.clip_grad,
            bf16=dtype == torch.bfloat16, params_dtype=dtype, use_distributed_optimizer=False,
        ), [self.ddp])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=min(o.warmup_steps, cfg.steps - 1), lr_decay_steps=cfg.steps,
            lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=cfg.steps, wd_incr_style="constant",
            # On resume the recipe's schedule wins over the checkpoint's, so `steps=` can extend
            # a finished run; with an unchanged recipe the two are the same.
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
        config = model.config
        config.no_sync_func = self.ddp.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss

        dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        self.data = _build_data(cfg, self.tokenizer, dp_rank, self.dp_size)
        identity = {"model": dataclasses.asdict(cfg.model), "null": dataclasses.asdict(null_config(cfg)),
                    "vocab_size": self.tokenizer.vocab_size, "world_size": world,
                    "parallel": {k: v for k, v in dataclasses.asdict(cfg.parallel).items() if k != "backend"}}
        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.ckpt = Checkpointer(ckpt_dir, cfg.checkpoint.keep_last, identity)
        self.step = 0
        latest = self.ckpt.latest()
        if latest is not None and not cfg.checkpoint.resume:
            raise ConfigError(
                f"checkpoint.resume=false, but {ckpt_dir} already holds checkpoints (newest "
                f"{latest.name}); use a new run folder (dir=...), or resume")
        if latest is not None:
            self.step = self.ckpt.load(latest, self.model, self.optimizer, self.scheduler, self.data)
        if self.rank == 0:  # only now: a refused run leaves the folder as it was
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.log = RunLog(cfg, self.run_dir, self.step, enabled=self.rank == 0)
        if latest is not None:
            self.log.message(f"resumed from {latest} at step {self.step}"
                             + (f"; the run is complete (steps={cfg.steps}), nothing to train "
                                "(give steps=N to extend it)" if self.step >= cfg.steps else ""))
        null = cfg.model.null_experts
        if null.target_real_per_token is not None and null.num_null_experts == 0:
            self.log.message("note: model.null_experts.target_real_per_token is ignored with "
                             "num_null_experts=0 (there is no null slot to steer)")
        self.log.message(f"{cfg.model.kind} model: {describe(self.model)} | world {world}, data "
                         f"parallel {self.dp_size}, expert parallel {cfg.parallel.expert}, "
                         f"{self.num_micro} micro-batches of {cfg.data.micro_batch_size} | "
                         f"{self.info.decoder_seq_length} decoder positions per sample "
                         f"({self.info.image_tokens} image) | {dtype} on {self.device.type}")
        self.rows = {"dispatched": 0, "topk": 0}
        from megatron_nullmoe.flops import shapes_from_config

        self.shapes = shapes_from_config(cfg, self.tokenizer.vocab_size)
        done = [r for r in self.log.records if "throughput/model_flops_total" in r]
        self.model_flops = done[-1]["throughput/model_flops_total"] if done else 0.0

    # ---------------------------------------------------------------------------- steps
    def _forward_step(self, data_iterator, model):
        batch = {k: v.to(self.device, non_blocking=True) for k, v in next(data_iterator).items()}
        set_vision_mask(self.model, batch["vision_BS"], batch["pad_BS"])
        if self.cfg.model.kind == "vlm":
            loss_BS, mask_BS = model(batch["images"], batch["input_ids"], batch["position_ids"],
                                     None, labels=batch["labels"], loss_mask=batch["loss_mask"])
        else:
            loss_BS = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"])
            mask_BS = batch["loss_mask"]

        def loss_func(output_BS):
            mask = mask_BS.reshape(-1).float()
            total = (output_BS.float().reshape(-1) * mask).sum()
            count = mask.sum().clamp(min=1).to(torch.int)
            return total, count, {"lm loss": torch.stack([total.detach(), mask.sum()])}

        return loss_BS, loss_func

    def _run(self, batches, forward_only: bool) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = list(batches)
        if not batches:
            return math.nan
        reports = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.ddp],
            num_microbatches=len(batches), seq_length=self.info.decoder_seq_length,
            micro_batch_size=self.cfg.data.micro_batch_size, forward_only=forward_only)
        total = torch.zeros(2, dtype=torch.float64)
        for r in reports:  # empty except on the last pipeline stage
            total += r["lm loss"].double().cpu()
        dist.all_reduce(total, group=self.group)
        if self.pp_group is not None:  # hand the last stage's loss to every stage
            dist.all_reduce(total, group=self.pp_group)
        return float(total[0] / total[1].clamp(min=1))

    def train_step(self) -> dict:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.ddp.train()
        loss = self._run((self.data.next_train() for _ in range(self.num_micro)), False)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        update_null_budget(self.model, group=self.token_group)
        return {"train/loss": loss, "train/grad_norm": float(grad_norm or 0.0),
                "train/lr": self.optimizer.param_groups[0]["lr"], "train/update_ok": bool(ok)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self._routing_stats()  # keep train stats out of val stats
        self.ddp.eval()
        loss = self._run(self.data.val_batches(self.cfg.logging.eval_steps), True)
        self.ddp.train()
        stats = self._routing_stats().get("all")
        out = {"val/loss": loss}
        if stats is not None:
            by = stats.null_fraction_by_modality()
            out.update({"val/null_vision": by["vision"], "val/null_text": by["text"]})
        return out

    def _routing_stats(self) -> dict:
        """Routing statistics of all MoE layers, whichever pipeline stage holds them."""
        stats = routing_stats(self.model, self.token_group, reset=True)
        if self.pp_group is None:
            return stats
        mine = {k: (s.topk, {n: t.cpu() for n, t in s.counts.items()})
                for k, s in stats.items() if k != "all"}
        stages = [None] * dist.get_world_size(self.pp_group)
        dist.all_gather_object(stages, mine, group=self.pp_group)
        merged = {k: RoutingStats(topk, counts) for stage in stages for k, (topk, counts) in stage.items()}
        if merged:
            merged["all"] = sum(list(merged.values())[1:], list(merged.values())[0])
        return merged

    def _dispatch_stats(self) -> DispatchStats:
        rows = dispatch_stats(self.model, self.token_group, reset=True)
        if self.pp_group is not None:
            stages = [None] * dist.get_world_size(self.pp_group)
            dist.all_gather_object(stages, rows.as_dict(), group=self.pp_group)
            rows = DispatchStats(**{k: sum(s[k] for s in stages) for k in stages[0]})
        return rows

    def interval_stats(self) -> dict:
        stats = self._routing_stats()
        rows = self._dispatch_stats()
        self.rows["dispatched"] += rows.rows_dispatched
        self.rows["topk"] += rows.rows_topk
        out = {"moe/rows_dispatched_total": self.rows["dispatched"],
               "moe/rows_topk_total": self.rows["topk"],
               "moe/rows_over_topk": rows.rows_dispatched / max(rows.rows_topk, 1)}
        if "all" in stats:
            total = stats.pop("all")
            by = total.null_fraction_by_modality()
            out.update({"null/all": total.null_fraction, "null/vision": by["vision"],
                        "null/text": by["text"], "moe/real_per_token": total.real_per_token,
                        "moe/max_over_mean_load": total.max_over_mean_load})
            out.update({f"null/layer_{n}": s.null_fraction for n, s in stats.items()})
        return out

    def _flops(self, real_per_token, steps: int, elapsed: float) -> dict:
        """Model FLOPs from the realised real experts per token, not from top-k (Megatron-LM's
        counter uses top-k and would overstate a null-MoE's work by k / realised)."""
        from megatron_nullmoe.flops import train_flops_per_sample

        if real_per_token is None:
            return {}
        per_step = self.cfg.data.global_batch_size * train_flops_per_sample(*self.shapes,
                                                                              real_per_token)
        self.model_flops += per_step * steps
        return {"throughput/tflops_per_s": per_step * steps / elapsed / 1e12,
                "throughput/model_flops_total": self.model_flops}

    # ----------------------------------------------------------------------------- run
    def fit(self) -> dict:
        cfg, lg = self.cfg, self.cfg.logging
        tokens_per_step = cfg.data.global_batch_size * self.info.decoder_seq_length
        # Count the first interval from here: a resumed run has no rows logged before it.
        routing_stats(self.model, self.token_group, reset=True)
        dispatch_stats(self.model, self.token_group, reset=True)
        tick, steps_in_interval = time.perf_counter(), 0
        stop = cfg.steps if cfg.exit_after_steps is None else min(
            cfg.steps, self.step + cfg.exit_after_steps)
        while self.step < stop:
            values = self.train_step()
            self.step += 1
            steps_in_interval += 1
            self.log.advance()
            if self.step % lg.log_every == 0 or self.step == cfg.steps or self.step == 1:
                elapsed = time.perf_counter() - tick
                values["throughput/tokens_per_s"] = tokens_per_step * steps_in_interval / elapsed
                values.update(self.interval_stats())
                values.update(self._flops(values.get("moe/real_per_token"), steps_in_interval,
                                          elapsed))
                self.log.log(self.step, values)
                tick, steps_in_interval = time.perf_counter(), 0
            if lg.eval_every and (self.step % lg.eval_every == 0 or self.step == cfg.steps):
                self.log.log(self.step, self.evaluate())
                tick = time.perf_counter()  # evaluation time is not training throughput
            every = cfg.checkpoint.save_every
            if (every and self.step % every == 0) or self.step == stop:
                path = self.ckpt.save(self.step, self.model, self.optimizer, self.scheduler, self.data)
                self.log.message(f"saved checkpoint {path}")
                tick = time.perf_counter()
        if self.step < cfg.steps:
            self.log.message(f"stopping at step {self.step} of {cfg.steps} (exit_after_steps); "
                             "launch again to resume")
            self.log.close()
            return {"steps": self.step, "stopped_early": True}
        summary = self.log.summary({"parameters_rank0": describe(self.model),
                                    "run_dir": str(self.run_dir),
                                    "model_flops_total": self.model_flops,
                                    "world_size": dist.get_world_size()})
        plot = self.log.plot()
        self.log.message(f"summary: {self.run_dir / 'summary.json'}; plot: {plot}")
        self.log.close()
        return summary


def train(cfg: RunConfig) -> dict:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        parallel.shutdown()
