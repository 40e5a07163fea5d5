"""Reading what Megatron-LM's training loop prints: its iteration lines.

Standard library only, and importing nothing of the package: the GPU check's driver loads this
file by its path, on the machine's interpreter, before the venv that holds megatron-core exists.
"""

from __future__ import annotations

import re

# "iteration        3/      10 | consumed samples: 24 | ... | lm loss: 6.9E+00 | ..."
LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")


def iterations(log: str) -> dict[int, dict[str, str]]:
    """Megatron-LM's iteration lines: {iteration: {field: printed value}}."""
    found = {}
    for it, rest in LINE.findall(log):
        fields = (f.rsplit(":", 1) for f in rest.split("|") if ":" in f)
        found[int(it)] = {k.strip(): v.strip() for k, v in fields}
    return found
