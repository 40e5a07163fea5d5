"""`python -m megatron_nullmoe.inference.captions RUN`: the VLM's captions of validation images.

    python -m megatron_nullmoe.inference.captions runs/demo_vlm [--images 6] [--max-new-tokens 24]

Greedy captions of the first validation images of the run's energon dataset, by the run's
megatron-core model (its newest checkpoint, one CPU process), printed one per line and drawn into
RUN/captions.png: each image with its reference caption, the generated caption and the share of
its router picks that went to null slots (image tokens and text tokens, over the MoE layers),
read from one forward over the image and the generated caption. `make demo` runs it after
training.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from megatron_nullmoe.run.tokenizer import BOS, EOS, PAD


def caption_images(run: Path, count: int, max_new_tokens: int) -> list[dict]:
    """[{image [3,H,W] in [-1,1], reference, caption, null_image, null_text}] for the first
    `count` validation images."""
    from megatron_nullmoe import set_vision_mask
    from megatron_nullmoe.export.source import SourceError, load_megatron, resolve
    from megatron_nullmoe.inference.decode import mcore_generate, prompt_ids
    from megatron_nullmoe.model_utils import routing_stats
    from megatron_nullmoe.run.data.energon import EnergonData
    from megatron_nullmoe.run.tokenizer import Tokenizer

    source = resolve(run)
    cfg = source.cfg
    if cfg.model.kind != "vlm" or cfg.data.kind != "energon":
        raise SourceError(f"{run} is a {cfg.model.kind} run on {cfg.data.kind} data; captions "
                          "need a VLM run on an energon image+caption dataset")
    model = load_megatron(source)
    tokenizer = Tokenizer(source.tokenizer)
    n_img = cfg.image_tokens
    data = EnergonData(cfg.data.path, tokenizer, cfg.data.seq_length, cfg.model.vision.image_size,
                       n_img, count, 0, 1, cfg.seed, 0, cfg.data.shuffle_buffer_size)
    batch = next(iter(data.val_batches(1)), None)
    if batch is None:
        raise SourceError(f"{cfg.data.path} has no validation images")
    results = []
    for image, labels in zip(batch["images"], batch["labels"]):
        ids = prompt_ids(tokenizer, "", image=True)
        room = cfg.model.max_position_embeddings - n_img - len(ids) + 1
        new = mcore_generate(model, ids, min(max_new_tokens, room), cfg.model.max_position_embeddings,
                             image=image, image_tokens=n_img)
        # one forward over image + caption, with the vision mask, for the null shares
        seq = ids + new
        vision = torch.zeros(1, n_img + len(seq) - 1, dtype=torch.bool)
        vision[:, :n_img] = True
        set_vision_mask(model, vision)
        routing_stats(model, reset=True)
        with torch.no_grad():
            model(image.unsqueeze(0), torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), None)
        shares = routing_stats(model, reset=True)["all"].null_fraction_by_modality()
        set_vision_mask(model, None)
        reference = [int(t) for t in labels if int(t) not in (BOS, EOS, PAD)]
        results.append({"image": image, "reference": tokenizer.decode(reference),
                        "caption": tokenizer.decode(new), "null_image": shares.get("vision"),
                        "null_text": shares.get("text")})
    return results


def draw(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(results))
    rows = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, results):
        ax.imshow(((r["image"].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(),
                  interpolation="nearest")
        share = "null share: image {} | text {}".format(*(
            "-" if v is None else f"{v:.2f}" for v in (r["null_image"], r["null_text"])))
        ax.set_title(f"ref: {r['reference']}\nout: {r['caption']}\n{share}", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.inference.captions",
                                description=__doc__.split("\n")[0])
    p.add_argument("run", help="a VLM run folder")
    p.add_argument("--images", type=int, default=6, help="validation images to caption (6)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", help="the picture (default RUN/captions.png)")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_nullmoe.errors import NullMoEError

    if a.images < 1:
        sys.exit("captions error: --images must be 1 or more")
    try:
        results = caption_images(Path(a.run), a.images, a.max_new_tokens)
    except NullMoEError as err:
        sys.exit(f"captions error: {err}")
    for r in results:
        print(f"{r['caption']}    (reference: {r['reference']}; null share image "
              f"{r['null_image'] if r['null_image'] is None else round(r['null_image'], 2)}, text "
              f"{r['null_text'] if r['null_text'] is None else round(r['null_text'], 2)})")
    out = draw(results, Path(a.out) if a.out else Path(a.run) / "captions.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
