"""What a person sees: progress bar, tensorboard (and wandb), metrics.jsonl, summary.json, a plot.

Only rank 0 writes. Every logged record also goes to `metrics.jsonl` in the run folder; a resumed
run keeps the records up to its checkpoint's step, so the final plot and summary cover the whole
run, not just the part after the restart.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_nullmoe.run.config import RunConfig


TAIL_EVALS = 4  # evaluations averaged into summary.json's tail_val_loss


class RunLog:
    def __init__(self, cfg: RunConfig, run_dir: Path, start_step: int, enabled: bool):
        self.cfg, self.run_dir, self.enabled = cfg, run_dir, enabled
        self.path = run_dir / "metrics.jsonl"
        self.records: list[dict] = []
        self.writer = self.wandb = self.bar = None
        self.start_step, self.start_time = start_step, time.perf_counter()
        if not enabled:
            return
        if self.path.exists():  # keep history up to the step we resume from
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if record["step"] <= start_step:
                    self.records.append(record)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.logging.wandb_project:
            try:
                import wandb
            except ImportError:
                raise SystemExit("logging.wandb_project is set but wandb is not installed "
                                 "(pip install wandb, or unset logging.wandb_project)") from None
            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.name,
                                    config=cfg.to_dict(), dir=str(run_dir), resume="allow")
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stdout, disable=None)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if self.writer is not None and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if "train/loss" in values:
            line = (f"loss {values['train/loss']:.3f} | {values['throughput/tokens_per_s']:.0f} tok/s"
                    f" | null vision {_fmt(values.get('null/vision'))} text "
                    f"{_fmt(values.get('null/text'))} | real/tok {values['moe/real_per_token']:.2f}")
            if (self.cfg.model.null_experts.target_scheduled
                    and values.get("moe/target_real_per_token") is not None):
                line += f" (target {values['moe/target_real_per_token']:.2f})"
            if values.get("train/kl") is not None:
                line += f" | kl {values['train/kl']:.2e}"
            self._show(step, line)
        if "val/loss" in values:
            self._show(step, f"validation loss {values['val/loss']:.3f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def _show(self, step: int, line: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(line, refresh=True)
        else:  # no terminal (CI, log files): plain lines, with the ETA a bar would show
            done = step - self.start_step
            eta = (time.perf_counter() - self.start_time) / max(done, 1) * (self.cfg.steps - step)
            print(f"step {step:5d}/{self.cfg.steps} | {line} | ETA {eta / 60:.1f} min", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()

    # ---------------------------------------------------------------------------- end of run
    def summary(self, extra: dict) -> dict:
        train = [r for r in self.records if "train/loss" in r]
        val = [r for r in self.records if "val/loss" in r]
        last = train[-1] if train else {}
        out = {
            "steps": last.get("step", 0),
            "initial_train_loss": train[0]["train/loss"] if train else None,
            "final_train_loss": last.get("train/loss"),
            "final_val_loss": val[-1]["val/loss"] if val else None,
            # the mean of the last evaluations: a study's loss that is not one noisy point
            "tail_val_loss": _mean([r["val/loss"] for r in val[-TAIL_EVALS:]]) if val else None,
            "null_rate_vision": last.get("null/vision"),
            "null_rate_text": last.get("null/text"),
            "real_experts_per_token": last.get("moe/real_per_token"),
            "rows_dispatched": last.get("moe/rows_dispatched_total"),
            "rows_standard_topk": last.get("moe/rows_topk_total"),
            "tokens_per_s": _mean([r["throughput/tokens_per_s"] for r in train[1:]] or
                                  [r["throughput/tokens_per_s"] for r in train]),
            **extra,
        }
        if self.enabled:
            (self.run_dir / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
        return out

    def plot(self) -> Optional[Path]:
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.records if "train/loss" in r]
        val = [r for r in self.records if "val/loss" in r]
        fig, (ax_loss, ax_null) = plt.subplots(1, 2, figsize=(10, 3.6))
        ax_loss.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train")
        if val:
            ax_loss.plot([r["step"] for r in val], [r["val/loss"] for r in val], "o-",
                         label="validation")
        ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
        ax_loss.legend()
        for key, label in (("null/vision", "vision tokens"), ("null/text", "text tokens"),
                           ("null/all", "all tokens")):
            points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
            if points:
                ax_null.plot(*zip(*points), label=label)
        ax_null.set(xlabel="step", ylabel="share of top-k slots that went to null",
                    title="Null-slot rate", ylim=(0, 1))
        ax_null.legend()
        fig.suptitle(f"{self.cfg.name}: {self.cfg.model.kind}, E={self.cfg.model.num_experts}, "
                     f"Z={self.cfg.model.null_experts.num_null_experts}, k={self.cfg.model.router_topk}")
        fig.tight_layout()
        path = self.run_dir / "training.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None
