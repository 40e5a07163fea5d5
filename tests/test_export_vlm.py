"""Issue 18, item 1 (the VLM): a megatron-core LLaVAModel with null experts exports to a Hugging
Face folder (NullMoEForConditionalGeneration + NullMoEProcessor) that computes what megatron-core
computes, decodes the same greedy captions with its KV cache, and prepares inputs as the trainer
does.

Models are the demo VLM recipe at test size (tests/_train.py TINY), built in-process on one CPU
rank with random weights (std 0.1, so routing is far from uniform) and each router's budget
bias set, as in a trained model, so that some picks are null and some real.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._train import TINY

ROOT = Path(__file__).resolve().parents[1]
K = 4  # the demo recipe's router_topk
ALLOWED_IMPORTS = {"math", "os", "shutil", "dataclasses", "typing", "torch", "transformers",
                   "sentencepiece", "numpy"}


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    from megatron_nullmoe.run.tokenizer import train_tokenizer
    from megatron_nullmoe.train.data.shapes import sample

    path = tmp_path_factory.mktemp("tok") / "tok.model"
    captions = [sample(0, i, 32)[1] for i in range(200)]
    return train_tokenizer(captions, path, vocab_size=96)


def build_llava(tokenizer_model, overrides=()):
    """The demo VLM at test size, random weights, budget bias 0.15 on every null router."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.run.model import build_model
    from megatron_nullmoe.run.tokenizer import Tokenizer

    cfg = load_config(str(ROOT / "examples" / "demo_vlm.yaml"),
                      TINY + ["model.null_experts.target_real_per_token=2.0", *overrides])
    model, info = build_model(cfg, Tokenizer(tokenizer_model).vocab_size,
                              ProcessGroupCollection.use_mpu_process_groups(), torch.float32,
                              use_te=False)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        budgets = 0
        for layer in model.language_model.decoder.layers:
            router = layer.mlp.router
            if router.null_budget_bias is not None:
                router.null_budget_bias.fill_(0.15)
                budgets += 1
    assert budgets == len(model.language_model.decoder.layers)
    return model.eval(), cfg, info


def export(model, tokenizer_model, out):
    from megatron_nullmoe.export.vlm import export_vlm

    return export_vlm(model, tokenizer_model, out, {"source": "test"})


