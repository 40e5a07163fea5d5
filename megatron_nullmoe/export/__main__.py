"""`python -m megatron_nullmoe.export hf SOURCE --out DIR`: a trained model as a Hugging Face folder.

    python -m megatron_nullmoe.export hf runs/gpt_null_moe --out exports/gpt_null_moe
    python -m megatron_nullmoe.export hf runs/gpt_null_moe/checkpoints/iter_0000200 --out DIR \
        [--format nullmoe|mixtral] [--dtype bfloat16] [--overwrite] [--config RUN/config.yaml]
        [--tokenizer X.model]

SOURCE is a run folder (its newest checkpoint) or a checkpoint folder of this project's trainer,
or a Megatron-LM checkpoint written through launch/megatron_lm/pretrain_gpt_nullmoe.py (its --save
folder: the newest iteration, or one iter_NNNNNNN folder; --tokenizer when the run's tokenizer
model is not a sentencepiece file found at the path it was trained with). The folder loads with
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   (--format mixtral: without)
    AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)          (the run's tokenizer, its ids)
A VLM run exports NullMoEForConditionalGeneration (vision tower, projector, the same decoder) with
a processor: AutoModelForImageTextToText and AutoProcessor, trust_remote_code=True.
and with lm-evaluation-harness as `--model hf --model_args pretrained=DIR,trust_remote_code=True`.
After writing, the export is loaded back and its logits are compared with the megatron-core
model's on a few sequences (fp32); the maximum difference is printed and must stay below 1e-4.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
TOLERANCE = 1e-4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.export",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="format", required=True)
    hf = sub.add_parser("hf", help="a Hugging Face transformers folder (remote code)")
    hf.add_argument("source", help="a run folder or a checkpoint folder (iter_NNNNNNN), or a "
                                   "Megatron-LM --save folder or iter_NNNNNNN folder")
    hf.add_argument("--out", required=True, help="the folder to write (new or empty)")
    hf.add_argument("--format", choices=("nullmoe", "mixtral"), default="nullmoe",
                    help="nullmoe (default): NullMoEForCausalLM, remote code, exact for every mode "
                         "and skips null picks; mixtral: stock MixtralForCausalLM with the null "
                         "slots as zero experts, where that is exact (refused otherwise, with why)")
    hf.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="weights' dtype in model.safetensors (default float32)")
    hf.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    hf.add_argument("--config", help="the run's config.yaml (default: the run folder's)")
    hf.add_argument("--tokenizer", help="the run's sentencepiece .model or tokenizer.json "
                                        "(default: the run folder's)")
    hf.add_argument("--no-check", action="store_true",
                    help="skip loading the export back and comparing logits")
    return p


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
        from megatron_nullmoe.export.vlm import export_vlm, is_llava

        vlm = is_llava(model)
        if vlm and a.format == "mixtral":
            raise hf.ExportError("--format mixtral is for GPT runs: a VLM exports as nullmoe "
                                 "(NullMoEForConditionalGeneration, remote code)")
        write = export_vlm if vlm else (export_mixtral if a.format == "mixtral" else hf.export_gpt)
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
