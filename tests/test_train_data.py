"""Training data: the shapes generator, the demo dataset on disk, the tokenizer, and the energon
(image + caption) and jsonl (text) batch sources, including their data position and errors.

One small demo dataset (64 train + 16 val samples, 32 per shard) is written once per module;
tests that break a dataset work on a copy of it.
"""

import inspect
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_nullmoe.run.data import DataSource
from megatron_nullmoe.run.data.energon import DataError, EnergonData, to_model_inputs
from megatron_nullmoe.run.data.text import JsonlData, read_windows
from megatron_nullmoe.run.tokenizer import (
    BOS,
    EOS,
    IMAGE_TOKEN,
    PAD,
    Tokenizer,
    TokenizerError,
)
from megatron_nullmoe.train.data import shapes
from megatron_nullmoe.train.data.demo import prepare_demo_data

DEMO = dict(train_samples=64, val_samples=16, samples_per_shard=32)
SEED, SIDE, L, IMAGE_TOKENS, MBS = 0, 48, 12, 36, 4
SHARDS = {"train/shard-000000.tar": 32, "train/shard-000001.tar": 32, "val/shard-000000.tar": 16}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return prepare_demo_data(tmp_path_factory.mktemp("demo") / "data", seed=SEED, **DEMO)


@pytest.fixture(scope="module")
def tok(demo) -> Tokenizer:
    return Tokenizer(demo / "tokenizer.model")


def _energon(path, tok, dp_rank=0, dp_size=1) -> EnergonData:
    return EnergonData(str(path), tok, L, SIDE, IMAGE_TOKENS, MBS, dp_rank, dp_size, seed=1234)


def _copy(demo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo, tmp_path / "copy"))


def _tar_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*.tar"))}


def _index(key: str) -> int:
    """Scene index of a sample key: val samples follow the train ones (see demo.py)."""
    split, i = key.rsplit("/", 1)[-1].split("_")
    return int(i) + (DEMO["train_samples"] if split == "val" else 0)


# ----------------------------------------------------------------------------- shapes
def test_scene_and_sample_are_functions_of_seed_and_index():
    assert [shapes.scene(3, i) for i in range(50)] == [shapes.scene(3, i) for i in range(50)]
    assert [shapes.scene(3, i) for i in range(50)] != [shapes.scene(4, i) for i in range(50)]
    assert shapes.sample(3, 7, SIDE) == shapes.sample(3, 7, SIDE)
    assert all(shapes.sample(3, i, SIDE)[0] != shapes.sample(4, i, SIDE)[0] for i in range(10))


def test_caption_names_every_attribute():
    scenes = [shapes.scene(7, i) for i in range(300)]
    assert {s.count for s in scenes} == {1, 2, 3}  # the plural case is exercised
    for s in scenes:
        words = s.caption.split()
        assert words[0] == shapes.COUNTS[s.count - 1]
        assert words[1] == s.size and words[2] == s.colour
        assert words[3] == (s.shape if s.count == 1 else s.shape + "s")
        assert s.caption.endswith(f" in the {s.region}")


@pytest.mark.parametrize("side", [32, 48])
def test_render_draws_the_scene_colour_inside_its_region(side):
    seen_regions, area = set(), {"small": [], "large": []}
    for i in range(150):
        s = shapes.scene(5, i)
        pixels = np.asarray(shapes.render(s, side, 5, i))
        coloured = (pixels != 255).any(-1)
        assert coloured.any()
        assert {tuple(p) for p in pixels[coloured]} == {shapes.COLOURS[s.colour]}
        ys, xs = np.nonzero(coloured)
        half, margin = side / 2, 1
        if "left" in s.region:
            assert xs.max() < half + margin
        if "right" in s.region:
            assert xs.min() >= half - margin
        if "top" in s.region:
            assert ys.max() < half + margin
        if "bottom" in s.region:
            assert ys.min() >= half - margin
        if s.region == "centre":
            assert min(xs.min(), ys.min()) >= side / 4 - margin
            assert max(xs.max(), ys.max()) < 3 * side / 4 + margin
        seen_regions.add(s.region)
        if s.count == 1:
            area[s.size].append(coloured.sum())
    assert seen_regions == set(shapes.REGIONS)
    assert max(area["small"]) < min(area["large"])  # "small" and "large" are visibly so


def test_sample_png_is_the_rendered_scene():
    png, caption = shapes.sample(2, 11, SIDE)
    s = shapes.scene(2, 11)
    assert caption == s.caption
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert np.array_equal(decoded, np.asarray(shapes.render(s, SIDE, 2, 11)))


