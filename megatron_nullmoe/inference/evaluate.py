"""`python -m megatron_nullmoe.evaluate SOURCE [--data PATH]`: perplexity, real experts per token.

    python -m megatron_nullmoe.evaluate runs/gpt_null_moe
    python -m megatron_nullmoe.evaluate exports/gpt_null_moe --data data/demo/text/val.jsonl --json
    python -m megatron_nullmoe.evaluate runs/gpt_null_moe --seq-length 64 --max-windows 100
    python -m megatron_nullmoe.evaluate runs/demo_vlm      # the run's energon val split
    python -m megatron_nullmoe.evaluate exports/demo_vlm --data data/demo --max-windows 64

SOURCE is a run folder, a checkpoint folder or an export folder, of a GPT or a VLM. A run or
checkpoint is converted in memory to the export's model (the same classes and weights
`python -m megatron_nullmoe.export hf` writes: NullMoEForCausalLM, or for a VLM
NullMoEForConditionalGeneration); an export is loaded by transformers. On CPU, fp32, without a KV
cache.

GPT: the data is a jsonl file of {"text": ...} lines (default: the run's data.valid_path), cut
into windows of --seq-length + 1 tokens exactly as the trainer cuts its validation windows
(default: the run's data.seq_length; for an export min(128, max_position_embeddings)), with the
source's own tokenizer. The mean negative log-likelihood is over every predicted token.

VLM: the data is an energon image+caption dataset folder, its validation split (default: the
run's data.path; required for an export), read and encoded as the trainer reads its validation
samples: the image, then <s> caption </s> padded or cut to --seq-length text tokens (default: the
run's data.seq_length; for an export min(128, max_position_embeddings - image positions)). The
mean negative log-likelihood is over the caption tokens the trainer's loss mask counts (the
caption and </s>, not <s> nor padding), so perplexity is exp of the trainer's validation loss on
the same samples; --max-windows caps the number of samples.

Natural log; perplexity is the exponential of the mean NLL. The real experts per token are what
the MoE layers ran (real picks per token and MoE layer, next to the model's top-k; a VLM: over
image and non-padding text positions, and split into image and text tokens, the image tokens'
share read from a second, image-only forward, which the causal decoder routes as the first). A
short summary is printed, or with --json one JSON object on stdout (a VLM's: samples,
samples_available, tokens = caption tokens, image_tokens = image positions per sample,
real_experts_per_token, real_experts_per_image_token, real_experts_per_text_token, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from megatron_nullmoe.errors import NullMoEError
from megatron_nullmoe.export.source import (hf_from_megatron, is_vlm_export, load_hf, load_megatron,
                                            resolve)
from megatron_nullmoe.inference.perplexity import EvaluationError, evaluate, evaluate_vlm
from megatron_nullmoe.run.data import DataError
from megatron_nullmoe.run.data.text import iter_texts, read_windows
from megatron_nullmoe.run.tokenizer import Tokenizer, load_tokenizer

EXPORT_SEQ_LENGTH = 128  # an export's default --seq-length (capped by max_position_embeddings)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.evaluate",
                                description=__doc__.split("\n")[0])
    p.add_argument("source", help="a run folder, a checkpoint folder (iter_NNNNNNN) or an export, "
                                  "of a GPT or a VLM")
    p.add_argument("--data", metavar="FILE.jsonl|DIR",
                   help="GPT: a jsonl file of {\"text\": ...} lines (default: the run's "
                        "data.valid_path); VLM: an energon image+caption dataset folder, whose "
                        "val split is read (default: the run's data.path); required for an export")
    p.add_argument("--seq-length", type=int, metavar="N",
                   help="GPT: predicted tokens per window; VLM: text tokens per sample (<s> "
                        "caption </s>, padded or cut) (default: the run's data.seq_length; an "
                        f"export: min({EXPORT_SEQ_LENGTH}, max_position_embeddings less a VLM's "
                        "image positions))")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="windows (GPT) or samples (VLM) per forward (default 8)")
    p.add_argument("--max-windows", type=int, metavar="N",
                   help="evaluate only the first N windows (GPT) or samples (VLM)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.add_argument("--config", help="the run's config.yaml (default: the run folder's)")
    p.add_argument("--tokenizer", help="the run's sentencepiece .model or tokenizer.json "
                                       "(default: the run folder's)")
    return p


def _data_path(a, source) -> Path:
    if a.data is not None:
        path = Path(a.data)
        if path.is_dir():
            raise EvaluationError(
                f"--data {a.data!r} is a folder: give a jsonl file of {{\"text\": ...}} lines "
                f"({a.source} is a GPT; energon image+caption dataset folders are for VLMs)")
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


def _seq_length(a, source, max_positions: int, image_positions: int = 0) -> int:
    """--seq-length, or the default, checked against the decoder positions left for text."""
    limit = max_positions - image_positions
    room = (f"the model's max_position_embeddings is {max_positions}" if not image_positions else
            f"the model's max_position_embeddings {max_positions} less {image_positions} image "
            "positions")
    if limit < 1:
        raise EvaluationError(f"no text position is left: {room}")
    if a.seq_length is None:
        if source.kind == "export":
            return min(EXPORT_SEQ_LENGTH, limit)
        length = source.cfg.data.seq_length
        if length > limit:
            raise EvaluationError(f"the run's data.seq_length {length} passes the model's "
                                  f"{max_positions} positions"
                                  + (f" (with {image_positions} image positions)"
                                     if image_positions else "")
                                  + f": give --seq-length 1 to {limit}")
        return length
    if not 1 <= a.seq_length <= limit:
        raise EvaluationError(f"--seq-length {a.seq_length}: give 1 to {limit} ({room})")
    return a.seq_length


def _windows(path: Path, tokenizer, seq_length: int):
    try:
        return read_windows(path, tokenizer, seq_length)
    except DataError as err:
        if "fewer than one sequence" not in str(err):
            raise EvaluationError(str(err)) from None
    specials = 1 + (tokenizer.bos_id is not None)  # <s> text </s>
    tokens = sum(len(tokenizer.encode(text)) + specials for text in iter_texts(path))
    hint = (f"give --seq-length {tokens - 1} or less, or more text" if tokens >= 2
            else "give a file with text")
    raise EvaluationError(f"{path} holds {tokens} tokens, fewer than one window of --seq-length "
                          f"+ 1 = {seq_length + 1}: {hint}")


def _is_vlm(source) -> bool:
    if source.kind == "checkpoint":
        return source.cfg.model.kind == "vlm"
    return is_vlm_export(source.path)


def _export_step(source) -> Optional[int]:
    provenance = source.path / "export.json"
    return json.loads(provenance.read_text()).get("step") if provenance.is_file() else None


def _hf_model(source, vlm: bool = False):
    """The export's model: loaded from the folder, or converted in memory from a checkpoint."""
    if source.kind != "export":
        return hf_from_megatron(load_megatron(source), source.tokenizer)[0]
    if not vlm:
        return load_hf(source.path, torch.float32)[0]
    # A VLM export through AutoModelForImageTextToText, which only VLM exports name: a GPT and a
    # VLM export share their remote code, and once transformers has registered that code's
    # config class for AutoModelForCausalLM (NullMoEForCausalLM, from a GPT export loaded in the
    # same process from a folder of the same name), AutoModelForCausalLM returns that class for
    # the VLM too, ignoring the folder's auto_map. transformers stays a local import, as in
    # export/source.py: --help and the refusals before a model loads never import it.
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForImageTextToText.from_pretrained(
        str(source.path), trust_remote_code=True, dtype=torch.float32).eval()


