"""NullMoEProcessor: an image and a text -> the inputs NullMoEForConditionalGeneration takes, laid
out as the trainer lays out its samples.

Written by megatron_nullmoe.export; loaded with `trust_remote_code=True`
(`AutoProcessor.from_pretrained(DIR, trust_remote_code=True)`). For each (image, text):

    input_ids      [image placeholder (-200), <s>, ids of text...]   (the trainer's: placeholder,
                                                                       then `<s> caption`)
    pixel_values   [3, image_size, image_size] in [-1, 1]: RGB / 255 * 2 - 1, as the trainer scales
    attention_mask ones (zeros on the left where a batch is padded, with <pad>)

An image of another size is refused with the size it needs, unless `do_resize=True` (per call
or in processor_config.json): then it is resized (bilinear), as `megatron_nullmoe.generate`
does. Images are PIL images, uint8 arrays (0..255) or float arrays/tensors in [0, 1], channels
last [H, W, 3] or first [3, H, W]. Without images, input_ids are `<s>` + text (the decoder alone).
"""

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin


class NullMoEProcessor(ProcessorMixin):
    def __init__(self, tokenizer=None, image_size=336, image_token_index=-200, do_resize=False,
                 chat_template=None, **kwargs):
        self.image_size = int(image_size)
        self.image_token_index = int(image_token_index)
        self.do_resize = bool(do_resize)
        super().__init__(tokenizer, chat_template=chat_template)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]

    def __call__(self, images=None, text=None, return_tensors="pt", do_resize=None, **kwargs):
        """BatchFeature with input_ids, attention_mask and (with images) pixel_values."""
        if kwargs:
            raise TypeError(f"NullMoEProcessor does not take {sorted(kwargs)}: it takes images, "
                            "text, return_tensors and do_resize")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: this processor returns torch "
                             "tensors ('pt')")
        images = self._as_list(images, "images")
        texts = self._as_list(text, "text")
        if images is None and texts is None:
            raise ValueError("give images, text, or both")
        if texts is None:
            texts = [""] * len(images)  # a caption from its start
        if images is not None and len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts: give one image per text")
        rows = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__}; give a str")
            ids = self.tokenizer(t)["input_ids"]  # <s> + the sentencepiece ids, as the trainer's
            rows.append(([self.image_token_index] if images is not None else []) + ids)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        data = {"input_ids": input_ids, "attention_mask": mask}
        if images is not None:
            resize = self.do_resize if do_resize is None else bool(do_resize)
            data["pixel_values"] = torch.stack([self.pixels(im, i, resize)
                                                for i, im in enumerate(images)])
        return BatchFeature(data)

    @staticmethod
    def _as_list(value, name):
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"{name} is empty")
            return list(value)
        return [value]

    def pixels(self, image, index=0, resize=False):
        """One image -> [3, S, S] float32 in [-1, 1]."""
        S = self.image_size
        if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
            image = image.convert("RGB")
            if image.size != (S, S):
                if not resize:
                    raise ValueError(self._size_error(index, image.size[1], image.size[0]))
                image = image.resize((S, S), _bilinear())
            x = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1)
            return x * 2 - 1
        if isinstance(image, np.ndarray):
            array = image
        elif isinstance(image, torch.Tensor):
            array = image.detach().cpu().numpy()
        else:
            raise TypeError(f"image {index} is a {type(image).__name__}; give a PIL image, a "
                            "numpy array or a torch tensor")
        if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
            raise ValueError(f"image {index} has shape {tuple(array.shape)}; give RGB [H, W, 3] "
                             "or [3, H, W]")
        if array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)  # channels last
        if array.dtype == np.uint8:
            x = array.astype(np.float32) / 255.0
        elif np.issubdtype(array.dtype, np.floating):
            x = array.astype(np.float32)
            if x.size and (x.min() < 0 or x.max() > 1):
                raise ValueError(f"image {index}: float pixels must be in [0, 1] (got "
                                 f"{x.min():.3g}..{x.max():.3g}); give uint8 for 0..255")
        else:
            raise ValueError(f"image {index} has dtype {array.dtype}; give uint8 or float in [0, 1]")
        H, W = x.shape[:2]
        if (H, W) != (S, S):
            if not resize:
                raise ValueError(self._size_error(index, H, W))
            from PIL import Image

            pil = Image.fromarray(np.round(x * 255).astype(np.uint8))
            return self.pixels(pil.resize((S, S), _bilinear()), index)
        return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1) * 2 - 1

    def _size_error(self, index, H, W):
        S = self.image_size
        return (f"image {index} is {H}x{W} (height x width); this model takes {S}x{S} images "
                f"(vision_config image_size). Resize it, or pass do_resize=True to resize it "
                "here (bilinear)")

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


def _bilinear():
    from PIL import Image

    return getattr(Image, "Resampling", Image).BILINEAR
