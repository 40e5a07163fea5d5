"""`python -m megatron_nullmoe.evaluate`: perplexity and real experts per token of a run or export
(GPT and VLM), and the export scored by lm-evaluation-harness.

One tiny GPT null-MoE run is trained by the trainer (budget control, keep-null-share gates) and
exported by the command line, in-process. The evaluate command must give the same perplexity on
the run (converted in memory) and on the export, equal to exp of megatron-core's mean per-token
loss on the same windows, and report the real experts per token that a hand count of
megatron-core's routing on those windows finds. lm-evaluation-harness's HFLM must load the export
offline and score (context, continuation) pairs with the log-probabilities the export's logits give.

One tiny VLM (LLaVA) run is trained for two steps on the tiny demo data, validating once on the
whole val split, and exported. Its caption perplexity on the run and on the export must agree, and
equal exp of megatron-core's mean loss over the trainer's loss mask on the same samples (read by
the trainer's own loader) and exp of the val loss the trainer logged; the real experts per token,
overall and per image and text token, must be megatron-core's routing statistics.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

SEQ = 16  # the run's data.seq_length


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, export folder, data folder) of a tiny budget-controlled keep-null-share run."""
    from megatron_nullmoe.export.__main__ import main as export_main
    from tests._train import ROOT, run, tiny_text

    root = tmp_path_factory.mktemp("evaluate")
    tiny_text(root, 200, 24, 12)
    run_dir = root / "run"
    run(["--config", str(ROOT / "examples/gpt_null_moe.yaml"), f"dir={run_dir}",
         f"data.path={root / 'train.jsonl'}", f"data.valid_path={root / 'val.jsonl'}",
         f"data.tokenizer={root / 'tok.model'}", f"data.seq_length={SEQ}", "steps=6",
         "model.num_layers=2", "model.moe_layer_freq=1", "model.hidden_size=64",
         "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=64", "data.micro_batch_size=8",
         "data.global_batch_size=16", "optim.warmup_steps=2", "parallel.expert=1",
         "logging.eval_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
         "model.null_experts.gate_normalization=keep_null_share"])
    export_main(["hf", str(run_dir), "--out", str(root / "hf")])
    return run_dir, root / "hf", root


def evaluate_cli(capsys, args: list[str]) -> str:
    from megatron_nullmoe.inference.evaluate import main

    capsys.readouterr()
    main(args)
    return capsys.readouterr().out


def evaluate_json(capsys, args: list[str]) -> dict:
    out = evaluate_cli(capsys, [*args, "--json"])
    return json.loads(out)  # one JSON object, nothing else on stdout


