"""The frozen teacher of self-distillation (`distill.*`, ZEDA's first stage) and the KL term.

The teacher is the source the null slots are switched on in (by default `checkpoint.init_from`),
built as that source is: a run or checkpoint folder of this trainer with its saved model section,
a Hugging Face folder with the architecture of its config.json (no null slots). It is built with
the student's process groups, parallel layout, precision and device, so that every rank runs the
same teacher forward on the same micro-batch and the teacher's expert-parallel collectives pair
up with each other's; it is frozen (eval mode, no gradient, outside DDP and the optimizer, never
checkpointed) and runs forward only, under no_grad.

The student's LM loss stays megatron-core's (the model called with labels, as without
distillation); the KL is computed from its logits by a forward hook on the output layer
(`KLTap`), so that the LM term is computed exactly as without distillation.

Legend: B micro-batch, S sequence, V/TP this rank's vocabulary columns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_nullmoe.run.config import ConfigError, Distill, Model, RunConfig
from megatron_nullmoe.train.kl import vocab_parallel_kl


@dataclass(frozen=True)
class TeacherSource:
    """What the teacher is built from: its model section, its vocabulary, and how its weights
    load into a built model."""

    model: Model
    vocab_size: Optional[int]
    load: Callable[[torch.nn.Module], None]
    what: str


def resolve_teacher(path: str, student: RunConfig) -> TeacherSource:
    """The teacher at `path`: a Hugging Face folder or a run / checkpoint folder of this trainer.
    ConfigError names distill.teacher and what is wrong."""
    from megatron_nullmoe.run.checkpoint import CheckpointError, load_model_weights
    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.run.hf_folder import is_hf_folder, load_hf_weights
    from megatron_nullmoe.run.source import SourceError, run_source

    key = f"distill.teacher={path}" + (" (checkpoint.init_from)" if student.distill.teacher
                                       is None else "")
    try:
        if is_hf_folder(path):
            model = load_config(None, [f"checkpoint.init_from={path}"]).model
            return TeacherSource(model, model.vocab_size,
                                 lambda m: load_hf_weights(Path(path), m),
                                 f"{path} (a Hugging Face folder)")
        source = run_source(Path(path))
    except (CheckpointError, SourceError) as err:
        raise ConfigError(f"{key}: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"{key}: {str(err).removeprefix('checkpoint.init_from=')}") from None
    if source is None:
        raise ConfigError(f"{key}: not a run folder, checkpoint folder or Hugging Face folder "
                          "(config.yaml, nullmoe.json or config.json)")
    return TeacherSource(source.cfg.model, source.vocab_size,
                         lambda m: load_model_weights(source.path, m),
                         f"{source.path} (step {source.step} of its run)")


def _check(teacher: TeacherSource, student: RunConfig, vocab_size: int, key: str) -> None:
    m = teacher.model
    problems = []
    if teacher.vocab_size is not None and teacher.vocab_size != vocab_size:
        problems.append(f"its vocabulary has {teacher.vocab_size} ids, the student's {vocab_size}"
                        " (the KL compares distributions over one vocabulary)")
    if m.kind != student.model.kind:
        problems.append(f"it is model.kind={m.kind}, the student {student.model.kind}")
    if m.num_experts % student.parallel.expert:
        problems.append(f"its {m.num_experts} experts do not split over parallel.expert="
                        f"{student.parallel.expert} (it runs in the student's layout)")
    if problems:
        raise ConfigError(f"{key} cannot teach this run: " + "; ".join(problems))


class KLTap:
    """Computes the KL term from the student's logits inside its forward: a hook on the output
    layer, armed with the teacher's logits of the micro-batch, runs `kl` on the [S, B, V/TP]
    logits the moment they exist. Not later: megatron-core's cross entropy works on the logits
    in place (it subtracts the maxima and exponentiates into the same memory), so after the
    model returns its loss they no longer hold logits. `take` hands the result over once."""

    def __init__(self, model: torch.nn.Module, kl: Callable):
        layers = [m for n, m in model.named_modules()
                  if n == "output_layer" or n.endswith(".output_layer")]
        if len(layers) != 1:
            raise ValueError(f"expected one output_layer in the model, found {len(layers)}")
        self.kl = kl
        self._teacher: Optional[torch.Tensor] = None
        self._result: Optional[torch.Tensor] = None
        layers[0].register_forward_hook(self._hook)

    def arm(self, teacher_BSV: torch.Tensor) -> None:
        self._teacher, self._result = teacher_BSV, None

    def _hook(self, module, args, output) -> None:
        if self._teacher is not None:
            logits_SBV = output[0] if isinstance(output, tuple) else output
            self._result = self.kl(self._teacher, logits_SBV)
            self._teacher = None

    def take(self) -> torch.Tensor:
        result, self._result, self._teacher = self._result, None, None
        if result is None:
            raise RuntimeError("the student's output layer did not run while the tap was armed")
        return result


def build_distiller(cfg: RunConfig, student: torch.nn.Module, vocab_size: int,
                    dtype: torch.dtype, device: torch.device) -> Optional["Distiller"]:
    """The run's Distiller (with megatron-core's process groups, as the student's), or None when
    it does not distil."""
    if cfg.distill_teacher is None:
        return None
    from megatron.core.process_groups_config import ProcessGroupCollection

    return Distiller(cfg, student, vocab_size, ProcessGroupCollection.use_mpu_process_groups(),
                     dtype, device)


def describe_distillation(cfg: RunConfig, distiller: Optional["Distiller"]) -> str:
    """The log's line on distillation: what teaches with which loss, or why nothing does."""
    d = cfg.distill
    if distiller is None:
        return (f"note: distill.weight={d.weight} is ignored with distill.teacher={d.teacher} "
                "(no distillation)")
    params = sum(p.numel() for p in distiller.teacher.parameters())
    return (f"distilling from {distiller.what}: loss = LM + {d.weight} x {d.temperature}^2 x "
            f"KL(teacher || student), the teacher frozen ({params} parameters)")


