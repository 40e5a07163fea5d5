"""The training run: megatron-core DDP, optimizer, LR schedule and forward-backward schedule.

One function, `train(cfg)`, runs on every rank (launched by torchrun, or one process alone).
Parallel sizes come from the recipe; data parallel is what remains of the world size. Routing
statistics are handed the batch's modality mask before each forward, so every log shows the
null-slot rate for vision and text tokens separately; the router itself never sees modality.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_nullmoe import (check_routers, collectives, parallel, set_vision_mask,
                              start_null_slots_unpicked, update_null_budget)
from megatron_nullmoe.errors import NullMoEError
from megatron_nullmoe.run.checkpoint import CheckpointError, locate
from megatron_nullmoe.run.config import ConfigError, RunConfig, save_config
from megatron_nullmoe.run.data.kinds import build_data
from megatron_nullmoe.run.hf_folder import is_hf_folder, load_hf_weights
from megatron_nullmoe.run.model import build_model, describe
from megatron_nullmoe.run.tokenizer import load_tokenizer
from megatron_nullmoe.train import faults
from megatron_nullmoe.train.accounting import RunAccounting
from megatron_nullmoe.train.checkpoint import (INIT_MAY_DIFFER, Checkpointer, init_weights_from,
                                               run_identity)
from megatron_nullmoe.train.metrics import RunLog
from megatron_nullmoe.train.validate import validate


def _tokenizer(cfg: RunConfig):
    """run/tokenizer.py's interface: a sentencepiece model or a Hugging Face tokenizer.json."""
    if cfg.data.tokenizer is None and cfg.data.kind != "energon":
        raise ConfigError(f"data.tokenizer is required for {cfg.data.kind} data (a sentencepiece "
                          ".model or a tokenizer.json)")
    return load_tokenizer(cfg.tokenizer_path)


def _vocab_size(cfg: RunConfig, tokenizer) -> int:
    """The model's vocabulary: model.vocab_size (a Hugging Face model's, padded) or the
    tokenizer's; a tokenizer with ids past it is refused (they would index past the embedding)."""
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids, more than "
                          f"model.vocab_size={vocab}: give the model's own tokenizer "
                          "(data.tokenizer=...)")
    return vocab