def load(out, auto="AutoModelForImageTextToText"):
    import transformers

    model = getattr(transformers, auto).from_pretrained(str(out), trust_remote_code=True,
                                                        dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(str(out), trust_remote_code=True)
    return model, processor


def inputs(model, length=10, batch=3, seed=0):
    from megatron_nullmoe.export.vlm import sample_inputs

    return sample_inputs(model, length, batch, seed)


def png(index, side=32):
    from megatron_nullmoe.train.data.shapes import sample

    return sample(0, index, side)


GATES = [("renormalize", []), ("keep_null_share", []),
         ("keep_null_share", ["model.position_embedding=rope", "model.normalization=RMSNorm",
                              "model.activation=swiglu", "model.num_query_groups=2"])]


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("gate,arch", GATES, ids=["renormalize", "keep_null_share",
                                                  "keep_null_share-rope-rmsnorm-swiglu-gqa"])
def test_the_vlm_export_equals_megatron_core_logits_and_greedy_captions(single_rank, tmp_path,
                                                                        tokenizer_model, gate, arch):
    from megatron_nullmoe.export.vlm import mcore_vlm_logits
    from megatron_nullmoe.inference.decode import mcore_generate

    model, cfg, info = build_llava(tokenizer_model,
                                   [f"model.null_experts.gate_normalization={gate}", *arch])
    out = export(model, tokenizer_model, tmp_path / "vlm")
    hf_model, processor = load(out)
    assert type(hf_model).__name__ == "NullMoEForConditionalGeneration"
    assert hf_model.config.image_seq_length == info.image_tokens == 16
    images, ids = inputs(model)
    ref = mcore_vlm_logits(model, images, ids)
    with torch.no_grad():
        got = hf_model(input_ids=ids, pixel_values=images, use_cache=False)
    assert got.logits.shape == ref.shape == (3, 16 - 1 + 10, hf_model.config.vocab_size)
    diff = float((got.logits - ref).abs().max())
    print(f"{gate} {arch}: max |logits diff| = {diff:.2e}")
    assert diff < 1e-4, diff
    assert 0 < float(got.real_experts_per_token) < K  # some picks null, some real
    bias = hf_model.model.layers[0].mlp.router.selection_bias
    assert bias[:8].abs().sum() == 0 and bias[8:].abs().min() > 0  # the budget bias came along

    # greedy captions with the KV cache (the image at the first step only) = megatron-core's loop
    for i in range(2):
        prompt = ids[i, : 2 + i].tolist()  # [placeholder, <s>] and one more token
        want = mcore_generate(model, prompt, 10, cfg.model.max_position_embeddings,
                              image=images[i], image_tokens=info.image_tokens, stop_at_eos=False)
        with torch.no_grad():
            gen = hf_model.generate(input_ids=torch.tensor([prompt]), pixel_values=images[i:i + 1],
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=10, do_sample=False, eos_token_id=None,
                                    temperature=None, top_k=None, top_p=None)
        assert gen[0, len(prompt):].tolist() == want


def test_a_causal_vit_as_megatron_core_016s_local_spec_builds_it_exports_exactly(
        single_rank, monkeypatch, tokenizer_model):
    """The trainer builds a bidirectional ViT everywhere (megatron_nullmoe.run.model
    `_bidirectional`), but megatron-core 0.16's own local ViT spec is causal: a model built that
    way (e.g. a CPU checkpoint of an older release of this project) exports with its causal
    mask. The export follows the model it is given."""
    from megatron_nullmoe.export.vlm import hf_vlm_from_megatron, mcore_vlm_logits
    from megatron_nullmoe.run import model as train_model
    from megatron.core.transformer.enums import AttnMaskType

    def causal(vit_spec):
        vit_spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.causal

    monkeypatch.setattr(train_model, "_bidirectional", causal)
    model, _, _ = build_llava(tokenizer_model)
    hf_model, _ = hf_vlm_from_megatron(model)
    assert hf_model.config.vision_config["attention"] == "causal"
    images, ids = inputs(model)
    with torch.no_grad():
        got = hf_model(input_ids=ids, pixel_values=images, use_cache=False).logits
        assert float((got - mcore_vlm_logits(model, images, ids)).abs().max()) < 1e-4
        hf_model.vision_tower.causal = False  # and the mask matters
        wrong = hf_model(input_ids=ids, pixel_values=images, use_cache=False).logits
    assert float((wrong - got).abs().max()) > 1e-2


def test_cached_left_padded_batch_and_combined_masks(single_rank, tmp_path, tokenizer_model):
    """A left-padded batch decodes each row as it decodes alone; an attention mask over the
    combined positions (image expanded) gives the same logits as one over the text."""
    from megatron_nullmoe.export.vlm import hf_vlm_from_megatron
    from megatron_nullmoe.inference.decode import mcore_generate

    model, cfg, info = build_llava(tokenizer_model, ["model.position_embedding=rope"])
    hf_model, _ = hf_vlm_from_megatron(model)
    images, ids = inputs(model, 6, 2, seed=4)
    prompts = [ids[0, :2].tolist(), ids[1, :5].tolist()]
    width = max(map(len, prompts))
    batch = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        gen = hf_model.generate(input_ids=batch, attention_mask=mask, pixel_values=images,
                                max_new_tokens=8, do_sample=False, eos_token_id=None,
                                temperature=None, top_k=None, top_p=None)
    for i, p in enumerate(prompts):
        want = mcore_generate(model, p, 8, cfg.model.max_position_embeddings, image=images[i],
                              image_tokens=info.image_tokens, stop_at_eos=False)
        assert gen[i, width:].tolist() == want
    n = info.image_tokens
    rows = []
    for row, m in zip(batch.tolist(), mask):
        at = row.index(-200)
        rows.append(torch.cat([m[:at], m[at:at + 1].expand(n), m[at + 1:]]))
    combined = torch.stack(rows)
    with torch.no_grad():
        text = hf_model(input_ids=batch, attention_mask=mask, pixel_values=images, use_cache=False)
        comb = hf_model(input_ids=batch, attention_mask=combined, pixel_values=images,
                        use_cache=False)
    assert torch.equal(text.logits, comb.logits)


def test_labels_give_megatron_cores_training_loss(single_rank, tokenizer_model):
    """labels (HF layout: input_ids, shifted inside) give the loss the trainer's LLaVAModel
    computes on the same sample (image positions predict nothing, padding masked)."""
    from megatron_nullmoe.export.vlm import hf_vlm_from_megatron
    from megatron_nullmoe.run.tokenizer import IMAGE_TOKEN, PAD

    model, _, _ = build_llava(tokenizer_model)
    hf_model, _ = hf_vlm_from_megatron(model)
    images, ids = inputs(model, 11, 3, seed=2)
    text = ids[:, 1:].clone()  # <s> ...
    text[2, 7:] = PAD
    L = text.shape[1] - 1
    with torch.no_grad():
        loss, mask = model(images, torch.cat([ids[:, :1], text[:, :L]], 1),
                           torch.arange(L + 1).expand(3, L + 1), None, labels=text,
                           loss_mask=(text != PAD).float())
        hf_ids = torch.cat([ids[:, :1], text], 1)
        labels = hf_ids.masked_fill((hf_ids == IMAGE_TOKEN) | (hf_ids == PAD), -100)
        ours = hf_model(input_ids=hf_ids, pixel_values=images, labels=labels, use_cache=False).loss
    assert abs(float(ours) - float((loss * mask).sum() / mask.sum())) < 1e-5


# ----------------------------------------------------------------------------- the folder
def test_the_folder_auto_classes_processor_and_refusals(single_rank, tmp_path, tokenizer_model):
    from megatron_nullmoe.export.hf import ExportError
    from megatron_nullmoe.export.vlm import export_vlm
    from megatron_nullmoe.inference.generate import load_image
    from megatron_nullmoe.inference.decode import prompt_ids
    from megatron_nullmoe.run.data.energon import CaptionEncoder, VLMBatch, to_model_inputs
    from megatron_nullmoe.run.tokenizer import IMAGE_TOKEN, Tokenizer

    model, cfg, info = build_llava(tokenizer_model)
    out = export(model, tokenizer_model, tmp_path / "vlm")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["config.json", "configuration_nullmoe.py", "export.json",
                            "generation_config.json", "model.safetensors", "modeling_nullmoe.py",
                            "modeling_nullmoe_vlm.py", "processing_nullmoe.py",
                            "processor_config.json", "routing_math.py", "special_tokens_map.json",
                            "tokenization_nullmoe.py", "tokenizer.model", "tokenizer_config.json"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["NullMoEForConditionalGeneration"]
    vlm_class = "modeling_nullmoe_vlm.NullMoEForConditionalGeneration"
    assert config["auto_map"]["AutoModelForImageTextToText"] == vlm_class
    assert config["auto_map"]["AutoModelForCausalLM"] == vlm_class
    assert config["auto_map"]["AutoProcessor"] == "processing_nullmoe.NullMoEProcessor"
    assert config["vision_config"]["attention"] == "bidirectional"  # as the trainer builds it
    assert (config["image_token_index"], config["vision_config"]["image_size"]) == (IMAGE_TOKEN, 32)
    imports = {line.split()[1].split(".")[0] for name in names if name.endswith(".py")
               for line in (out / name).read_text().splitlines()
               if line.startswith(("import ", "from ")) and not line.startswith("from .")}
    assert imports <= ALLOWED_IMPORTS, imports

    # AutoModelForCausalLM gives the same class and logits
    vlm, processor = load(out)
    causal, _ = load(out, "AutoModelForCausalLM")
    assert type(causal).__name__ == type(vlm).__name__ == "NullMoEForConditionalGeneration"
    assert type(processor).__name__ == "NullMoEProcessor"

    # the processor feeds what the trainer feeds: the energon decode of the PNG, scaled to [-1, 1],
    # and [placeholder, <s>, caption ids]
    from megatron.energon import CaptioningSample
    from megatron.energon.flavors.webdataset.sample_decoder import SampleDecoder
    from PIL import Image

    tok = Tokenizer(tokenizer_model)
    data, caption = png(3)
    decoded = SampleDecoder().decode("x.png", data)
    sample = CaptioningSample(__key__="x", __restore_key__=(), __subflavors__=None,
                              __sources__=None, image=decoded, caption=caption)
    encoder = CaptionEncoder(tok, cfg.data.seq_length, 32)
    encoded = encoder.encode_sample(sample)
    trainer = to_model_inputs(VLMBatch.from_samples([encoded], image=encoded.image[None],
                                                    text=encoded.text[None]), info.image_tokens)
    prefix = caption.split()[0]
    feat = processor(images=Image.open(io.BytesIO(data)), text=prefix)
    assert feat["input_ids"][0].tolist() == prompt_ids(tok, prefix, image=True)
    assert torch.equal(feat["pixel_values"], trainer["images"])
    n = len(prompt_ids(tok, prefix, image=True))
    full = processor(images=Image.open(io.BytesIO(data)), text=caption)["input_ids"][0].tolist()
    want = trainer["input_ids"][0].tolist()
    assert full == want[: len(full)] and want[:n] == feat["input_ids"][0].tolist()
    assert processor(images=Image.open(io.BytesIO(data)))["input_ids"].tolist() == [[IMAGE_TOKEN, 2]]
    # arrays: uint8 channels last, float [0, 1] channels first
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(processor(images=rgb)["pixel_values"], trainer["images"])
    floats = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(processor(images=floats)["pixel_values"], trainer["images"])
    # a batch of two prompts: left padding, one image each
    two = processor(images=[Image.open(io.BytesIO(png(i)[0])) for i in (1, 2)],
                    text=["", prefix])
    assert two["pixel_values"].shape == (2, 3, 32, 32)
    assert two["attention_mask"][0].tolist()[: n - 2] == [0] * (n - 2)
    assert two["input_ids"][0, n - 2:].tolist() == [IMAGE_TOKEN, 2]

    # a wrong image size is refused, naming the size; do_resize=True resizes as generate does
    big_png, _ = png(5, 48)
    big = Image.open(io.BytesIO(big_png))
    with pytest.raises(ValueError, match=r"image 0 is 48x48 .* this model takes 32x32 images"):
        processor(images=big)
    with pytest.raises(ValueError, match="this model takes 32x32"):
        processor(images=np.zeros((40, 32, 3), dtype=np.uint8))
    (tmp_path / "big.png").write_bytes(big_png)
    assert torch.equal(processor(images=big, do_resize=True)["pixel_values"][0],
                       load_image(str(tmp_path / "big.png"), 32, resize=True))
    with pytest.raises(ValueError, match="float pixels must be in"):
        processor(images=torch.full((3, 32, 32), 2.0))

    # captions through the folder, with the processor's inputs, equal megatron-core's
    from megatron_nullmoe.inference.decode import mcore_generate

    want = mcore_generate(model, feat["input_ids"][0].tolist(), 10,
                          cfg.model.max_position_embeddings, image=feat["pixel_values"][0],
                          image_tokens=info.image_tokens, stop_at_eos=False)
    with torch.no_grad():
        gen = vlm.generate(**feat, max_new_tokens=10, do_sample=False, eos_token_id=None,
                           temperature=None, top_k=None, top_p=None)
    assert gen[0, feat["input_ids"].shape[1]:].tolist() == want

    # the model refuses inputs it cannot place, with the reason
    images, ids = inputs(model, 6, 1)
    cases = [
        (dict(input_ids=ids[:, 1:], pixel_values=images), "needs the image placeholder"),
        (dict(input_ids=ids), "hold the image placeholder -200 but no pixel_values"),
        (dict(input_ids=ids, pixel_values=images[:, :, :16]), "this model takes"),
        (dict(input_ids=torch.cat([ids] + [ids[:, 1:]] * 10, 1), pixel_values=images),
         "pass the model's max_position_embeddings=64"),
        (dict(input_ids=ids, pixel_values=images, attention_mask=torch.ones(1, 3)),
         "attention_mask has 3 positions"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            vlm(**kwargs, use_cache=False)
    # and the exporter refuses what it does not export, writing nothing
    from tests._models import build_gpt
    from megatron_nullmoe import NullExpertConfig

    with pytest.raises(ExportError, match="takes a megatron-core LLaVAModel"):
        export_vlm(build_gpt(NullExpertConfig()), tokenizer_model, tmp_path / "gpt", {})
    assert not (tmp_path / "gpt").exists()
    with pytest.raises(ExportError, match="already holds files"):
        export_vlm(model, tokenizer_model, out, {})


def test_folders_load_rotary_and_routing_counters_initialised(single_rank, tmp_path,
                                                              tokenizer_model):
    """from_pretrained (transformers 5) leaves non-persistent buffers uninitialised: the rotary
    frequencies are computed, not stored, and the routing counters start at zero. Checked on the
    shared decoder code through a GPT export with rope (the VLM's rope case is above)."""
    from transformers import AutoModelForCausalLM

    from megatron_nullmoe import NullExpertConfig
    from megatron_nullmoe.export.check import mcore_logits
    from megatron_nullmoe.export.hf import export_gpt
    from tests._models import VOCAB, build_gpt

    model = build_gpt(NullExpertConfig(num_null_experts=4, target_real_per_token=1.0),
                      position="rope", normalization="RMSNorm")
    out = export_gpt(model, tokenizer_model, tmp_path / "gpt", {"source": "test"})
    hf_model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    totals = hf_model.routing_totals()
    assert (totals["real_picks"], totals["token_layers"]) == (0.0, 0.0)
    ids = torch.randint(4, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = float((hf_model(ids, use_cache=False).logits - mcore_logits(model, ids)).abs().max())
    assert diff < 1e-4, diff
