"""Runs a test function on N real processes over gloo and collects what each rank returns."""

from __future__ import annotations

import os
import traceback

import torch
import torch.multiprocessing as mp


def _entry(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_nullmoe import parallel

    try:
        parallel.init_distributed(rank=rank, world_size=world, backend="gloo", timeout_s=120)
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        parallel.shutdown()


def run_ranks(world: int, fn, args: tuple, tmp_path) -> list:
    """fn(rank, world, *args) on `world` processes; returns each rank's return value.

    A rendezvous port taken between the draw and the bind (EADDRINUSE, another test's process
    got there first) is the machine's race, not the code's: the ranks start again on a new port,
    up to three times. Any other failure is reported at once.
    """
    from megatron_nullmoe.parallel import free_port

    out_dir = str(tmp_path)
    for attempt in range(3):
        for f in os.listdir(out_dir):
            if f.startswith("rank") and f.endswith((".err", ".pt")):
                os.remove(os.path.join(out_dir, f))
        try:
            mp.start_processes(_entry, args=(world, free_port(), fn, args, out_dir), nprocs=world,
                               join=True, start_method="spawn")
            break
        except Exception as e:
            errs = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir))
                    if f.endswith(".err")]
            if attempt < 2 and any("EADDRINUSE" in err for err in errs):
                continue
            raise AssertionError("a rank failed:\n" + "\n".join(errs)) from e
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