def test_grid_scenes_caption_each_object_in_reading_order():
    seen = set()
    for i in range(300):
        objects = shapes.grid_scene(9, i)
        assert objects == shapes.grid_scene(9, i) and 1 <= len(objects) <= 3
        cells = [o.cell for o in objects]
        assert cells == sorted(set(cells))  # distinct cells, in reading order
        caption = shapes.grid_caption(objects)
        assert caption.split(" and ") == [
            f"a {o.size} {o.colour} {o.shape} at {shapes.CELLS[o.cell]}" for o in objects]
        assert len(caption.split()) <= 23
        seen.update((o.colour, o.shape, o.size) for o in objects)
        seen.add(len(objects))
    assert {1, 2, 3} <= seen and len(seen) == 3 + 6 * 3 * 2  # every attribute combination


@pytest.mark.parametrize("side", [32, 48])
def test_grid_render_puts_each_object_in_its_cell(side):
    for i in range(100):
        objects = shapes.grid_scene(4, i)
        pixels = np.asarray(shapes.render_grid(objects, side))
        cell = side / 3
        for o in objects:
            row, col = divmod(o.cell, 3)
            box = pixels[int(row * cell) + 1:int((row + 1) * cell) - 1,
                         int(col * cell) + 1:int((col + 1) * cell) - 1]
            assert (box == shapes.COLOURS[o.colour]).all(-1).any(), (i, o)
        coloured = (pixels != 255).any(-1)
        empty = [c for c in range(9) if c not in {o.cell for o in objects}]
        for c in empty:
            row, col = divmod(c, 3)
            assert not coloured[int(row * cell) + 1:int((row + 1) * cell) - 1,
                                int(col * cell) + 1:int((col + 1) * cell) - 1].any()
    png, caption = shapes.sample(4, 0, side, "grid")
    assert caption == shapes.grid_caption(shapes.grid_scene(4, 0))
    with pytest.raises(ValueError, match="scenes='maze' is not valid: expected one of single, grid"):
        shapes.sample(4, 0, side, "maze")


# ----------------------------------------------------------------------------- demo dataset
def test_demo_dataset_is_deterministic_from_the_seed(demo, tmp_path):
    (tmp_path / "again").mkdir()  # an empty folder is fine to write into
    again = prepare_demo_data(tmp_path / "again", seed=SEED, **DEMO)
    other = prepare_demo_data(tmp_path / "other", seed=SEED + 1, **DEMO)
    ours = _tar_bytes(demo)
    assert sorted(ours) == sorted(SHARDS)
    assert _tar_bytes(again) == ours
    theirs = _tar_bytes(other)
    assert sorted(theirs) == sorted(ours)
    assert all(theirs[name] != ours[name] for name in ours)
    assert not list(tmp_path.glob("*.partial"))


def test_demo_dataset_is_reused_when_parameters_match(demo):
    stamp = demo / "demo.json"
    before = (stamp.stat().st_mtime_ns, (demo / "train" / "shard-000000.tar").stat().st_mtime_ns)
    assert prepare_demo_data(demo, seed=SEED, **DEMO) == demo
    after = (stamp.stat().st_mtime_ns, (demo / "train" / "shard-000000.tar").stat().st_mtime_ns)
    assert after == before
    assert json.loads(stamp.read_text())["seed"] == SEED


