"""Test-only trainer entry with faults injected. The FAULT_* variables are read by this file alone
(the product has no such switch a user could leave on):

  FAULT_NAN_STEPS=3,4  FAULT_NAN_RANK=1   that rank's loss (and so its gradients) is NaN there
  FAULT_STALL_STEP=3   FAULT_STALL_RANK=1 that rank stops making progress at that step
  FAULT_SLOW_STEP_S=0.3                   every step sleeps this long (room to send a signal)
  FAULT_PID_DIR=DIR                       each rank writes its pid to DIR/rank<R>, and the step it
                                          starts to DIR/step<R> (after the previous step's stop check)
"""

import math
import os
import time
from pathlib import Path

from megatron_nullmoe.train import loop
from megatron_nullmoe.train.__main__ import main


def _ints(name: str) -> set[int]:
    return {int(x) for x in os.environ.get(name, "").split(",") if x}


NAN_STEPS, NAN_RANK = _ints("FAULT_NAN_STEPS"), int(os.environ.get("FAULT_NAN_RANK", "0"))
STALL_STEP, STALL_RANK = int(os.environ.get("FAULT_STALL_STEP", "0")), \
    int(os.environ.get("FAULT_STALL_RANK", "0"))
SLOW_S = float(os.environ.get("FAULT_SLOW_STEP_S", "0"))

_forward, _train_step, _init = loop.Trainer._forward_step, loop.Trainer.train_step, \
    loop.Trainer.__init__


def forward_step(self, data_iterator, model):
    output, loss_func = _forward(self, data_iterator, model)
    if self.step + 1 in NAN_STEPS and self.rank == NAN_RANK:
        output = output * math.nan
    return output, loss_func


def train_step(self):
    if self.step + 1 == STALL_STEP and self.rank == STALL_RANK:
        self._beat(0)
        time.sleep(3600)
    if os.environ.get("FAULT_PID_DIR"):
        (Path(os.environ["FAULT_PID_DIR"]) / f"step{self.rank}").write_text(str(self.step + 1))
    if SLOW_S:
        time.sleep(SLOW_S)
    return _train_step(self)


def init(self, cfg):
    _init(self, cfg)
    if os.environ.get("FAULT_PID_DIR"):
        folder = Path(os.environ["FAULT_PID_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{self.rank}").write_text(str(os.getpid()))


loop.Trainer._forward_step = forward_step
loop.Trainer.train_step = train_step
loop.Trainer.__init__ = init

if __name__ == "__main__":
    main()
