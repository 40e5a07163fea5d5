"""Image + caption batches for the VLM, read by megatron-energon's own loader.

A sample becomes LLaVA's input: `input_ids = [IMAGE] + text[:L]`, `labels = text[:L+1]`, where
`text = <s> caption </s> <pad>...`. LLaVAModel replaces the IMAGE id by the image's patch
embeddings, so the decoder sees `image_tokens + L` positions; `vision_BS` marks the image ones
(for the per-modality null rate) and `pad_BS` the padding (left out of routing statistics).

The train loader is energon's savable loader: its per-rank state goes into every checkpoint, so a
resumed run reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

import torch
from megatron.energon import (
    Batch,
    CaptioningSample,
    DefaultTaskEncoder,
    Sample,
    WorkerConfig,
    get_loader,
    get_savable_loader,
    get_train_dataset,
    get_val_dataset,
    reraise_exception,
    stateless,
)
from megatron.energon.edataclass import edataclass

from megatron_nullmoe.run.data import DataError
from megatron_nullmoe.run.tokenizer import BOS, EOS, IMAGE_TOKEN, PAD, Tokenizer


@edataclass
class VLMSample(Sample):
    image: torch.Tensor
    text: torch.Tensor


@edataclass
class VLMBatch(Batch):
    image: torch.Tensor
    text: torch.Tensor


class CaptionEncoder(DefaultTaskEncoder[CaptioningSample, VLMSample, VLMBatch, VLMBatch]):
    """Caption -> fixed-length token row; image -> [-1, 1] pixels of the expected size."""

    def __init__(self, tokenizer: Tokenizer, seq_length: int, image_size: int):
        super().__init__()
        self.tokenizer, self.seq_length, self.image_size = tokenizer, seq_length, image_size

    @stateless
    def encode_sample(self, sample: CaptioningSample) -> VLMSample:
        image = sample.image
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise DataError(f"sample {sample.__key__}: image is {tuple(image.shape[-2:])}, the "
                            f"model expects {self.image_size}x{self.image_size} "
                            "(model.vision.image_size)")
        ids = [BOS] + self.tokenizer.encode(sample.caption) + [EOS]
        ids = (ids + [PAD] * (self.seq_length + 1))[: self.seq_length + 1]
        return VLMSample.derive_from(sample, image=image * 2 - 1,
                                     text=torch.tensor(ids, dtype=torch.long))

    @stateless
    def batch(self, samples: list[VLMSample]) -> VLMBatch:
        return VLMBatch.from_samples(samples, image=torch.stack([s.image for s in samples]),
                                     text=torch.stack([s.text for s in samples]))


def to_model_inputs(batch: VLMBatch, image_tokens: int) -> dict[str, torch.Tensor]:
    text = batch.text
    B, L = text.shape[0], text.shape[1] - 1
    input_ids = torch.cat([torch.full((B, 1), IMAGE_TOKEN, dtype=text.dtype), text[:, :L]], dim=1)
    labels = text
    vision = torch.zeros(B, image_tokens + L, dtype=torch.bool)
    vision[:, :image_tokens] = True
    pad = torch.cat([torch.zeros(B, image_tokens, dtype=torch.bool), text[:, :L] == PAD], dim=1)
    return {
        "images": batch.image, "input_ids": input_ids, "labels": labels,
        "loss_mask": (labels != PAD).float(), "position_ids": torch.arange(L + 1).expand(B, L + 1),
        "vision_BS": vision, "pad_BS": pad,
    }


def check_dataset(path: str | Path) -> None:
    """Fails early, naming the file, on a missing dataset, index or shard."""
    root = Path(path)
    info = root / ".nv-meta" / ".info.json"
    if root.is_file():
        raise DataError(f"dataset {str(root)!r} is a file; data.path must be the dataset's folder "
                        "(the one holding .nv-meta/)")
    if not root.is_dir():
        raise DataError(f"dataset {str(root)!r} does not exist (run `make demo-data` or "
                        "`python -m megatron_nullmoe.train.data.demo --out DIR`)")
    for meta in (info, root / ".nv-meta" / "dataset.yaml", root / ".nv-meta" / "split.yaml"):
        if not meta.is_file():
            raise DataError(f"dataset {str(root)!r} is not an energon dataset: {meta} is missing "
                            "(prepare it with `energon prepare`)")
    for shard, count in json.loads(info.read_text())["shard_counts"].items():
        shard_path = root / shard
        if not shard_path.is_file():
            raise DataError(f"shard {shard_path} listed in {info} is missing")
        try:
            with tarfile.open(shard_path) as tar:
                tar.next()
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"shard {shard_path} is not a readable tar file: {err}") from None


class EnergonData:
    """Train and validation batches of one data-parallel rank."""

    def __init__(self, path: str, tokenizer: Tokenizer, seq_length: int, image_size: int,
                 image_tokens: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 num_workers: int = 0, shuffle_buffer_size: int = 64):
        check_dataset(path)
        self.path, self.image_tokens = path, image_tokens
        encoder = CaptionEncoder(tokenizer, seq_length, image_size)

        def worker_config():
            return WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=num_workers,
                                seed_offset=seed, global_error_handler=reraise_exception)

        try:
            self.train = get_savable_loader(get_train_dataset(
                path, split_part="train", worker_config=worker_config(),
                batch_size=micro_batch_size, shuffle_buffer_size=shuffle_buffer_size,
                max_samples_per_sequence=micro_batch_size * 4, task_encoder=encoder))
            self.val = get_loader(get_val_dataset(
                path, split_part="val", worker_config=worker_config(),
                batch_size=micro_batch_size, task_encoder=encoder))
        except Exception as err:  # e.g. energon's EmptyDatasetError for a split with no shards
            raise DataError(f"dataset {path!r} cannot be loaded for training: "
                            f"{type(err).__name__}: {err}") from err
        self._train_iter = None
        self._val_cache: list[dict[str, torch.Tensor]] = []
        self._val_done = False

    def next_train(self) -> dict[str, torch.Tensor]:
        if self._train_iter is None:
            self._train_iter = iter(self.train)
        return self._read(self._train_iter)

    def val_batches(self, limit: int) -> Iterator[dict[str, torch.Tensor]]:
        """The same first `limit` validation batches on every call (energon's val loader goes on
        where the last pass stopped, so they are read once and kept)."""
        if len(self._val_cache) < limit and not self._val_done:
            it = iter(self.val)
            self._val_cache = []
            while len(self._val_cache) < limit:
                try:
                    self._val_cache.append(self._read(it))
                except StopIteration:
                    self._val_done = True
                    break
        return iter(self._val_cache[:limit])

    def _read(self, it) -> dict[str, torch.Tensor]:
        try:
            batch = next(it)
        except (StopIteration, DataError):
            raise
        except Exception as err:  # energon names the shard in its message
            raise DataError(f"reading dataset {self.path!r} failed: {err}") from err
        return to_model_inputs(batch, self.image_tokens)

    def state(self):
        return self.train.save_state_rank()

    def restore(self, state) -> None:
        if self._train_iter is not None:
            raise RuntimeError("restore the data position before the first batch is read")
        self.train.restore_state_rank(state)