class NonFiniteError(NullMoEError, RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient norm."""


class Trainer:
    """One training run on this rank. `__init__` goes through named steps, in order: distributed
    set-up and `validate` (the configuration checks that need a running job, once), process
    groups, model, optimizer, data, resume, run folder and logs, watchdog."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._distilling = False  # set for the forward-backward of a training step (see _run)
        start = time.monotonic()
        backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
        parallel.init_distributed(backend=backend, timeout_s=cfg.faults.collective_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_size, self.num_micro, self.dtype = validate(cfg, self.world)
        # Signals only set a flag from here on; the loop saves and stops at a step boundary.
        self.stop_request = faults.StopRequest(
            faults.parse_signals(cfg.faults.exit_signals),
            None if cfg.exit_after_minutes is None else start + 60 * cfg.exit_after_minutes)
        self._init_groups()
        self._build_model()
        self._build_optimizer()
        self._build_teacher()
        from megatron.core import parallel_state as ps

        self.data = build_data(cfg, self.tokenizer,
                                ps.get_data_parallel_rank(with_context_parallel=True), self.dp_size)
        latest = self._resume()
        self._open_run(latest)
        self.watchdog = None
        if cfg.faults.stall_timeout_s is not None:
            self.watchdog = faults.Watchdog(
                cfg.faults.stall_timeout_s, log=lambda text: print(text, file=sys.stderr))

    def _init_groups(self) -> None:
        from megatron.core import parallel_state as ps

        p = self.cfg.parallel
        parallel.init_model_parallel(p.tensor, p.expert, p.pipeline, self.cfg.seed)
        self.group = ps.get_data_parallel_group(with_context_parallel=True)
        # Ranks whose MoE layers see different tokens, the routers' own tp_dp_cp group: with
        # sequence parallelism every tensor-parallel rank routes its own slice of the sequence.
        self.token_group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        self.pp_group = ps.get_pipeline_model_parallel_group() if p.pipeline > 1 else None
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")

    def _build_model(self) -> None:
        """Tokenizer, the megatron-core model with null experts, and its DDP wrapper."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.process_groups_config import ProcessGroupCollection

        from megatron_nullmoe.train.flops import shapes_from_config

        self.tokenizer = _tokenizer(self.cfg)
        self.vocab_size = _vocab_size(self.cfg, self.tokenizer)
        model, self.info = build_model(self.cfg, self.vocab_size,
                                       ProcessGroupCollection.use_mpu_process_groups(), self.dtype)
        check_routers(model)
        if self.device.type != "cpu":
            # megatron-core leaves some parameters where torch made them, on the CPU (plain
            # torch.nn.Embedding positions, the local spec's norms, CLIP's conv1 and class
            # token): everything moves before it is wrapped, as in Megatron-LM's get_model.
            model.cuda(self.device)
        if self.dtype != torch.float32:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(model.config, model)
        self.model = model
        self.ddp = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        self.ddp.broadcast_params()
        self.accounting = RunAccounting(
            model, shapes_from_config(self.cfg, self.vocab_size),
            self.cfg.data.global_batch_size, self.token_group, self.pp_group)
        self.totals = self.accounting.totals  # one dict: what checkpoints carry

    def _build_teacher(self) -> None:
        """The frozen teacher of self-distillation (train/distill.py), when distill.weight > 0;
        its forward FLOPs count in the run's."""
        from megatron_nullmoe.train.distill import build_distiller

        self.distiller = build_distiller(self.cfg, self.model, self.vocab_size, self.dtype,
                                         self.device)
        if self.distiller is not None:
            self.accounting.add_teacher(self.distiller.teacher, self.distiller.shapes)

    def _build_optimizer(self) -> None:
        """megatron-core's Adam and LR schedule, and the hooks its schedules call."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg, o = self.cfg, self.cfg.optim
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, clip_grad=o.clip_grad,
            bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
            use_distributed_optimizer=False,
        ), [self.ddp])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=min(o.warmup_steps, cfg.steps - 1), lr_decay_steps=cfg.steps,
            lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=cfg.steps, wd_incr_style="constant",
            # On resume the recipe's schedule wins over the checkpoint's, so `steps=` can extend
            # a finished run; with an unchanged recipe the two are the same.
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
        config = self.model.config
        config.no_sync_func = self.ddp.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss

    def _resume(self) -> Optional[Path]:
        """Loads the newest checkpoint of the run folder, if any; returns its path."""
        cfg = self.cfg
        self.run_dir = Path(cfg.dir)
        identity, defaults = run_identity(cfg, self.vocab_size, self.world)
        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.ckpt = Checkpointer(ckpt_dir, cfg.checkpoint.keep_last, identity, defaults)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.init_note: Optional[str] = None
        latest = self.ckpt.latest()
        if latest is not None and not cfg.checkpoint.resume:
            raise ConfigError(
                f"checkpoint.resume=false, but {ckpt_dir} already holds checkpoints (newest "
                f"{latest.name}); use a new run folder (dir=...), or resume")
        if latest is not None:
            self.step, extra = self.ckpt.load(latest, self.model, self.optimizer, self.scheduler,
                                              self.data)
            self.totals.update(extra.get("totals", {}))
        elif cfg.checkpoint.init_from:
            self._init_from(cfg.checkpoint.init_from, identity, defaults)
        return latest

    def _init_from(self, source: str, identity: dict, defaults: dict) -> None:
        """A fresh run starts from another run's weights (checkpoint.init_from): the same
        architecture, with null slots, router settings and parallel layout free to differ. Null
        state the source lacks starts fresh; a fresh budget bias is placed at the first forward
        so that the first step picks what the source picks. Step, optimizer, LR schedule and
        data order start at 0. A Hugging Face folder (run/hf_folder.py) loads the same way; its
        architecture was checked against the recipe when the config was loaded."""
        try:
            if is_hf_folder(source):
                path, what = Path(source), "a Hugging Face folder"
                fresh = load_hf_weights(path, self.model)
            else:
                path = locate(source)
                step, fresh = init_weights_from(path, self.model, identity, defaults,
                                                INIT_MAY_DIFFER)
                what = f"step {step} of its run"
        except CheckpointError as err:
            raise ConfigError(f"checkpoint.init_from={source}: {err}") from None
        armed = start_null_slots_unpicked(self.model) \
            if any(k.endswith("null_budget_bias") for k in fresh) else 0
        self.init_note = (f"started from {path} ({what}): its weights"
                          + (f"; fresh null state: {len(fresh)} tensors" if fresh else ""))
        if armed:
            self.init_note += (f"; {armed} router(s) start with no null picks (budget bias below "
                               "every token's k-th real choice at the first forward)")
        elif fresh and self.cfg.model.null_experts.num_null_experts:
            self.init_note += ("; note: without budget control (model.null_experts."
                               "target_real_per_token) the null slots are live from the first "
                               "step, so outputs jump at the switch")

    def _open_run(self, latest: Optional[Path]) -> None:
        """The run folder's config.yaml (only now: a refused run leaves the folder as it was),
        the logs, and what a person should know before the first step."""
        cfg = self.cfg
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            # the run folder alone is enough to export, generate and evaluate
            self.tokenizer.save(self.run_dir)
        self.log = RunLog(cfg, self.run_dir, self.step, enabled=self.rank == 0)
        if self.init_note:
            self.log.message(self.init_note)
        if self.distiller is not None or cfg.distill.weight > 0:
            from megatron_nullmoe.train.distill import describe_distillation

            self.log.message(describe_distillation(cfg, self.distiller))
        if latest is not None:
            self.log.message(f"resumed from {latest} at step {self.step}"
                             + (f"; the run is complete (steps={cfg.steps}), nothing to train "
                                "(give steps=N to extend it)" if self.step >= cfg.steps else ""))
        null = cfg.model.null_experts
        if null.target_real_per_token is not None and null.num_null_experts == 0:
            self.log.message("note: model.null_experts.target_real_per_token is ignored with "
                             "num_null_experts=0 (there is no null slot to steer)")
        self.log.message(f"{cfg.model.kind} model: {describe(self.model)} | world {self.world}, "
                         f"data parallel {self.dp_size}, expert parallel {cfg.parallel.expert}, "
                         f"{self.num_micro} micro-batches of {cfg.data.micro_batch_size} | "
                         f"{self.info.decoder_seq_length} decoder positions per sample "
                         f"({self.info.image_tokens} image) | {self.dtype} on {self.device.type}")

    # ---------------------------------------------------------------------------- steps
    def _forward_step(self, data_iterator, model):
        batch = {k: v.to(self.device, non_blocking=True) for k, v in next(data_iterator).items()}
        set_vision_mask(self.model, batch["vision_BS"], batch["pad_BS"])
        distill = self.distiller if self._distilling else None
        if distill is not None:  # the same micro-batch through the frozen teacher, forward only
            set_vision_mask(distill.teacher, batch["vision_BS"], batch["pad_BS"])
            distill.tap.arm(distill.teacher_logits(batch["input_ids"], batch["position_ids"]))
        if self.cfg.model.kind == "vlm":
            loss_BS, mask_BS = model(batch["images"], batch["input_ids"], batch["position_ids"],
                                     None, labels=batch["labels"], loss_mask=batch["loss_mask"])
        else:
            loss_BS = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"])
            mask_BS = batch["loss_mask"]
        kl_BS = None
        if distill is not None:
            kl_BS = distill.tap.take()

        def loss_func(output_BS):
            mask = mask_BS.reshape(-1).float()
            total = (output_BS.float().reshape(-1) * mask).sum()
            count = mask.sum().clamp(min=1).to(torch.int)
            reports = {"lm loss": torch.stack([total.detach(), mask.sum()])}
            if kl_BS is not None:  # the same tokens, the same normalisation as the LM loss
                kl = (kl_BS.reshape(-1) * mask).sum()
                reports["kl"] = torch.stack([kl.detach(), mask.sum()])
                total = total + distill.scale * kl
            return total, count, reports

        return loss_BS, loss_func

    def _run(self, batches, forward_only: bool) -> tuple[float, float, float]:
        """(mean loss over all ranks, this rank's own loss sum, mean KL to the teacher over all
        ranks: nan unless distilling) of one forward(-backward). Only training distils."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = list(batches)
        self._beat(1)
        if not batches:
            return math.nan, math.nan, math.nan
        self._distilling = self.distiller is not None and not forward_only
        keys = ["lm loss", "kl"] if self._distilling else ["lm loss"]
        reports = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.ddp],
            num_microbatches=len(batches), seq_length=self.info.decoder_seq_length,
            micro_batch_size=self.cfg.data.micro_batch_size, forward_only=forward_only)
        self._distilling = False
        # [sum, token count] per key of this rank, read once; empty except on the last stage
        local = torch.cat([torch.stack([r[k].double() for r in reports]).sum(0) for k in keys]
                          ).tolist() if reports else [0.0, 0.0] * len(keys)
        total = collectives.reduce_values(local, self.group)
        if self.pp_group is not None:  # hand the last stage's loss to every stage
            total = collectives.reduce_values(total, self.pp_group)
        self._beat(2)
        kl = total[2] / max(total[3], 1.0) if len(keys) == 2 else math.nan
        return total[0] / max(total[1], 1.0), local[0], kl

    def _beat(self, phase: int) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(self.step + 1, phase)

    def _long_phase(self):
        """Saves and evaluations: the stall watchdog waits them out (see faults.Watchdog)."""
        return self.watchdog.long_phase() if self.watchdog is not None else contextlib.nullcontext()

    def train_step(self) -> dict:
        self._beat(0)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.ddp.train()
        loss, local, kl = self._run((self.data.next_train() for _ in range(self.num_micro)),
                                    False)
        skipped = self.cfg.faults.skip_nonfinite and self._nonfinite(loss, local)
        ok, grad_norm = False, math.nan
        if not skipped:
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        update_null_budget(self.model)
        self._beat(3)
        out = {"train/loss": loss, "train/grad_norm": float(grad_norm or 0.0),
               "train/lr": self.optimizer.param_groups[0]["lr"], "train/update_ok": bool(ok),
               "train/skipped_steps_total": self.totals["skipped_steps"]}
        if self.distiller is not None:  # train/loss stays the LM loss, comparable across runs
            out["train/kl"] = kl
        return out

    def _nonfinite(self, loss: float, local_loss: float) -> bool:
        """Whether this step must be skipped (the same answer on every rank). Raises
        NonFiniteError after faults.max_nonfinite_in_a_row such steps in a row."""
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        ranks = faults.nonfinite_ranks([local_loss])
        if math.isfinite(loss) and math.isfinite(grad_norm) and not ranks:
            self.nonfinite_in_a_row = 0
            return False
        self.nonfinite_in_a_row += 1
        self.totals["skipped_steps"] += 1
        step, limit = self.step + 1, self.cfg.faults.max_nonfinite_in_a_row
        where = (f"a non-finite loss on rank(s) {', '.join(map(str, ranks))}" if ranks else
                 f"a non-finite gradient norm ({grad_norm}) reduced over all ranks")
        if self.nonfinite_in_a_row >= limit:
            latest = self.ckpt.latest()
            raise NonFiniteError(
                f"step {step}: {where}, {self.nonfinite_in_a_row} steps in a row "
                f"(faults.max_nonfinite_in_a_row={limit}); stopping without saving. The last "
                f"good checkpoint is {latest if latest else 'none (no checkpoint was saved yet)'}"
                "; resume from it (e.g. with a lower optim.lr), or look at the data of this step")
        self.log.message(f"warning: step {step} skipped: {where} "
                         f"({self.nonfinite_in_a_row} in a row, stop at {limit})")
        return True

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.accounting.set_aside()  # training's counts stay training's
        self.ddp.eval()
        loss, _, _ = self._run(self.data.val_batches(self.cfg.logging.eval_steps), True)
        self.ddp.train()
        stats = self.accounting.routing().get("all")
        self.accounting.dispatch()  # the evaluation's rows: not training compute
        out = {"val/loss": loss}
        if stats is not None:
            by = stats.null_fraction_by_modality()
            out.update({"val/null_vision": by["vision"], "val/null_text": by["text"]})
        return out

    def _save(self) -> Path:
        """A checkpoint of this step, unless a rank holds non-finite weights (then the last good
        checkpoint stays the newest and the run stops with the reason)."""
        self._beat(3)
        if self._steps_in_interval:  # counts of steps not logged yet belong in the checkpoint
            self._close_interval()
        bad = faults.params_finite(self.model)
        if bad:
            raise CheckpointError(
                f"refusing to save step {self.step}: rank(s) {', '.join(map(str, bad))} hold "
                f"non-finite weights; the last good checkpoint ({self.ckpt.latest() or 'none'}) "
                "is kept")
        with self._long_phase():
            path = self.ckpt.save(self.step, self.model, self.optimizer, self.scheduler,
                                  self.data, totals=self.totals)
        self.log.message(f"saved checkpoint {path}")
        self._beat(3)
        self._tick = time.perf_counter()  # saving time is not training throughput
        return path

    # ----------------------------------------------------------------------------- run
    def _close_interval(self) -> dict:
        """Folds the routing and dispatch counts and the FLOPs of the steps since the last close
        into the running totals (so a checkpoint holds all of them) and returns their stats."""
        elapsed = max(time.perf_counter() - self._tick, 1e-9)
        tokens_per_step = self.cfg.data.global_batch_size * self.info.decoder_seq_length
        out = {"throughput/tokens_per_s": tokens_per_step * self._steps_in_interval / elapsed}
        out.update(self.accounting.close_interval(self._steps_in_interval, elapsed))
        null = self.cfg.model.null_experts
        if (self._steps_in_interval and null.num_null_experts
                and null.target_real_per_token is not None):
            # the budget target over the interval's steps, averaged as moe/real_per_token is (the
            # routers' budget_step equals self.step: both advance once per step, both resume)
            out["moe/target_real_per_token"] = null.mean_target(
                self.step, first_step=self.step - self._steps_in_interval)
        self._tick, self._steps_in_interval = time.perf_counter(), 0
        return out

    def fit(self) -> dict:
        cfg, lg = self.cfg, self.cfg.logging
        tokens_per_step = cfg.data.global_batch_size * self.info.decoder_seq_length
        # Count the first interval from here: a resumed run has no rows logged before it.
        self.accounting.routing()
        self.accounting.dispatch()
        self._tick, self._steps_in_interval = time.perf_counter(), 0
        stop = cfg.steps if cfg.exit_after_steps is None else min(
            cfg.steps, self.step + cfg.exit_after_steps)
        if cfg.exit_at_step is not None:
            stop = min(stop, max(cfg.exit_at_step, self.step))
        saved_at = None
        while self.step < stop:
            values = self.train_step()
            self.step += 1
            self.totals["tokens"] += tokens_per_step
            self._steps_in_interval += 1
            self.log.advance()
            if self.step % lg.log_every == 0 or self.step == cfg.steps or self.step == 1:
                values.update(self._close_interval())
                self.log.log(self.step, values)
            if self.step in lg.eval_at or (lg.eval_every and (
                    self.step % lg.eval_every == 0 or self.step == cfg.steps)):
                with self._long_phase():
                    self.log.log(self.step, self.evaluate())
                self._tick = time.perf_counter()  # evaluation time is not training throughput
            every = cfg.checkpoint.save_every
            if (every and self.step % every == 0) or self.step == stop:
                self._save()
                saved_at = self.step
            reason = self.stop_request.agreed()  # one collective: every rank stops together
            if reason is not None and self.step < cfg.steps:
                if saved_at != self.step:
                    self._save()
                self.log.message(f"stopping at step {self.step} of {cfg.steps} ({reason}) with a "
                                 f"checkpoint; launch again to resume (exit code "
                                 f"{faults.EXIT_STOPPED})")
                self.log.close()
                return {"steps": self.step, "stopped_early": True, "exit_code": faults.EXIT_STOPPED}
        if self.step < cfg.steps:
            why = "exit_at_step" if stop == cfg.exit_at_step else "exit_after_steps"
            self.log.message(f"stopping at step {self.step} of {cfg.steps} ({why}); "
                             "launch again to resume")
            self.log.close()
            return {"steps": self.step, "stopped_early": True}
        summary = self.log.summary({"parameters_rank0": describe(self.model),
                                    "run_dir": str(self.run_dir),
                                    "model_flops_total": self.totals["model_flops"],
                                    "tokens_total": self.totals["tokens"],
                                    "null_rate_total": self.totals["null_picks"]
                                    / max(self.totals["slots"], 1),
                                    "skipped_steps": self.totals["skipped_steps"],
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
        if trainer.watchdog is not None:
            trainer.watchdog.close()
        trainer.stop_request.restore()
        parallel.shutdown()