def _routing_fields(c) -> dict:
    return {"router_topk": c.router_topk, "num_experts": c.num_experts,
            "num_null_experts": c.num_null_experts, "moe_layers": int(sum(c.moe_layers))}


def run(a) -> dict:
    """Everything the summary shows (what --json prints)."""
    if a.batch_size < 1:
        raise EvaluationError(f"--batch-size {a.batch_size}: give 1 or more")
    if a.max_windows is not None and a.max_windows < 1:
        raise EvaluationError(f"--max-windows {a.max_windows}: give 1 or more (or leave it out "
                              "for all windows or samples)")
    source = resolve(a.source, a.config, a.tokenizer)
    if _is_vlm(source):
        return run_vlm(a, source)
    step: Optional[int] = source.step
    if source.kind == "checkpoint":
        max_positions = source.cfg.model.max_position_embeddings
        tokenizer_path = source.tokenizer
    else:
        config = json.loads((source.path / "config.json").read_text())
        max_positions = int(config["max_position_embeddings"])
        tokenizer_path = source.path  # its tokenizer.json, else tokenizer.model
        step = _export_step(source)
    data = _data_path(a, source)
    seq_length = _seq_length(a, source, max_positions)
    tokenizer = load_tokenizer(tokenizer_path)
    windows = _windows(data, tokenizer, seq_length)
    available = windows.shape[0]
    if a.max_windows is not None:
        windows = windows[: a.max_windows]
    hf_model = _hf_model(source)
    result = evaluate(hf_model, windows, a.batch_size)
    return {"source": str(source.path), "kind": source.kind, "model": "gpt", "step": step,
            "data": str(data), "seq_length": seq_length, "windows_available": available,
            **result, **_routing_fields(hf_model.config), "batch_size": a.batch_size}