# ----------------------------------------------------------------------------- a. perplexity
def test_run_and_export_give_megatron_core_perplexity_and_real_experts(trained, capsys):
    from megatron_nullmoe.export.source import load_megatron, resolve
    from megatron_nullmoe.inference.perplexity import mcore_mean_nll
    from megatron_nullmoe.run.data.text import read_windows
    from megatron_nullmoe.run.tokenizer import Tokenizer

    run_dir, export, root = trained
    ours = evaluate_json(capsys, [str(run_dir)])  # data and seq-length: the run's
    theirs = evaluate_json(capsys, [str(export), "--data", str(root / "val.jsonl"),
                                    "--seq-length", str(SEQ), "--batch-size", "5"])
    assert (ours["kind"], theirs["kind"]) == ("checkpoint", "export")
    assert ours["step"] == theirs["step"] == 6
    assert ours["data"] == str(root / "val.jsonl") and ours["seq_length"] == SEQ

    windows = read_windows(root / "val.jsonl", Tokenizer(run_dir / "tokenizer.model"), SEQ)
    assert ours["windows"] == theirs["windows"] == windows.shape[0] > 1
    assert ours["tokens"] == theirs["tokens"] == windows.shape[0] * SEQ
    assert _rel(theirs["perplexity"], ours["perplexity"]) < 1e-5
    assert ours["perplexity"] == pytest.approx(math.exp(ours["mean_nll"]), rel=1e-12)

    # megatron-core's per-token loss on the same windows, and its routing counted by hand
    model = load_megatron(resolve(run_dir))
    counts = {"real": 0, "tokens": 0, "layers": 0}

    def count(module, args, output):
        _, routing_map_TE = output
        counts["real"] += int(routing_map_TE.sum())
        counts["tokens"] += routing_map_TE.shape[0]
        counts["layers"] += 1

    routers = [l.mlp.router for l in model.decoder.layers if hasattr(l.mlp, "router")]
    hooks = [r.register_forward_hook(count) for r in routers]
    try:
        reference = mcore_mean_nll(model, windows, batch_size=8)
    finally:
        for h in hooks:
            h.remove()
    assert reference["tokens"] == ours["tokens"]
    assert _rel(ours["perplexity"], math.exp(reference["mean_nll"])) < 1e-4

    k = ours["router_topk"]
    assert (k, ours["num_experts"], ours["num_null_experts"], ours["moe_layers"]) == (4, 8, 8, 2)
    real = ours["real_experts_per_token"]
    assert 0 < real < k  # budget control: some picks null, some real
    assert theirs["real_experts_per_token"] == pytest.approx(real, abs=1e-12)
    assert counts["tokens"] == ours["tokens"] * len(routers) == ours["token_layers"]
    assert counts["real"] / counts["tokens"] == pytest.approx(real, abs=1e-12)


def test_summary_and_window_limit(trained, capsys):
    run_dir, export, root = trained
    out = evaluate_cli(capsys, [str(export), "--data", str(root / "val.jsonl"), "--seq-length",
                                "8", "--max-windows", "3", "--batch-size", "2"])
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"export {export} step 6 on {root / 'val.jsonl'}")
    assert lines[1].startswith("perplexity ") and "mean NLL" in lines[1]
    assert lines[2].startswith("24 tokens in 3 windows (of ") and lines[2].endswith("seq-length 8")
    assert lines[3].startswith("real experts per token ")
    assert "top-4 over 8 real + 8 null" in lines[3]


