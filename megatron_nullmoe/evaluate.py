"""`python -m megatron_nullmoe.evaluate SOURCE [--data FILE.jsonl]`: perplexity, real experts/token.

    python -m megatron_nullmoe.evaluate runs/gpt_null_moe
    python -m megatron_nullmoe.evaluate exports/gpt_null_moe --data data/demo/text/val.jsonl --json
    python -m megatron_nullmoe.evaluate runs/gpt_null_moe --seq-length 64 --max-windows 100

SOURCE is a run folder, a checkpoint folder or an export folder (GPT models; the VLM export is not
built yet). A run or checkpoint is converted in memory to the export's model (the same classes and
weights `python -m megatron_nullmoe.export hf` writes); an export is loaded by transformers. On
CPU, fp32, without a KV cache.

The data is a jsonl file of {"text": ...} lines (default: the run's data.valid_path), cut into
windows of --seq-length + 1 tokens exactly as the trainer cuts its validation windows (default:
the run's data.seq_length; for an export min(128, max_position_embeddings)), with the source's
own tokenizer. The mean negative log-likelihood is over every predicted token (natural log),
perplexity is its exponential; the real experts per token are what the MoE layers ran (real
picks per token and MoE layer, next to the model's top-k). A short summary is printed, or with
--json one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Optional

EXPORT_SEQ_LENGTH = 128  # an export's default --seq-length (capped by max_position_embeddings)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.evaluate",
                                description=__doc__.split("\n")[0])
    p.add_argument("source", help="a run folder, a checkpoint folder (iter_NNNNNNN) or an export")
    p.add_argument("--data", metavar="FILE.jsonl",
                   help="a jsonl file of {\"text\": ...} lines (default: the run's "
                        "data.valid_path; required for an export)")
    p.add_argument("--seq-length", type=int, metavar="N",
                   help="predicted tokens per window (default: the run's data.seq_length; an "
                        f"export: min({EXPORT_SEQ_LENGTH}, max_position_embeddings))")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="windows per forward (default 8)")
    p.add_argument("--max-windows", type=int, metavar="N", help="evaluate only the first N windows")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.add_argument("--config", help="the run's config.yaml (default: the run folder's)")
    p.add_argument("--tokenizer", help="the run's sentencepiece .model (default: the run folder's)")
    return p


def _data_path(a, source) -> Path:
    from megatron_nullmoe.inference.perplexity import EvaluationError

    if a.data is not None:
        path = Path(a.data)
        if path.is_dir():
            raise EvaluationError(
                f"--data {a.data!r} is a folder: give a jsonl file of {{\"text\": ...}} lines "
                "(energon image+caption datasets are for VLMs, whose export is not built yet)")
        if not path.is_file():
            raise EvaluationError(f"--data {a.data!r} does not exist: give a jsonl file of "
                                  "{\"text\": ...} lines")
        return path
    if source.kind == "export":
        raise EvaluationError(f"{a.source} is an export, which names no validation data: give "
                              "--data FILE.jsonl")
    d = source.cfg.data
    if d.kind != "jsonl":
        raise EvaluationError(f"the run's data is data.kind={d.kind} ({d.valid_path or d.path}); "
                              "evaluate reads jsonl: give --data FILE.jsonl")
    if not d.valid_path:
        raise EvaluationError("the run has no data.valid_path: give --data FILE.jsonl")
    path = Path(d.valid_path)
    if not path.is_file():
        raise EvaluationError(f"the run's data.valid_path {d.valid_path!r} does not exist: give "
                              "--data FILE.jsonl")
    return path


def _seq_length(a, source, max_positions: int) -> int:
    from megatron_nullmoe.inference.perplexity import EvaluationError

    if a.seq_length is None:
        if source.kind == "export":
            return min(EXPORT_SEQ_LENGTH, max_positions)
        length = source.cfg.data.seq_length
        if length > max_positions:
            raise EvaluationError(f"the run's data.seq_length {length} passes the model's "
                                  f"{max_positions} positions: give --seq-length 1 to "
                                  f"{max_positions}")
        return length
    if not 1 <= a.seq_length <= max_positions:
        raise EvaluationError(f"--seq-length {a.seq_length}: give 1 to {max_positions} (the "
                              f"model's max_position_embeddings is {max_positions})")
    return a.seq_length


def _windows(path: Path, tokenizer, seq_length: int):
    from megatron_nullmoe.inference.perplexity import EvaluationError
    from megatron_nullmoe.train.data import DataError
    from megatron_nullmoe.train.data.text import iter_texts, read_windows

    try:
        return read_windows(path, tokenizer, seq_length)
    except DataError as err:
        if "fewer than one sequence" not in str(err):
            raise EvaluationError(str(err)) from None
    tokens = sum(len(tokenizer.encode(text)) + 2 for text in iter_texts(path))  # <s> text </s>
    hint = (f"give --seq-length {tokens - 1} or less, or more text" if tokens >= 2
            else "give a file with text")
    raise EvaluationError(f"{path} holds {tokens} tokens, fewer than one window of --seq-length "
                          f"+ 1 = {seq_length + 1}: {hint}")


def run(a) -> dict:
    """Everything the summary shows (what --json prints)."""
    import torch

    from megatron_nullmoe.export.source import hf_from_megatron, load_hf, load_megatron, resolve
    from megatron_nullmoe.inference.perplexity import EvaluationError, evaluate
    from megatron_nullmoe.train.data.tokenizer import Tokenizer

    if a.batch_size < 1:
        raise EvaluationError(f"--batch-size {a.batch_size}: give 1 or more")
    if a.max_windows is not None and a.max_windows < 1:
        raise EvaluationError(f"--max-windows {a.max_windows}: give 1 or more (or leave it out "
                              "for all windows)")
    source = resolve(a.source, a.config, a.tokenizer)
    step: Optional[int] = source.step
    if source.kind == "checkpoint":
        if source.cfg.model.kind != "gpt":
            raise EvaluationError(
                f"{a.source} is a VLM (model.kind: {source.cfg.model.kind}, data.kind: "
                f"{source.cfg.data.kind}): the VLM export is not built yet; evaluate takes GPT "
                "runs and exports")
        max_positions = source.cfg.model.max_position_embeddings
        tokenizer_path = source.tokenizer
    else:
        config = json.loads((source.path / "config.json").read_text())
        max_positions = int(config["max_position_embeddings"])
        tokenizer_path = source.path / "tokenizer.model"
        provenance = source.path / "export.json"
        if provenance.is_file():
            step = json.loads(provenance.read_text()).get("step")
    data = _data_path(a, source)
    seq_length = _seq_length(a, source, max_positions)
    tokenizer = Tokenizer(tokenizer_path)
    windows = _windows(data, tokenizer, seq_length)
    available = windows.shape[0]
    if a.max_windows is not None:
        windows = windows[: a.max_windows]
    if source.kind == "export":
        hf_model, _ = load_hf(source.path, torch.float32)
    else:
        hf_model, _ = hf_from_megatron(load_megatron(source), source.tokenizer)
    result = evaluate(hf_model, windows, a.batch_size)
    c = hf_model.config
    return {"source": str(source.path), "kind": source.kind, "step": step, "data": str(data),
            "seq_length": seq_length, "windows_available": available, **result,
            "router_topk": c.router_topk, "num_experts": c.num_experts,
            "num_null_experts": c.num_null_experts, "moe_layers": int(sum(c.moe_layers)),
            "batch_size": a.batch_size}


def summary(r: dict) -> str:
    step = f" step {r['step']}" if r.get("step") is not None else ""
    windows = f"{r['windows']} windows" + (f" (of {r['windows_available']})"
                                           if r["windows"] != r["windows_available"] else "")
    real = r["real_experts_per_token"]
    routing = (f"real experts per token {real:.3f} (MoE-layer mean; top-{r['router_topk']} over "
               f"{r['num_experts']} real + {r['num_null_experts']} null slots)"
               if real is not None else "real experts per token: - (no MoE layers)")
    return "\n".join([
        f"{r['kind']} {r['source']}{step} on {r['data']}",
        f"perplexity {r['perplexity']:.4f}  (mean NLL {r['mean_nll']:.5f} nats/token)",
        f"{r['tokens']} tokens in {windows} of seq-length {r['seq_length']}",
        routing,
    ])


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_nullmoe.export.hf import ExportError
    from megatron_nullmoe.export.source import SourceError
    from megatron_nullmoe.inference.perplexity import EvaluationError
    from megatron_nullmoe.train.data import DataError
    from megatron_nullmoe.train.data.tokenizer import TokenizerError

    try:
        result = run(a)
    except (SourceError, ExportError, EvaluationError, DataError, TokenizerError) as err:
        sys.exit(f"evaluate error: {err}")
    if a.json:
        print(json.dumps(result))
    else:
        print(summary(result))
    if not math.isfinite(result["perplexity"]):
        print("warning: the perplexity is not finite", file=sys.stderr)


if __name__ == "__main__":
    main()