class Distiller:
    """The frozen teacher and the KL term of one run (built on every rank, in the same order)."""

    def __init__(self, cfg: RunConfig, student: torch.nn.Module, vocab_size: int, pg_collection,
                 dtype: torch.dtype, device: torch.device):
        from megatron.core import parallel_state as ps

        from megatron_nullmoe.run.model import build_model, check_model
        from megatron_nullmoe.train.flops import shapes_from_config

        path = cfg.distill_teacher
        key = f"distill.teacher={path}"
        source = resolve_teacher(path, cfg)
        _check(source, cfg, vocab_size, key)
        # the student's run (layout, precision, data) with the teacher's model, not distilling
        teacher_cfg = dataclasses.replace(cfg, model=source.model, distill=Distill())
        try:
            check_model(teacher_cfg, dtype)
        except ConfigError as err:
            raise ConfigError(f"{key}: the teacher's model: {err}") from None
        self.weight, self.temperature = cfg.distill.weight, cfg.distill.temperature
        self.tp_group = ps.get_tensor_model_parallel_group()
        # Building draws random initial weights; the student's run must not see that.
        with _rng_kept():
            model, _ = build_model(teacher_cfg, vocab_size, pg_collection, dtype)
        if device.type != "cpu":
            model.cuda(device)  # as the student: everything on the device before wrapping
        if dtype != torch.float32:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(model.config, model)
        try:
            source.load(model)
        except Exception as err:  # CheckpointError, SourceError: named by the key
            raise ConfigError(f"{key}: {err}") from None
        model.requires_grad_(False)
        self.teacher = model.eval()
        self.what = source.what
        self.shapes = shapes_from_config(teacher_cfg, vocab_size)
        self.tap = KLTap(student, self.kl_BS)

    @torch.no_grad()
    def teacher_logits(self, input_ids_BS: torch.Tensor,
                       position_ids_BS: torch.Tensor) -> torch.Tensor:
        """The teacher's [B, S, V/TP] logits of a micro-batch, forward only."""
        return self.teacher(input_ids_BS, position_ids_BS, None)

    def kl_BS(self, teacher_BSV: torch.Tensor, student_SBV: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) per token at the temperature, [B, S] fp32."""
        return vocab_parallel_kl(teacher_BSV, student_SBV.transpose(0, 1), self.tp_group,
                                 self.temperature)

    @property
    def scale(self) -> float:
        """The KL's factor in the loss: weight x temperature^2."""
        return self.weight * self.temperature ** 2


class _rng_kept:
    """Leaves torch's and megatron-core's RNG states as they were on entry."""

    def __enter__(self):
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        self.tracker = get_cuda_rng_tracker()
        self.state = (torch.get_rng_state(), self.tracker.get_states(),
                      torch.cuda.get_rng_state() if torch.cuda.is_available() else None)

    def __exit__(self, *exc):
        cpu, tracker, cuda = self.state
        torch.set_rng_state(cpu)
        self.tracker.set_states(tracker)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