def test_demo_dataset_refuses_a_folder_with_other_content(demo, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy"):
        prepare_demo_data(busy, seed=SEED, **DEMO)
    assert (busy / "notes.txt").read_text() == "mine"  # nothing of ours was touched
    old = tmp_path / "old"  # our own demo set, made with other parameters: it is remade
    shutil.copytree(demo, old)
    prepare_demo_data(old, seed=SEED + 1, **DEMO)
    assert json.loads((old / "demo.json").read_text())["seed"] == SEED + 1
    assert not list(tmp_path.glob("*.partial"))
    for bad in (dict(DEMO, train_samples=0), dict(DEMO, samples_per_shard=0)):
        with pytest.raises(ValueError, match="expected >= 1"):
            prepare_demo_data(tmp_path / "bad", seed=SEED, **bad)
    assert not list(tmp_path.glob("*.partial")) and not list(demo.parent.glob("*.partial"))


def test_demo_dataset_index_matches_the_shards(demo):
    info = json.loads((demo / ".nv-meta" / ".info.json").read_text())
    assert info["shard_counts"] == SHARDS
    for name, count in SHARDS.items():
        with tarfile.open(demo / name) as tar:
            members = tar.getnames()
        assert sorted(Counter(m.rsplit(".", 1)[1] for m in members).items()) == [
            ("png", count), ("txt", count)]
    for split, n in (("train", 64), ("val", 16)):
        lines = (demo / "text" / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        first = _index(f"{split}_0000000")
        assert json.loads(lines[0])["text"] == shapes.scene(SEED, first).caption


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_captions(tok):
    assert tok.sp.pad_id() == PAD and tok.sp.bos_id() == BOS and tok.sp.eos_id() == EOS
    captions = [shapes.scene(SEED + 9, i).caption for i in range(20)]  # unseen scenes too
    for caption in captions:
        ids = tok.encode(caption)
        assert ids and min(ids) > EOS  # no special ids inside a caption
        assert tok.decode(ids) == caption


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist") as err:
        Tokenizer(tmp_path / "nope.model")
    assert str(tmp_path / "nope.model") in str(err.value)


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b""])
def test_tokenizer_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError) as err:
        Tokenizer(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- energon
def test_energon_batch_layout(demo, tok):
    b = _energon(demo, tok).next_train()
    assert b["images"].shape == (MBS, 3, SIDE, SIDE)
    assert b["images"].min() >= -1 and b["images"].max() <= 1
    assert b["images"].max() == 1  # white background
    assert b["input_ids"].shape == b["labels"].shape == (MBS, L + 1)
    assert (b["input_ids"][:, 0] == IMAGE_TOKEN).all()
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    assert torch.equal(b["loss_mask"], (b["labels"] != PAD).float())
    assert (b["labels"] == PAD).any()  # captions are shorter than L: padding is exercised
    assert b["vision_BS"].shape == b["pad_BS"].shape == (MBS, IMAGE_TOKENS + L)
    assert b["vision_BS"][:, :IMAGE_TOKENS].all() and not b["vision_BS"][:, IMAGE_TOKENS:].any()
    assert not b["pad_BS"][:, :IMAGE_TOKENS].any()
    assert torch.equal(b["pad_BS"][:, IMAGE_TOKENS:], b["input_ids"][:, 1:] == PAD)


def test_energon_batch_holds_each_sample_caption_and_image(demo, tok):
    raw = next(iter(_energon(demo, tok).train))
    b = to_model_inputs(raw, IMAGE_TOKENS)
    assert torch.equal(b["labels"], _energon(demo, tok).next_train()["labels"])  # same path
    for row, key in enumerate(raw.__key__):
        s = shapes.scene(SEED, _index(key))
        labels = b["labels"][row].tolist()
        assert labels[0] == BOS and EOS in labels
        assert all(t == PAD for t in labels[labels.index(EOS) + 1:])
        assert tok.decode(labels) == s.caption
        pixels = ((b["images"][row] + 1) / 2 * 255).round().permute(1, 2, 0)
        coloured = (pixels != 255).any(-1)
        colour = torch.tensor(shapes.COLOURS[s.colour], dtype=pixels.dtype)
        assert coloured.any() and (pixels[coloured] == colour).all()


def _keys(data: EnergonData, batches: int) -> list[str]:
    it = iter(data.train)
    return [k for _ in range(batches) for k in next(it).__key__]


def test_energon_data_parallel_ranks_read_disjoint_samples(demo, tok):
    # Each rank reads its own part of the shards. (Within a rank a sample can repeat early: the
    # shuffle buffer, 64, is larger than a rank's 32 samples and the train set loops.)
    batches = 2 * DEMO["train_samples"] // 2 // MBS
    k0 = set(_keys(_energon(demo, tok, 0, 2), batches))
    k1 = set(_keys(_energon(demo, tok, 1, 2), batches))
    assert not k0 & k1
    assert min(len(k0), len(k1)) > 2 * MBS
    alone = set(_keys(_energon(demo, tok, 0, 1), batches))  # one rank reads both parts
    assert alone & k0 and alone & k1


def test_energon_restore_continues_identically(demo, tok):
    first = _energon(demo, tok)
    for _ in range(3):
        first.next_train()
    state = first.state()
    expected = [first.next_train() for _ in range(2)]
    resumed = _energon(demo, tok)
    resumed.restore(state)
    got = [resumed.next_train() for _ in range(2)]
    fresh = _energon(demo, tok)
    skipped = [fresh.next_train() for _ in range(3)]
    for a, b in zip(expected, got):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["images"], b["images"])
    assert not torch.equal(skipped[0]["images"], got[0]["images"])  # it did move on
    with pytest.raises(RuntimeError, match="before the first batch"):
        resumed.restore(state)