# ----------------------------------------------------------------------------- VLM
def _vlm_data_path(a, source) -> Path:
    """The energon dataset folder: --data, or the run's data.path."""
    if a.data is not None:
        path = Path(a.data)
        if path.is_file():
            raise EvaluationError(
                f"--data {a.data!r} is a file: {a.source} is a VLM, which evaluates on an energon "
                "image+caption dataset folder (the one holding .nv-meta/), not on jsonl text")
        if not path.exists():
            raise EvaluationError(f"--data {a.data!r} does not exist: give an energon "
                                  "image+caption dataset folder")
        return path
    if source.kind == "export":
        raise EvaluationError(f"{a.source} is a VLM export, which names no validation data: give "
                              "--data DIR (an energon image+caption dataset folder)")
    d = source.cfg.data
    if d.kind != "energon":
        raise EvaluationError(f"the run's data is data.kind={d.kind} ({d.path}); a VLM evaluates "
                              "on an energon image+caption dataset: give --data DIR")
    return Path(d.path)


def caption_batches(path: Path, tokenizer, seq_length: int, image_size: int, image_tokens: int,
                    batch_size: int, max_samples: Optional[int] = None, seed: int = 0):
    """(batches, samples in the split or None): the validation split of an energon dataset as
    the trainer reads it (CaptionEncoder, to_model_inputs; in order, one rank, no workers),
    cut to the first `max_samples` samples."""
    # Local: energon is the loader only a VLM's split needs; a GPT evaluation never loads it.
    from megatron.energon import WorkerConfig, get_loader, get_val_dataset, reraise_exception

    from megatron_nullmoe.run.data.energon import CaptionEncoder, check_dataset, to_model_inputs

    check_dataset(path)
    encoder = CaptionEncoder(tokenizer, seq_length, image_size)

    def dataset(size: int):
        config = WorkerConfig(rank=0, world_size=1, num_workers=0, seed_offset=seed,
                              global_error_handler=reraise_exception)
        return get_val_dataset(str(path), split_part="val", worker_config=config,
                               batch_size=size, task_encoder=encoder)

    try:
        loader = get_loader(dataset(batch_size))
    except Exception as err:  # e.g. energon's EmptyDatasetError for a split with no shards
        raise EvaluationError(f"dataset {str(path)!r} has no readable val split: "
                              f"{type(err).__name__}: {err}") from None
    try:
        available = len(dataset(1))
    except Exception:  # a dataset that cannot tell its length
        available = None
    batches, samples = [], 0
    it = iter(loader)
    while max_samples is None or samples < max_samples:
        try:
            batch = next(it)
        except StopIteration:
            break
        except DataError:
            raise
        except Exception as err:  # energon names the shard in its message
            raise DataError(f"reading dataset {str(path)!r} failed: {err}") from err
        inputs = to_model_inputs(batch, image_tokens)
        if max_samples is not None and samples + inputs["input_ids"].shape[0] > max_samples:
            keep = max_samples - samples
            inputs = {k: v[:keep] for k, v in inputs.items()}
        batches.append(inputs)
        samples += inputs["input_ids"].shape[0]
    if not batches:
        raise EvaluationError(f"dataset {str(path)!r} has no samples in its val split")
    return batches, available


