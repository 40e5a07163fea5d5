"""`python -m megatron_nullmoe.train --config RECIPE.yaml [key.sub=value ...]` (or `nullmoe-train`).

Runs on one process, or on every rank under torchrun:
    torchrun --nproc-per-node 2 -m megatron_nullmoe.train --config examples/demo_vlm.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="nullmoe-train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML recipe (defaults are used where it is silent)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit without training")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the recipe")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    from megatron_nullmoe.errors import NullMoEError
    from megatron_nullmoe.run.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except NullMoEError as err:
        sys.exit(f"{err.what}: {err}")
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return
    from megatron_nullmoe.train.loop import train

    # Every rank meets the same error; rank 0 alone says it (torchrun interleaves their output).
    quiet = int(os.environ.get("RANK", "0")) != 0
    try:
        result = train(cfg)
    except NullMoEError as err:  # "config error: ..." or "error: ..."
        sys.exit(1 if quiet else f"{err.what}: {err}")
    # 75 (EX_TEMPFAIL): stopped by a signal or the time budget with a checkpoint; run it again.
    sys.exit(result.get("exit_code", 0))


if __name__ == "__main__":
    main()
