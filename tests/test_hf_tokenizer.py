"""Issue 34: the tokenizer of a Hugging Face folder (`checkpoint.init_from=HF_DIR`).

A random tiny Mixtral (transformers, head size 32) is saved beside a byte-level BPE
tokenizer.json trained here with Mixtral's special layout (0 <unk>, 1 <s>, 2 </s>, no pad), so
that the project's own ids (0 pad, 2 <s>, 3 </s>) would be visibly wrong. Imported with
`checkpoint.init_from` alone, the trainer's jsonl windows are `tokenizers`' encoding with the
folder's <s> and </s>; a short run exports as Mixtral with a tokenizer `AutoTokenizer` loads and
that round-trips text; generate stops at the folder's </s>. A tokenizer with more ids than the
model's vocabulary and a folder without a tokenizer are refused, each by name.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests._train import run, tiny_text

BOS, EOS = 1, 2  # the folder's (Mixtral's); the project's sentencepiece layout has EOS 3
VOCAB = 320  # the model's rows, padded past the tokenizer's ids


def _common(root, run_dir):
    return [f"dir={run_dir}", "data.kind=jsonl", f"data.path={root / 'train.jsonl'}",
            f"data.valid_path={root / 'val.jsonl'}", "data.seq_length=12",
            "data.micro_batch_size=4", "data.global_batch_size=4", "optim.warmup_steps=1",
            "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every=1",
            "logging.eval_every=0", "parallel.expert=1", "model.null_experts.num_null_experts=0"]


def _tokenizer_json(texts, out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out))
    return tok


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(data root, a Hub-style Mixtral folder with tokenizer.json, the `tokenizers` object)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tiny_text(tmp_path_factory.mktemp("hf_tok"), 120, 16, 12)
    folder = root / "hub"
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                           rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
                           bos_token_id=BOS, eos_token_id=EOS)
    MixtralForCausalLM(config).save_pretrained(str(folder))
    texts = [json.loads(l)["text"] for l in (root / "train.jsonl").read_text().splitlines()]
    tok = _tokenizer_json(texts, folder / "tokenizer.json")
    # bos and eos named by the tokenizer files (eos as an added-token entry); pad: none
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
         "pad_token": None}))
    return root, folder, tok


def test_the_trainer_reads_the_folders_tokenizer_json(hub, tmp_path):
    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.run.data.kinds import build_data
    from megatron_nullmoe.run.data.text import iter_texts
    from megatron_nullmoe.train.loop import _tokenizer, _vocab_size

    root, folder, tok = hub
    cfg = load_config(None, [*_common(root, tmp_path / "r"), f"checkpoint.init_from={folder}"])
    assert cfg.data.tokenizer == str(folder / "tokenizer.json")
    ours = _tokenizer(cfg)  # what the trainer builds its data with
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (BOS, EOS, None)
    assert ours.vocab_size == tok.get_vocab_size() and _vocab_size(cfg, ours) == VOCAB
    data = build_data(cfg, ours, 0, 1)
    stream = [i for text in iter_texts(root / "train.jsonl")
              for i in [BOS] + tok.encode(text, add_special_tokens=False).ids + [EOS]]
    seen = data.train_windows.flatten().tolist()
    assert seen == stream[:len(seen)] and seen.count(EOS) >= 10
    # documents end with the folder's </s>, never the project's id 3 after a document
    assert all(seen[i + 1] == BOS for i in range(len(seen) - 1) if seen[i] == EOS)


def test_data_tokenizer_wins_and_a_folder_without_one_is_refused(hub, tmp_path):
    from megatron_nullmoe.run.config import ConfigError, load_config

    root, folder, _ = hub
    cfg = load_config(None, [*_common(root, tmp_path / "r"), f"checkpoint.init_from={folder}",
                             f"data.tokenizer={root / 'tok.model'}"])
    assert cfg.data.tokenizer == str(root / "tok.model")
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ConfigError) as err:
        load_config(None, [*_common(root, tmp_path / "r"), f"checkpoint.init_from={bare}"])
    text = str(err.value)
    assert f"checkpoint.init_from={bare}" in text
    assert "neither tokenizer.json nor tokenizer.model" in text and "data.tokenizer=PATH" in text


def test_a_tokenizer_with_more_ids_than_the_vocab_is_refused_with_both_numbers(hub, tmp_path):
    from megatron_nullmoe.run.config import ConfigError, load_config
    from megatron_nullmoe.train.loop import _tokenizer, _vocab_size

    root, folder, tok = hub
    small = tmp_path / "small"
    shutil.copytree(folder, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    cfg = load_config(None, [*_common(root, tmp_path / "r"), f"checkpoint.init_from={small}"])
    with pytest.raises(ConfigError) as err:
        _vocab_size(cfg, _tokenizer(cfg))
    assert f"has {tok.get_vocab_size()} ids, more than model.vocab_size=200" in str(err.value)


@pytest.fixture(scope="module")
def exported(hub, tmp_path_factory):
    """(the run folder trained 3 steps from the hub folder, its stock-Mixtral export)."""
    from tests.test_export import cli

    root, folder, _ = hub
    out = tmp_path_factory.mktemp("hf_tok_run")
    run([*_common(root, out / "run"), f"checkpoint.init_from={folder}", "steps=3"])
    done = cli(["-m", "megatron_nullmoe.export", "hf", str(out / "run"), "--format", "mixtral",
                "--out", str(out / "export")])
    assert done.returncode == 0, done.stderr
    return out / "run", out / "export"


def test_the_run_and_its_export_keep_the_folders_tokenizer(hub, exported):
    from transformers import AutoTokenizer

    from tests._train import losses

    root, _, tok = hub
    run_dir, export = exported
    assert len(losses(run_dir)) == 3 and all(v == v for v in losses(run_dir).values())
    assert (run_dir / "tokenizer.json").is_file() and not (run_dir / "tokenizer.model").exists()
    config = json.loads((export / "config.json").read_text())
    generation = json.loads((export / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (BOS, EOS, None)
    assert generation["eos_token_id"] == EOS
    assert not (export / "tokenizer.model").exists()
    auto = AutoTokenizer.from_pretrained(str(export))
    assert (auto.bos_token_id, auto.eos_token_id) == (BOS, EOS)
    for line in (root / "val.jsonl").read_text().splitlines()[:5]:
        text = json.loads(line)["text"]
        ids = auto(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text, add_special_tokens=False).ids
        assert auto.decode(ids) == text


def _always_eos(folder):
    """The folder's Mixtral made to predict </s> at every position: no layer writes to the
    residual stream, every embedding is e0, and only </s>'s output row reads e0."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    weights = load_file(str(path))
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "w2.weight")):
            weights[name] = torch.zeros_like(w)
    emb = torch.zeros_like(weights["model.embed_tokens.weight"])
    emb[:, 0] = 1
    head = torch.zeros_like(weights["lm_head.weight"])
    head[EOS, 0] = 1
    weights.update({"model.embed_tokens.weight": emb, "lm_head.weight": head})
    save_file(weights, str(path), metadata={"format": "pt"})