# ----------------------------------------------------------------------------- c. bad inputs
def test_bad_inputs_are_refused_with_the_value_and_what_is_valid(trained, capsys, tmp_path):
    from megatron_nullmoe.inference.evaluate import main

    run_dir, export, root = trained
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n")
    cases = [
        ([str(export)], "is an export, which names no validation data: give --data FILE.jsonl"),
        ([str(run_dir), "--data", str(tmp_path / "nope.jsonl")],
         f"--data '{tmp_path / 'nope.jsonl'}' does not exist"),
        ([str(export), "--data", str(root / "val.jsonl"), "--seq-length", "65"],
         "--seq-length 65: give 1 to 64 (the model's max_position_embeddings is 64)"),
        ([str(run_dir), "--seq-length", "0"], "--seq-length 0: give 1 to 64"),
        ([str(export), "--data", str(tmp_path / "short.jsonl")],
         "fewer than one window of --seq-length + 1 = 65: give --seq-length"),
        ([str(export), "--data", str(tmp_path)], "is a folder: give a jsonl file"),
        ([str(run_dir), "--batch-size", "0"], "--batch-size 0: give 1 or more"),
        ([str(tmp_path / "nothing")], "does not exist; give a run folder"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        text = str(exit_.value.code)
        assert text.startswith("evaluate error: ") and message in text, (args, text)


# ----------------------------------------------------------------------------- d. VLM
VLM_SEQ = 12  # the tiny VLM run's data.seq_length (tests/_train.py TINY)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(run folder, export folder, energon demo dataset) of a tiny VLM trained for two steps,
    validated by the trainer at step 2 on the whole val split (4 batches of 8 = 32 samples)."""
    from megatron_nullmoe.export.__main__ import main as export_main
    from tests._train import run, tiny_demo, vlm_args

    root = tmp_path_factory.mktemp("evaluate_vlm")
    demo = tiny_demo(root / "demo", train_samples=128)
    run_dir = root / "run"
    run(vlm_args(demo, run_dir, "steps=2", "logging.eval_every=2", "logging.eval_steps=4"))
    export_main(["hf", str(run_dir), "--out", str(root / "hf")])
    return run_dir, root / "hf", demo


def test_vlm_run_and_export_give_the_trainers_caption_perplexity(vlm, capsys):
    from megatron_nullmoe.export.source import load_megatron, resolve
    from megatron_nullmoe.inference.perplexity import mcore_vlm_mean_nll
    from megatron_nullmoe.run.data.energon import EnergonData
    from megatron_nullmoe.run.tokenizer import PAD, Tokenizer

    run_dir, export, demo = vlm
    ours = evaluate_json(capsys, [str(run_dir)])  # data and seq-length: the run's
    theirs = evaluate_json(capsys, [str(export), "--data", str(demo), "--seq-length",
                                    str(VLM_SEQ), "--batch-size", "5"])
    assert (ours["kind"], theirs["kind"]) == ("checkpoint", "export")
    assert ours["model"] == theirs["model"] == "vlm"
    assert ours["step"] == theirs["step"] == 2
    assert ours["data"] == theirs["data"] == str(demo) and ours["seq_length"] == VLM_SEQ
    assert ours["image_tokens"] == theirs["image_tokens"] == 16  # (32 / 8)^2 patches
    assert ours["samples"] == theirs["samples"] == ours["samples_available"] == 32
    assert ours["tokens"] == theirs["tokens"]
    assert _rel(theirs["perplexity"], ours["perplexity"]) < 1e-5
    assert ours["perplexity"] == pytest.approx(math.exp(ours["mean_nll"]), rel=1e-12)

    # megatron-core's LLaVAModel on the samples the trainer's own loader reads
    source = resolve(run_dir)
    cfg = source.cfg
    data = EnergonData(cfg.data.path, Tokenizer(source.tokenizer), cfg.data.seq_length,
                       cfg.model.vision.image_size, cfg.image_tokens, cfg.data.micro_batch_size,
                       0, 1, cfg.seed)
    batches = list(data.val_batches(100))
    reference = mcore_vlm_mean_nll(load_megatron(source), batches)
    assert reference["samples"] == 32
    # the counted tokens: the caption and </s> of every sample (<s> is not predicted, padding
    # is masked), none cut off at this seq-length
    labels = torch.cat([b["labels"] for b in batches])
    assert bool((labels[:, -1] == PAD).all())
    assert reference["tokens"] == ours["tokens"] == int((labels[:, 1:] != PAD).sum())
    assert _rel(ours["perplexity"], math.exp(reference["mean_nll"])) < 1e-4
    # ... which is the trainer's validation loss at step 2, on the same 32 samples
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_loss = next(r["val/loss"] for r in logged if r.get("step") == 2 and "val/loss" in r)
    assert _rel(ours["perplexity"], math.exp(val_loss)) < 1e-4
    # --max-windows: the first samples in the trainer's order
    first = evaluate_json(capsys, [str(run_dir), "--max-windows", "5", "--batch-size", "3"])
    five = mcore_vlm_mean_nll(load_megatron(source),
                              [{k: v[:5] for k, v in batches[0].items()}])
    assert first["samples"] == five["samples"] == 5 and first["tokens"] == five["tokens"]
    assert _rel(first["perplexity"], five["perplexity"]) < 1e-4

    # real experts per token: megatron-core's routing statistics (image + non-padding text tokens)
    k = ours["router_topk"]
    assert (k, ours["num_experts"], ours["num_null_experts"], ours["moe_layers"]) == (4, 8, 8, 2)
    for key in ("real_experts_per_token", "real_experts_per_image_token",
                "real_experts_per_text_token"):
        assert 0 < ours[key] < k, key  # some picks null, some real
        assert theirs[key] == pytest.approx(ours[key], abs=1e-12), key
        assert ours[key] == pytest.approx(reference[key], abs=1e-9), key
    text_tokens = int((torch.cat([b["input_ids"] for b in batches])[:, 1:] != PAD).sum())
    assert ours["image_token_layers"] == 32 * 16 * 2
    assert ours["token_layers"] == (32 * 16 + text_tokens) * 2


def test_vlm_summary_sample_limit_and_padding(vlm, capsys):
    """--max-windows takes the first samples; a longer --seq-length (the export's default, 48)
    only adds padding, which changes nothing."""
    run_dir, export, demo = vlm
    out = evaluate_cli(capsys, [str(export), "--data", str(demo), "--max-windows", "5",
                                "--batch-size", "2"])
    lines = out.strip().splitlines()
    assert lines[0] == f"export {export} step 2 on {demo} (val split)"
    assert lines[1].startswith("caption perplexity ") and "nats/caption token" in lines[1]
    assert " caption tokens in 5 samples (of 32) of 16 image + 48 text positions" in lines[2]
    assert lines[3].startswith("real experts per token ") and "; image " in lines[3]
    assert "top-4 over 8 real + 8 null" in lines[3]

    short = evaluate_json(capsys, [str(run_dir), "--max-windows", "5"])
    longer = evaluate_json(capsys, [str(export), "--data", str(demo), "--max-windows", "5"])
    assert (short["seq_length"], longer["seq_length"]) == (VLM_SEQ, 48)
    assert short["samples"] == longer["samples"] == 5
    assert short["tokens"] == longer["tokens"] == int(lines[2].split()[0])
    assert _rel(longer["perplexity"], short["perplexity"]) < 1e-5
    assert longer["real_experts_per_token"] == pytest.approx(short["real_experts_per_token"],
                                                             abs=1e-12)


def test_vlm_bad_inputs_are_refused(vlm, capsys, tmp_path):
    from megatron_nullmoe.inference.evaluate import main

    run_dir, export, demo = vlm
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(export)], "is a VLM export, which names no validation data: give --data DIR (an "
                        "energon image+caption dataset folder)"),
        ([str(run_dir), "--data", str(tmp_path / "val.jsonl")],
         "is a file: " + str(run_dir) + " is a VLM, which evaluates on an energon image+caption "
         "dataset folder"),
        ([str(export), "--data", str(tmp_path / "nope")], "does not exist: give an energon"),
        ([str(export), "--data", str(tmp_path / "empty")], "is not an energon dataset"),
        ([str(run_dir), "--seq-length", "49"],
         "--seq-length 49: give 1 to 48 (the model's max_position_embeddings 64 less 16 image "
         "positions)"),
        ([str(export), "--data", str(demo), "--max-windows", "0"], "--max-windows 0: give 1"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        text = str(exit_.value.code)
        assert text.startswith("evaluate error: ") and message in text, (args, text)


def test_a_gpt_export_refuses_an_energon_folder(trained, vlm):
    from megatron_nullmoe.inference.evaluate import main

    _, gpt_export, _ = trained
    _, _, demo = vlm
    with pytest.raises(SystemExit) as exit_:
        main([str(gpt_export), "--data", str(demo)])
    text = str(exit_.value.code)
    assert text.startswith(f"evaluate error: --data '{demo}' is a folder: give a jsonl file")
    assert f"({gpt_export} is a GPT; energon image+caption dataset folders are for VLMs)" in text


# ----------------------------------------------------------------------------- b. lm-eval
def _lm_eval_pair(sp, bos_text: str, context: str, continuation: str) -> tuple[list, list]:
    """(context ids, continuation ids) as lm_eval's HFLM makes them (TemplateLM.loglikelihood,
    _encode_pair and HFLM.tok_encode, causal backend, add_bos_token unset), from sentencepiece.

    tok_encode lets the tokenizer add <s> unless the string starts with decode(prefix_token_id);
    an empty context becomes the prefix token (<s>) and the continuation is encoded without it.
    """
    from megatron_nullmoe.run.tokenizer import BOS

    def tok_encode(text: str) -> list[int]:
        return ([] if text.startswith(bos_text) else [BOS]) + sp.encode(text)

    if context == "":
        cont = sp.encode(continuation)
        return ([BOS], cont) if cont[0] != BOS else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tok_encode(context + continuation), tok_encode(context)
    return ctx, whole[len(ctx):]


@pytest.fixture(scope="module")
def hflm(trained):
    """lm_eval's HFLM on the export, offline (a module-scoped monkeypatch)."""
    pytest.importorskip("accelerate", reason="lm_eval's HFLM imports accelerate (lm_eval[hf])")
    from lm_eval.models.huggingface import HFLM

    _, export, _ = trained
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield HFLM(pretrained=str(export), trust_remote_code=True, device="cpu", batch_size=1)


REQUESTS = [("the cat", " sat on a mat"), ("dogs run far away from ", "home"),
            ("", "birds sing in trees"), ("the river", " the river the river")]


def test_lm_eval_loglikelihood_equals_the_export_by_hand(trained, hflm):
    from lm_eval.api.instance import Instance

    from megatron_nullmoe.export.source import load_hf
    from megatron_nullmoe.run.tokenizer import BOS, Tokenizer

    _, export, _ = trained
    assert hflm.backend == "causal" and hflm.max_length == 64
    model, hf_tok = load_hf(export)
    sp = Tokenizer(export / "tokenizer.model")
    bos_text = hf_tok.decode(BOS)  # what HFLM.tok_encode compares each string with

    # one continuation that is the export's own greedy next token, so that is_greedy is True once
    for context in ("dogs run far", "the cat sat on", "birds sing in", "the"):
        ctx, _ = _lm_eval_pair(sp, bos_text, context, " x")
        with torch.no_grad():
            best = int(model(torch.tensor([ctx]), use_cache=False).logits[0, -1].argmax())
        greedy_text = sp.decode(sp.encode(context) + [best])[len(context):]
        if greedy_text and _lm_eval_pair(sp, bos_text, context, greedy_text)[1] == [best]:
            break  # a text whose tokens are the context's and then the greedy token
    else:
        pytest.fail("no greedy next token of the export re-encodes to itself")
    pairs = REQUESTS + [(context, greedy_text)]

    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                for i, pair in enumerate(pairs)]
    results = hflm.loglikelihood(requests, disable_tqdm=True)
    assert results[-1][1] is True
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        ctx, cont = _lm_eval_pair(sp, bos_text, context, continuation)
        assert context == "" or hflm._encode_pair(context, continuation) == (ctx, cont)
        ids = torch.tensor([(ctx + cont)[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, use_cache=False).logits.float()[0], -1)
        scored = logp[len(ctx) - 1:]  # the positions that predict the continuation
        expected = float(scored.gather(-1, torch.tensor(cont)[:, None]).sum())
        assert logprob == pytest.approx(expected, abs=1e-4), (context, continuation)
        assert greedy == bool((scored.argmax(-1) == torch.tensor(cont)).all())
    assert any(r[0] < 0 for r in results)


def test_lm_eval_contexts_begin_with_bos_as_training_documents_do(trained, hflm):
    """Every training document begins with <s>: lm_eval must score contexts after it too (it
    prepends <s> unless the text already decodes as starting with it)."""
    from megatron_nullmoe.run.tokenizer import BOS

    ctx, _ = hflm._encode_pair("the cat", " sat")
    assert ctx[0] == BOS
