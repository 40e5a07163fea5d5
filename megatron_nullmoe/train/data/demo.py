"""prepare-demo-data: writes the shapes dataset as an energon dataset, plus its tokenizer.

    python -m megatron_nullmoe.train.data.demo --out data/demo --seed 0

Layout (what `energon prepare` would produce for webdataset shards of image + caption):
    data/demo/train/shard-000000.tar ...   {key}.png + {key}.txt per sample
    data/demo/val/shard-000000.tar ...
    data/demo/.nv-meta/{dataset.yaml,split.yaml,.info.json,index.sqlite,index.uuid}
    data/demo/tokenizer.model               sentencepiece, trained on the train captions
    data/demo/text/{train,val}.jsonl        the captions alone, for the text-only GPT recipe
    data/demo/text/{train,val}_text_document.{bin,idx}   the same in Megatron's indexed format
    data/demo/demo.json                     the parameters it was made with

Deterministic from the seed (tar members have fixed metadata). The dataset is built in a sibling
temporary folder and renamed into place at the end, so an interrupted run never leaves a half
dataset behind; an existing dataset made with the same parameters is reused.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
from pathlib import Path

import yaml

from megatron_nullmoe.run.data.indexed import jsonl_to_indexed
from megatron_nullmoe.run.tokenizer import Tokenizer, train_tokenizer
from megatron_nullmoe.train.data import shapes

SPLITS = ("train", "val")


def _write_shard(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, png, caption in samples:
            for ext, data in (("png", png), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def prepare_demo_data(out: str | Path, seed: int = 0, train_samples: int = 4096,
                      val_samples: int = 256, image_size: int = 48,
                      samples_per_shard: int = 512, scenes: str = "single") -> Path:
    """Writes (or reuses) the demo dataset at `out`; returns its path."""
    from megatron.energon import BaseWebdatasetFactory

    out = Path(out)
    for name, value, low in (("train_samples", train_samples, 1), ("val_samples", val_samples, 1),
                             ("samples_per_shard", samples_per_shard, 1),
                             ("image_size", image_size, 8)):
        if value < low:
            raise ValueError(f"{name}={value} is not valid: expected >= {low}")
    if scenes not in shapes.SCENES:
        raise ValueError(f"scenes={scenes!r} is not valid: expected one of {', '.join(shapes.SCENES)}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; --out must be a folder")
    params = dict(seed=seed, train_samples=train_samples, val_samples=val_samples,
                  image_size=image_size, samples_per_shard=samples_per_shard, version=3)
    if scenes != "single":  # the demo's stamp stays as it was: its datasets are reused
        params["scenes"] = scenes
    stamp = out / "demo.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return out
    if stamp.is_file():  # our own demo set, from other parameters or an older version: remake it
        print(f"{out} holds a demo dataset made with other parameters or an older version; "
              "rebuilding it", flush=True)
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a demo dataset (no demo.json); remove it "
                              "or choose another --out")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shards, counts, captions = [], {}, {"train": [], "val": []}
    offset = {"train": 0, "val": train_samples}  # val samples are distinct scenes
    for split, n in (("train", train_samples), ("val", val_samples)):
        (tmp / split).mkdir(parents=True)
        for start in range(0, n, samples_per_shard):
            rows = []
            for i in range(start, min(n, start + samples_per_shard)):
                png, caption = shapes.sample(seed, offset[split] + i, image_size, scenes)
                rows.append((f"{split}_{i:07d}", png, caption))
                captions[split].append(caption)
            name = f"{split}/shard-{start // samples_per_shard:06d}.tar"
            _write_shard(tmp / name, rows)
            shards.append(name)
            counts[name] = len(rows)
    BaseWebdatasetFactory.prepare_dataset(
        tmp, shards, split_parts_patterns=[(s, f"{s}/.*") for s in SPLITS], workers=1)
    (tmp / ".nv-meta" / "dataset.yaml").write_text(yaml.safe_dump({
        "sample_type": {"__module__": "megatron.energon", "__class__": "CaptioningSample"},
        "field_map": {"image": "png", "caption": "txt"},
    }, sort_keys=False))
    indexed = json.loads((tmp / ".nv-meta" / ".info.json").read_text())["shard_counts"]
    if indexed != counts:
        raise RuntimeError(f"energon indexed {indexed}, but {counts} samples were written")
    train_tokenizer(captions["train"] + shapes.vocabulary_text(scenes), tmp / "tokenizer.model")
    (tmp / "text").mkdir()
    tokenizer = Tokenizer(tmp / "tokenizer.model")
    for split in SPLITS:
        jsonl = tmp / "text" / f"{split}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": c}) + "\n" for c in captions[split]))
        jsonl_to_indexed(jsonl, tmp / "text" / f"{split}_text_document", tokenizer)
    (tmp / "demo.json").write_text(json.dumps(params, indent=2) + "\n")
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="nullmoe-prepare-demo-data", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-samples", type=int, default=4096)
    p.add_argument("--val-samples", type=int, default=256)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--samples-per-shard", type=int, default=512)
    p.add_argument("--scenes", choices=shapes.SCENES, default="single",
                   help="single: the demo's one-kind scenes; grid: up to three objects in a 3x3 "
                        "grid with reading-order captions (the compute study's data)")
    a = p.parse_args(argv)
    try:
        path = prepare_demo_data(a.out, a.seed, a.train_samples, a.val_samples, a.image_size,
                                 a.samples_per_shard, a.scenes)
    except (ValueError, FileExistsError) as err:
        p.error(str(err))
    print(f"demo dataset ready at {path}")


if __name__ == "__main__":
    main()