def test_generate_stops_at_the_folders_eos(hub, exported, tmp_path, single_rank):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nullmoe.inference.decode import mcore_generate, prompt_ids
    from megatron_nullmoe.inference.generate import _parser
    from megatron_nullmoe.inference.generate import run as generate
    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.run.hf_folder import load_hf_weights
    from megatron_nullmoe.run.model import build_model
    from megatron_nullmoe.run.tokenizer import load_tokenizer

    root, folder, _ = hub
    _, export = exported
    # the exported folder, through the generate command (transformers, its tokenizer files)
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    _always_eos(copy)
    text, info = generate(_parser().parse_args([str(copy), "--prompt", "the cat",
                                                "--max-new-tokens", "6"]))
    assert (text, info["new_tokens"]) == ("", 0)
    # the imported Hub folder, through the megatron-core loop
    hub_copy = tmp_path / "hub"
    shutil.copytree(folder, hub_copy)
    _always_eos(hub_copy)
    cfg = load_config(None, [*_common(root, tmp_path / "r"), f"checkpoint.init_from={hub_copy}"])
    model, _ = build_model(cfg, cfg.model.vocab_size,
                           ProcessGroupCollection.use_mpu_process_groups(), torch.float32,
                           use_te=False)
    load_hf_weights(hub_copy, model)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    ids = prompt_ids(tokenizer, "the cat")
    assert ids[0] == BOS
    assert mcore_generate(model.eval(), ids, 6, 64, eos_id=tokenizer.eos_id) == []
    # with the project's id 3 as the stop it would run on, emitting the folder's </s>
    assert mcore_generate(model, ids, 6, 64, eos_id=3) == [EOS] * 6


def test_a_hub_sentencepiece_model_keeps_its_own_ids(hub, tmp_path):
    """A Hub Mixtral's tokenizer.model (0 <unk>, 1 <s>, 2 </s>, no pad) is read with those ids,
    not refused for lacking the project's layout, nor read as it."""
    import sentencepiece as spm

    from megatron_nullmoe.run.tokenizer import Tokenizer, load_tokenizer

    root, _, _ = hub
    texts = [json.loads(l)["text"] for l in (root / "train.jsonl").read_text().splitlines()]
    folder = tmp_path / "sp"
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(folder / "tokenizer"), vocab_size=60,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        hard_vocab_limit=False)
    tok = load_tokenizer(folder)
    assert isinstance(tok, Tokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS, EOS, None)
    assert tok.decode(tok.encode(texts[0])) == texts[0]
