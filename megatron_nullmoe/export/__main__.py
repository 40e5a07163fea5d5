"""`python -m megatron_nullmoe.export hf SOURCE --out DIR`: a trained model as a Hugging Face folder.

    python -m megatron_nullmoe.export hf runs/gpt_null_moe --out exports/gpt_null_moe
    python -m megatron_nullmoe.export hf runs/gpt_null_moe/checkpoints/iter_0000200 --out DIR \
        [--format nullmoe|mixtral|qwen3_moe|olmoe] [--dtype bfloat16] [--overwrite]
        [--config RUN/config.yaml]
        [--tokenizer X.model]

SOURCE is a run folder (its newest checkpoint) or a checkpoint folder of this project's trainer,
or a Megatron-LM checkpoint written through launch/megatron_lm/pretrain_gpt_nullmoe.py (its --save
folder: the newest iteration, or one iter_NNNNNNN folder; --tokenizer when the run's tokenizer
model is not a sentencepiece file found at the path it was trained with). The folder loads with
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   (stock formats: without)
    AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)          (the run's tokenizer, its ids)
A VLM run exports NullMoEForConditionalGeneration (vision tower, projector, the same decoder) with
a processor: AutoModelForImageTextToText and AutoProcessor, trust_remote_code=True.
and with lm-evaluation-harness as `--model hf --model_args pretrained=DIR,trust_remote_code=True`.
--format defaults to nullmoe, except for a run started from a Hugging Face folder
(checkpoint.init_from) without null slots: that exports in its source's own family (mixtral,
qwen3_moe or olmoe), as long as the folder is still there to say which.
After writing, the export is loaded back and its logits are compared with the megatron-core
model's on a few sequences (fp32); the maximum difference is printed and must stay below 1e-4.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("nullmoe", "mixtral", "qwen3_moe", "olmoe")
TOLERANCE = 1e-4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.export",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="format", required=True)
    hf = sub.add_parser("hf", help="a Hugging Face transformers folder (remote code)")
    hf.add_argument("source", help="a run folder or a checkpoint folder (iter_NNNNNNN), or a "
                                   "Megatron-LM --save folder or iter_NNNNNNN folder")
    hf.add_argument("--out", required=True, help="the folder to write (new or empty)")
    hf.add_argument("--format", choices=FORMATS, default=None,
                    help="nullmoe: NullMoEForCausalLM, remote code, exact for every mode and skips "
                         "null picks; mixtral, qwen3_moe, olmoe: stock MixtralForCausalLM, "
                         "Qwen3MoeForCausalLM or OlmoeForCausalLM with the null slots as zero "
                         "experts, where that is exact (refused otherwise, with why). Default: "
                         "nullmoe, or the source family of a run imported from a Hugging Face "
                         "folder without null slots")
    hf.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="weights' dtype in model.safetensors (default float32)")
    hf.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    hf.add_argument("--config", help="the run's config.yaml (default: the run folder's)")
    hf.add_argument("--tokenizer", help="the run's sentencepiece .model or tokenizer.json "
                                        "(default: the run folder's)")
    hf.add_argument("--no-check", action="store_true",
                    help="skip loading the export back and comparing logits")
    return p


def default_format(cfg) -> tuple[str, str]:
    """(--format, why) when none is given: the source family of a run imported from a Hugging
    Face folder (checkpoint.init_from) without null slots, else nullmoe."""
    from megatron_nullmoe.errors import NullMoEError
    from megatron_nullmoe.run.hf_folder import family_of, is_hf_folder

    source = cfg.checkpoint.init_from if cfg is not None else None
    if not source or cfg.model.kind != "gpt":
        return "nullmoe", "the default"
    try:
        if not is_hf_folder(source):
            return "nullmoe", "the default"
        family = family_of(Path(source)).name
    except (NullMoEError, OSError):
        return "nullmoe", f"the default ({source} no longer says its family)"
    if cfg.model.null_experts.num_null_experts:
        return "nullmoe", f"imported from {source} ({family}) but with null slots"
    return family, f"the family of {source}, which the run was imported from"


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from megatron_nullmoe.export import hf
    from megatron_nullmoe.errors import NullMoEError
    from megatron_nullmoe.export.source import SourceError, load_megatron, resolve

    try:
        source = resolve(a.source, a.config, a.tokenizer, megatron_lm=True)
        if source.kind == "export":
            raise SourceError(f"{a.source} is an export already; give a run or checkpoint folder")
        model = load_megatron(source)
        run = source.cfg.name if source.cfg is not None else source.path.parent.name
        provenance = {"source": str(source.path.resolve()), "step": source.step, "run": run}
        from megatron_nullmoe.export.mixtral import export_mixtral
        from megatron_nullmoe.export.olmoe import export_olmoe
        from megatron_nullmoe.export.qwen3_moe import export_qwen3_moe
        from megatron_nullmoe.export.vlm import export_vlm, is_llava

        vlm = is_llava(model)
        fmt, why = (a.format, "asked") if a.format else default_format(source.cfg)
        print(f"format: {fmt} ({why})")
        if vlm and fmt != "nullmoe":
            raise hf.ExportError(f"--format {fmt} is for GPT runs: a VLM exports as nullmoe "
                                 "(NullMoEForConditionalGeneration, remote code)")
        writers = {"nullmoe": hf.export_gpt, "mixtral": export_mixtral,
                   "qwen3_moe": export_qwen3_moe, "olmoe": export_olmoe}
        write = export_vlm if vlm else writers[fmt]
        out = write(model, source.tokenizer, Path(a.out), provenance, getattr(torch, a.dtype),
                    a.overwrite)
    except NullMoEError as err:
        sys.exit(f"export error: {err}")
    print(f"wrote {out} (step {source.step} of {source.path})")
    if a.no_check:
        return
    from megatron_nullmoe.export.check import max_logit_difference, max_logit_difference_vlm

    diff = (max_logit_difference_vlm if vlm else max_logit_difference)(model, out)
    limit = TOLERANCE if a.dtype == "float32" else 5e-2
    print(f"check: max |logits(export) - logits(megatron-core)| = {diff:.2e} (limit {limit:g})")
    if not diff <= limit:
        sys.exit(f"export error: the export's logits differ from the megatron-core model's by "
                 f"{diff:.3g} > {limit:g}; {out} is kept for inspection")


if __name__ == "__main__":
    main()
