"""Pre-emption, non-finite values and hangs: what keeps a cluster job from losing work silently.

- `StopRequest`: the configured signals (default TERM, USR1, INT) only set a flag. At each step
  boundary every rank agrees on it with one collective (a MAX over the world, together with the
  time budget), so all ranks save the same step and exit together, with `EXIT_STOPPED` (75,
  "temporary failure: run again"). A second signal while saving is ignored; the save completes.
  Processes the rank starts afterwards (data-loader workers, the checkpoint writer's helpers)
  never see those signals, so a signal sent to every process of the job cannot break the save.
- `nonfinite_ranks`: which ranks saw a non-finite loss or gradient norm in a step (every rank gets
  the same answer, so every rank skips the same step).
- `Watchdog`: each rank writes a heartbeat (step, phase, time) into torch.distributed's store at
  every phase of a step. When this rank has made no progress for `stall_timeout_s`, a thread
  reads every rank's heartbeat, names the rank(s) furthest behind, and ends the process with
  `EXIT_STALLED` rather than waiting in a collective until the (longer) collective timeout.
  Checkpoint saves and evaluation may legitimately take longer than a step; they run under
  `Watchdog.long_phase()`, where only the collective timeout applies.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import signal
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_nullmoe import collectives

EXIT_STOPPED = 75  # stopped on request (signal or time budget) with a checkpoint: run it again
EXIT_STALLED = 76  # a rank stopped making progress

SIGNALS = {"TERM": signal.SIGTERM, "USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2,
           "INT": signal.SIGINT, "HUP": signal.SIGHUP}


def parse_signals(text: str) -> list[signal.Signals]:
    """'TERM,USR1' -> [SIGTERM, SIGUSR1]; raises ValueError naming a bad name and the valid ones."""
    out = []
    for name in (n.strip().upper().removeprefix("SIG") for n in text.split(",")):
        if not name:
            continue
        if name not in SIGNALS:
            raise ValueError(f"faults.exit_signals: {name!r} is not one of {', '.join(SIGNALS)}")
        out.append(SIGNALS[name])
    return out


class StopRequest:
    """A flag set by signals and read, agreed on by all ranks, at step boundaries.

    The save that follows a signal needs the rank's helper processes alive, but the signal
    reaches them too: torchrun sends it to each worker's process group, Slurm to every process
    of the job. megatron-core's checkpoint writer returns its results through a multiprocessing
    manager's process (without it the save fails with BrokenPipeError); energon asks its
    data-loader workers for their position, and torch's workers die of any SIGTERM but their
    parent's. So the main thread blocks the signals: every process it starts from then on
    inherits the mask, never sees them, and ends with the rank (or by SIGKILL). The rank still
    gets them: a thread of its own waits for them, and any older thread that takes one runs the
    Python handler (which also serves where signals cannot be masked)."""

    def __init__(self, signals: list[signal.Signals], deadline: Optional[float] = None):
        self.received: Optional[str] = None
        self.deadline = deadline  # time.monotonic() value after which the run stops
        self._previous = {}
        self._mask: Optional[set] = None  # the main thread's mask before ours
        self._waiter: Optional[threading.Thread] = None
        self._closing = False
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if signals and hasattr(signal, "pthread_sigmask"):
            # Starting CPython's resource tracker unblocks TERM and INT in the starting thread
            # (multiprocessing.resource_tracker.ensure_running): start it now, before the mask.
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
            self._waiter = threading.Thread(target=self._wait, args=(set(signals),),
                                            name="nullmoe-stop-signals", daemon=True)
            self._waiter.start()  # after the mask: it inherits it, as sigwait requires
            # Registered after multiprocessing's and torch's own exit hooks, so it runs first.
            atexit.register(_end_daemon_children)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def _wait(self, signals: set) -> None:
        while True:
            signum = signal.sigwait(signals)
            if self._closing:
                return
            self._handle(signum, None)

    def agreed(self, group=None) -> Optional[str]:
        """Why to stop now, the same on every rank (one collective), or None."""
        local = 0
        if self.received is not None:
            local = 2
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            local = 1
        flag = int(collectives.reduce_values([local], group, op="max")[0])
        return {0: None, 1: "exit_after_minutes", 2: "a stop signal"}[flag]

    def restore(self) -> None:
        if self._waiter is not None:
            self._closing = True
            signal.pthread_kill(self._waiter.ident, next(iter(self._previous)))  # wakes its sigwait
            self._waiter.join(timeout=5)
            self._waiter = None
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._mask = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _end_daemon_children() -> None:
    """At exit multiprocessing ends daemon children (data-loader workers) with SIGTERM, which
    children started under StopRequest's mask never see: it would wait for them forever. End
    them with SIGKILL first. torch's SIGCHLD handler would report that as a failed worker; the
    run is over, so it is set aside meanwhile."""
    import multiprocessing

    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in children:
            child.kill()
        for child in children:
            child.join(timeout=5)
    finally:
        signal.signal(signal.SIGCHLD, previous)


def nonfinite_ranks(local_values: list[float], group=None) -> list[int]:
    """Ranks (global numbers) whose local values include a non-finite one; every rank gets the
    same list (one all-gather of a flag)."""
    bad = not all(math.isfinite(v) for v in local_values)
    flags = collectives.gather_values(float(bad), group)
    return [r for r, f in zip(collectives.group_ranks(group), flags) if f]


def params_finite(model, group=None) -> list[int]:
    """Ranks holding a non-finite parameter (every rank gets the same list)."""
    local = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return nonfinite_ranks([0.0 if local else math.nan], group)


class Watchdog:
    """Names the rank that stalls, instead of leaving every rank waiting in a collective."""

    PHASES = ("step start", "data ready", "forward-backward done", "optimizer done")

    def __init__(self, timeout_s: float, log=print, exit_fn=os._exit):
        self.timeout_s, self.log, self.exit_fn = timeout_s, log, exit_fn
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.store = _default_store()
        self.last = time.monotonic()
        self.where = (0, 0)
        self.held = False  # inside a long phase (save, evaluation): no stall verdict
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="nullmoe-watchdog", daemon=True)
        self.beat(0, 0)
        self._thread.start()

    def beat(self, step: int, phase: int) -> None:
        """This rank reached `phase` (index into PHASES) of `step`."""
        self.last, self.where = time.monotonic(), (step, phase)
        if self.store is not None:
            self.store.set(f"nullmoe/heartbeat/{self.rank}", f"{step} {phase} {time.time():.3f}")

    @contextlib.contextmanager
    def long_phase(self):
        """A phase whose length has no bound tied to a step (a checkpoint save, an evaluation):
        the watchdog waits it out; the collective timeout still ends a hang inside it."""
        self.held = True
        try:
            yield
        finally:
            self.held = False
            self.last = time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(5.0, self.timeout_s / 4)
        tick = time.monotonic()
        while not self._stop.wait(poll):
            now = time.monotonic()
            frozen, tick = now - tick - poll, now
            if frozen > max(poll, 1.0):
                # This thread itself did not run for that long: the whole process was suspended
                # (SIGSTOP, Ctrl-Z, `scontrol suspend`). That time is not a stall of this rank.
                self.last += frozen
            idle = now - self.last
            if idle > self.timeout_s and not self.held:
                self.log(self.report(idle))
                sys.stdout.flush()
                sys.stderr.flush()
                self.exit_fn(EXIT_STALLED)
                return

    def report(self, idle: float) -> str:
        step, phase = self.where
        head = (f"watchdog: rank {self.rank} made no progress for {idle:.0f} s "
                f"(faults.stall_timeout_s={self.timeout_s:g}) after step {step} "
                f"'{self.PHASES[phase]}'")
        beats = self._heartbeats()
        if not beats:
            return head + "; no heartbeats of other ranks could be read"
        behind = min(beats.values(), key=lambda b: (b[0], b[1]))
        laggards = sorted(r for r, b in beats.items() if b[:2] == behind[:2])
        now = time.time()
        if len(laggards) == len(beats):
            return (head + f"; every rank is at step {behind[0]} '{self.PHASES[behind[1]]}', so "
                    "none is behind the others (a hang inside that phase on all ranks)")
        who = ", ".join(f"rank {r} (at step {beats[r][0]} '{self.PHASES[beats[r][1]]}', last "
                        f"heartbeat {now - beats[r][2]:.0f} s ago)" for r in laggards)
        return head + f"; stalled: {who}; the other ranks wait for it"

    def _heartbeats(self) -> dict[int, tuple[int, int, float]]:
        if self.store is None:
            return {}
        keys = [f"nullmoe/heartbeat/{r}" for r in range(self.world)]
        out = {}
        for r, key in enumerate(keys):
            try:
                if self.store.check([key]):
                    step, phase, when = self.store.get(key).decode().split()
                    out[r] = (int(step), int(phase), float(when))
            except Exception:  # the store's host may be the rank that is gone
                continue
        return out


def _default_store():
    """The key-value store torch.distributed rendezvoused through (None if there is none)."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None