def run_vlm(a, source) -> dict:
    """run() for a VLM run, checkpoint or export."""
    data = _vlm_data_path(a, source)  # refuse before loading anything
    if source.kind == "checkpoint":
        cfg = source.cfg
        max_positions, n_img = cfg.model.max_position_embeddings, cfg.image_tokens
        image_size = cfg.model.vision.image_size
        tokenizer_path, step, seed = source.tokenizer, source.step, cfg.seed
    else:
        config = json.loads((source.path / "config.json").read_text())
        vision = config["vision_config"]
        max_positions = int(config["max_position_embeddings"])
        n_img, image_size = int(vision["image_seq_length"]), int(vision["image_size"])
        tokenizer_path, step, seed = source.path / "tokenizer.model", _export_step(source), 0
    seq_length = _seq_length(a, source, max_positions, n_img)
    tokenizer = Tokenizer(tokenizer_path)
    batches, available = caption_batches(data, tokenizer, seq_length, image_size, n_img,
                                         a.batch_size, a.max_windows, seed)
    hf_model = _hf_model(source, vlm=True)
    c = hf_model.config
    if int(c.image_seq_length) != n_img:
        raise EvaluationError(f"the model places {c.image_seq_length} image positions, the "
                              f"source's config {n_img}")
    result = evaluate_vlm(hf_model, batches)
    return {"source": str(source.path), "kind": source.kind, "model": "vlm", "step": step,
            "data": str(data), "split": "val", "seq_length": seq_length, "image_tokens": n_img,
            "image_size": image_size, "samples_available": available, **result,
            **_routing_fields(c), "batch_size": a.batch_size}


def _routing_line(r: dict) -> str:
    real = r["real_experts_per_token"]
    if real is None:
        return "real experts per token: - (no MoE layers)"
    split = ""
    if r.get("model") == "vlm":
        image, text = (r[f"real_experts_per_{m}_token"] for m in ("image", "text"))
        split = "; image {}, text {}".format(*("-" if v is None else f"{v:.3f}"
                                               for v in (image, text)))
    return (f"real experts per token {real:.3f} (MoE-layer mean{split}; top-{r['router_topk']} "
            f"over {r['num_experts']} real + {r['num_null_experts']} null slots)")


def summary(r: dict) -> str:
    step = f" step {r['step']}" if r.get("step") is not None else ""
    if r.get("model") == "vlm":
        of = (f" (of {r['samples_available']})" if r["samples_available"] is not None
              and r["samples"] != r["samples_available"] else "")
        return "\n".join([
            f"{r['kind']} {r['source']}{step} on {r['data']} (val split)",
            f"caption perplexity {r['perplexity']:.4f}  (mean NLL {r['mean_nll']:.5f} "
            "nats/caption token)",
            f"{r['tokens']} caption tokens in {r['samples']} samples{of} of {r['image_tokens']} "
            f"image + {r['seq_length']} text positions",
            _routing_line(r),
        ])
    windows = f"{r['windows']} windows" + (f" (of {r['windows_available']})"
                                           if r["windows"] != r["windows_available"] else "")
    return "\n".join([
        f"{r['kind']} {r['source']}{step} on {r['data']}",
        f"perplexity {r['perplexity']:.4f}  (mean NLL {r['mean_nll']:.5f} nats/token)",
        f"{r['tokens']} tokens in {windows} of seq-length {r['seq_length']}",
        _routing_line(r),
    ])


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        result = run(a)
    except NullMoEError as err:
        sys.exit(f"evaluate error: {err}")
    if a.json:
        print(json.dumps(result))
    else:
        print(summary(result))
    if not math.isfinite(result["perplexity"]):
        print("warning: the perplexity is not finite", file=sys.stderr)


if __name__ == "__main__":
    main()