def test_energon_val_batches_are_finite_and_limited(demo, tok):
    data = _energon(demo, tok)
    everything = list(data.val_batches(1000))
    assert len(everything) == DEMO["val_samples"] // MBS
    assert len(list(data.val_batches(1000))) == len(everything)  # a full pass restarts
    assert all(b["images"].shape[0] == MBS for b in everything)
    assert len(list(_energon(demo, tok).val_batches(2))) == 2


def test_energon_val_batches_are_the_same_on_every_call(demo, tok):
    data = _energon(demo, tok)
    calls = [list(data.val_batches(2)) for _ in range(3)]
    assert [len(c) for c in calls] == [2, 2, 2]
    for call in calls[1:]:
        assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(calls[0], call))


def test_energon_missing_dataset(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist") as err:
        _energon(tmp_path / "nowhere", tok)
    assert str(tmp_path / "nowhere") in str(err.value)


def test_energon_missing_dataset_yaml(demo, tmp_path, tok):
    copy = _copy(demo, tmp_path)
    (copy / ".nv-meta" / "dataset.yaml").unlink()
    with pytest.raises(DataError, match="dataset.yaml is missing"):
        _energon(copy, tok)


def test_energon_missing_shard(demo, tmp_path, tok):
    copy = _copy(demo, tmp_path)
    (copy / "train" / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match="is missing") as err:
        _energon(copy, tok)
    assert "train/shard-000001.tar" in str(err.value)


def test_energon_shard_that_is_not_a_tar(demo, tmp_path, tok):
    copy = _copy(demo, tmp_path)
    shard = copy / "val" / "shard-000000.tar"
    shard.write_bytes(b"not a tar " * (shard.stat().st_size // 10))
    with pytest.raises(DataError, match="not a readable tar") as err:
        _energon(copy, tok)
    assert "val/shard-000000.tar" in str(err.value)


@pytest.mark.parametrize("split", ["train", "val"])
def test_energon_truncated_shard(demo, tmp_path, tok, split):
    copy = _copy(demo, tmp_path)
    shard = copy / split / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        data = _energon(copy, tok)
        if split == "train":  # a few epochs: every shard is read
            for _ in range(3 * DEMO["train_samples"] // MBS):
                data.next_train()
        else:
            list(data.val_batches(1000))
    assert f"{split}/shard-000000.tar" in str(err.value)


# ----------------------------------------------------------------------------- jsonl
def _jsonl(demo: Path, tok: Tokenizer, seq=8, mbs=2, rank=0, size=1, seed=1, valid=True):
    text = demo / "text"
    return JsonlData(str(text / "train.jsonl"), str(text / "val.jsonl") if valid else None, tok,
                     seq, mbs, rank, size, seed)


def _rows(batch) -> list[tuple]:
    """The windows a batch was cut from: inputs plus the last label."""
    tokens = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    return [tuple(r) for r in tokens.tolist()]


def test_jsonl_windows_pack_the_documents(demo, tok):
    lines = (demo / "text" / "train.jsonl").read_text().splitlines()
    captions = [json.loads(x)["text"] for x in lines]
    stream = [t for c in captions for t in [BOS] + tok.encode(c) + [EOS]]
    windows = read_windows(demo / "text" / "train.jsonl", tok, 8)
    assert windows.shape == (len(stream) // 9, 9)
    assert windows.flatten().tolist() == stream[: windows.numel()]


def test_jsonl_batches(demo, tok):
    data = _jsonl(demo, tok)
    windows = Counter(tuple(r) for r in data.train_windows.tolist())
    b = data.next_train()
    assert b["input_ids"].shape == b["labels"].shape == b["loss_mask"].shape == (2, 8)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    assert b["loss_mask"].all() and not b["vision_BS"].any() and not b["pad_BS"].any()
    assert all(windows[r] for r in _rows(b))
    again = _jsonl(demo, tok)
    other_seed = _jsonl(demo, tok, seed=2)
    ours = [_rows(data.next_train()) for _ in range(4)]
    assert [_rows(again.next_train()) for _ in range(5)][1:] == ours
    assert [_rows(other_seed.next_train()) for _ in range(5)][1:] != ours


def test_jsonl_ranks_share_out_each_epoch(demo, tok):
    r0, r1 = _jsonl(demo, tok, rank=0, size=2), _jsonl(demo, tok, rank=1, size=2)
    per_epoch = len(r0.train_windows) // (2 * 2)
    rows = Counter()
    first = []
    for _ in range(per_epoch):
        a, b = _rows(r0.next_train()), _rows(r1.next_train())
        first = first or [a, b]
        rows.update(a + b)
    assert first[0] != first[1]
    windows = Counter(tuple(r) for r in r0.train_windows.tolist())
    assert sum(rows.values()) == per_epoch * 4
    assert all(rows[r] <= windows[r] for r in rows)  # no window read twice in an epoch


def test_jsonl_restore_continues_identically(demo, tok):
    data = _jsonl(demo, tok, mbs=16)  # a few batches per epoch: the epoch boundary is crossed
    per_epoch = len(data.train_windows) // 16
    for _ in range(per_epoch - 1):
        data.next_train()
    state = data.state()
    expected = [_rows(data.next_train()) for _ in range(3)]
    resumed = _jsonl(demo, tok, mbs=16)
    resumed.restore(state)
    assert [_rows(resumed.next_train()) for _ in range(3)] == expected


def test_jsonl_val_batches(demo, tok):
    data = _jsonl(demo, tok)
    first = [_rows(b) for b in data.val_batches(3)]
    assert len(first) == 3
    assert [_rows(b) for b in data.val_batches(3)] == first
    everything = list(data.val_batches(10_000))
    assert len(everything) == len(data.val_windows) // 2
    assert list(_jsonl(demo, tok, valid=False).val_batches(5)) == []
    r0, r1 = _jsonl(demo, tok, rank=0, size=2), _jsonl(demo, tok, rank=1, size=2)
    assert [_rows(b) for b in r0.val_batches(1)] != [_rows(b) for b in r1.val_batches(1)]


def test_jsonl_line_without_text(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one red circle in the centre"}\n{"txt": "two"}\n')
    with pytest.raises(DataError, match=r'"text" field') as err:
        read_windows(path, tok, 4)
    assert f"{path}:2" in str(err.value)


@pytest.mark.parametrize("line", ['{"text": 5}', '{"text": null}'])
def test_jsonl_text_that_is_not_a_string(tmp_path, tok, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one red circle in the centre"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        read_windows(path, tok, 4)
    assert f"{path}:2" in str(err.value)


def test_jsonl_missing_file(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist") as err:
        read_windows(tmp_path / "none.jsonl", tok, 8)
    assert str(tmp_path / "none.jsonl") in str(err.value)


def test_jsonl_too_few_tokens(tmp_path, tok):
    path = tmp_path / "short.jsonl"
    path.write_text('{"text": "one red circle"}\n')
    with pytest.raises(DataError, match="fewer than one sequence"):
        read_windows(path, tok, 64)
    with pytest.raises(DataError, match="fewer than one global micro-batch"):
        JsonlData(str(path), None, tok, 2, 4, 0, 2, 1)


def test_every_loader_has_the_data_source_methods():
    """The trainer and the checkpointer call these four, by these parameter names, on any loader."""
    from megatron_nullmoe.run.data.indexed import IndexedData

    for cls in (EnergonData, JsonlData, IndexedData):
        for name in ("next_train", "val_batches", "state", "restore"):
            want = list(inspect.signature(getattr(DataSource, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls, name)


def test_every_data_kind_has_a_builder_that_refuses_the_wrong_model_kind():
    """One registry (run/data/kinds.py DATA_KINDS) for the recipe's data.kind choices; a builder
    refuses a model its samples cannot feed before it reads any data."""
    import dataclasses

    from megatron_nullmoe.run.config import ConfigError, Data, load_config
    from megatron_nullmoe.run.data.kinds import DATA_KINDS, build_data

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(Data)}
    assert set(choices["kind"]) == set(DATA_KINDS)
    refused = {
        ("energon", "gpt"): "data.kind=energon holds image+caption samples: use model.kind=vlm "
                            "(or data.kind=jsonl for a GPT)",
        ("jsonl", "vlm"): "data.kind=jsonl is text only: use model.kind=gpt",
        ("indexed", "vlm"): "data.kind=indexed is text only: use model.kind=gpt",
    }
    for (data, model), message in refused.items():
        cfg = load_config(overrides=[f"data.kind={data}", f"model.kind={model}"])
        with pytest.raises(ConfigError) as err:
            build_data(cfg, tokenizer=None, dp_rank=0, dp_size=1)
        assert str(err.value) == message
    cfg = load_config(overrides=["data.kind=jsonl"])
    cfg.data.kind = "parquet"  # past the loader's own check, as a registry entry left out would be
    with pytest.raises(ConfigError) as err:
        build_data(cfg, tokenizer=None, dp_rank=0, dp_size=1)
    assert str(err.value) == "data.kind='parquet' is not valid: one of energon, jsonl, indexed"
