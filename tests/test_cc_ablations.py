"""Stage-1 ablations (Tables 8, 9, 12): MNTP against a plain reference, unsupervised SimCSE's views, frozen LLM +
stage-1 adaptor, init_from chains, per-record instructions and single-source batches; gradient
accumulation / caching, 2-rank DDP and exact resume for the new objectives."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cc_finetune  # noqa: E402
from cache import EmbeddingCache, model_fingerprint  # noqa: E402
import data  # noqa: E402
import loss as L  # noqa: E402
import model  # noqa: E402
import pipeline  # noqa: E402
from test_cc_finetune import TORCHRUN, _adapter, _args, _encoder_with_lora, _log, _lora_grads, _max_diff, make_tiny, run_killed_after_first_save  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """test_cc_finetune's tiny data and Llama, saved as a causal LM (MNTP needs its LM head)."""
    return make_tiny(tmp_path_factory.mktemp("cc_abl"), lm_head=True)


# -----------------------------------------------------------------------------
# MNTP

def test_mntp_mask_follows_the_80_10_10_rule_per_record(tiny):
    enc = model.load_text_encoder(tiny["model"])
    b = enc.tokenize(tiny["texts"], None, 64)  # 320 captions, ~700 selected tokens
    maskable = b["embed_mask"] * b["attention_mask"]
    mask_id, V = L.mntp_mask_token_id(enc.tokenizer), len(enc.tokenizer)
    assert enc.tokenizer.convert_ids_to_tokens(mask_id) == "_"  # llm2vec's mask for a tokenizer without one
    seeds = list(range(100, 100 + len(tiny["texts"])))
    ids, labels = L.mntp_mask(b["input_ids"], maskable, mask_id, V, 0.2, seeds)
    sel = labels != -100
    assert not (sel & (maskable == 0)).any()  # never the BOS, padding or an instruction
    assert torch.equal(labels[sel], b["input_ids"][sel]) and torch.equal(ids[~sel], b["input_ids"][~sel])
    n = sel.sum().item()
    assert abs(n / maskable.sum().item() - 0.2) < 0.04, n
    masked, kept = (ids[sel] == mask_id).float().mean().item(), (ids[sel] == b["input_ids"][sel]).float().mean().item()
    assert abs(masked - 0.8) < 0.07 and 0.04 < kept < 0.17, (masked, kept)  # the rest: random tokens
    # a record's mask depends on its seed only, not on the batch it sits in or its padding
    one = enc.tokenize(tiny["texts"][5:6], None, 64)
    ids1, lab1 = L.mntp_mask(one["input_ids"], one["embed_mask"], mask_id, V, 0.2, seeds[5:6])
    T = one["input_ids"].shape[1]
    assert torch.equal(ids1[0], ids[5, :T]) and torch.equal(lab1[0], labels[5, :T])


def test_mntp_loss_equals_causal_lm_reference_and_accumulation_is_exact(tiny):
    """Token i predicted from output i-1 through the checkpoint's own LM head, masked positions only:
    equal to HF's LlamaForCausalLM logits shifted by hand. Micro-batch accumulation = full batch."""
    from transformers import AutoModelForCausalLM
    enc = _encoder_with_lora(tiny, dropout=0.0)
    b = enc.tokenize(tiny["texts"][:16], None, 64)
    ids, labels = L.mntp_mask(b["input_ids"], b["embed_mask"], L.mntp_mask_token_id(enc.tokenizer),
                                  len(enc.tokenizer), 0.3, range(16))
    head = L.load_lm_head(tiny["model"], enc.model)
    loss = L.mntp_loss(enc.hidden_states(ids, b["attention_mask"]), labels, head)

    ref_model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    model.enable_bidirectional(ref_model)
    merged = model.merge_lora(_encoder_with_lora(tiny, dropout=0.0).model)  # the same LoRA weights, folded in
    ref_model.model.load_state_dict(merged.state_dict())
    pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = ref_model(input_ids=ids, attention_mask=b["attention_mask"], position_ids=pos).logits  # (B, T, V)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert (labels != -100).sum() > 20 and abs(loss.item() - ref.item()) <= 1e-5, (loss.item(), ref.item())

    # gradients: 4 micro-batches of 4, plain accumulation, equal the one-batch gradient
    b["input_ids"], b["labels"] = ids, labels
    n = (labels != -100).sum().item()
    full = L.mntp_accumulate(lambda c: enc.hidden_states(c["input_ids"], c["attention_mask"]), [b], head, n)
    g_full = _lora_grads(enc)
    chunks = [{k: v[i:i + 4] for k, v in b.items()} for i in range(0, 16, 4)]
    acc = L.mntp_accumulate(lambda c: enc.hidden_states(c["input_ids"], c["attention_mask"]), chunks, head, n)
    assert abs(acc.item() - full.item()) <= 1e-5 and abs(full.item() - loss.item()) <= 1e-5
    assert max(v.abs().max().item() for v in g_full.values()) > 1e-4
    assert _max_diff(g_full, _lora_grads(enc)) <= 1e-6
    assert not any(p.requires_grad for p in [head])  # the LM head is used, never trained


# -----------------------------------------------------------------------------
# unsupervised SimCSE

def test_unsupervised_views_differ_only_by_dropout(tiny):
    ds = data.CaptionPairDataset(data.read_caption_records(tiny["train"]), seed=0)
    idx = list(range(8))
    (q, qi), (d, di) = cc_finetune.step_texts(ds, idx, 0, "unsupervised_simcse", False, cc_finetune.instruction)
    assert q == d and qi == di == [None] * 8  # the same caption, no instruction on either side
    sup = cc_finetune.step_texts(ds, idx, 0, "supervised_simcse", False, cc_finetune.instruction)
    assert sup[0][0] == q and sup[0][1] == [cc_finetune.instruction] * 8 and sup[1][0] != q

    enc = _encoder_with_lora(tiny, dropout=0.0)  # LoRA dropout off: only the model's own dropout acts
    batch = enc.tokenize(q, None, 64)
    assert cc_finetune.set_dropout(enc.model, 0.0) == 2  # Llama: the attention dropout of its 2 layers, nothing else
    torch.manual_seed(0)
    a, b = enc(**batch), enc(**batch)
    assert torch.equal(a, b)
    cc_finetune.set_dropout(enc.model, 0.3)
    assert enc.model.get_base_model().config.attention_dropout == 0.3
    a, b = enc(**batch), enc(**batch)
    assert (a - b).abs().max().item() > 1e-3
    enc.eval()  # dropout is a training-time noise only
    assert torch.equal(enc(**batch), enc(**batch))

    # gradient caching with dropout on: each chunk replays its own masks, the views keep theirs
    enc.train()
    loss_fn = lambda x, y: L.caption_contrastive_loss(x, y, 0.05)  # noqa: E731
    chunks = [enc.tokenize(q[i:i + 4], None, 64) for i in range(0, 8, 4)]
    torch.manual_seed(5)
    ref = loss_fn(torch.cat([enc(**c) for c in chunks]), torch.cat([enc(**c) for c in chunks]))
    ref.backward()
    g_ref = _lora_grads(enc)
    torch.manual_seed(5)
    loss = L.grad_cache_step(lambda c: enc(**c), [chunks, chunks], loss_fn)
    assert abs(loss.item() - ref.item()) <= 1e-5 and _max_diff(g_ref, _lora_grads(enc)) <= 1e-5

    with pytest.raises(ValueError, match=r"unsupervised_simcse needs dropout > 0 \(got -1.0\)"):
        cc_finetune.main(_args(tiny, "unused", objective="unsupervised_simcse"))
    with pytest.raises(ValueError, match=r"objective='simcse': expected one of supervised_simcse, unsupervised_simcse, mntp"):
        cc_finetune.main(_args(tiny, "unused", objective="simcse"))


# -----------------------------------------------------------------------------
# frozen LLM + stage-1 adaptor; init_from

def test_frozen_llm_trains_only_the_adaptor_and_load_applies_it(tiny, tmp_path):
    from safetensors.torch import load_file
    out = str(tmp_path / "frozen")
    res = cc_finetune.main(_args(tiny, out, lora_r=0, cc_adaptor_blocks=1, val_captions=tiny["val"], max_steps=8))
    base = load_file(os.path.join(tiny["model"], "model.safetensors"))
    merged = load_file(os.path.join(out, "merged", "model.safetensors"))
    assert set(merged) == {k[len("model."):] for k in base if k.startswith("model.")}
    assert all(torch.equal(v, base["model." + k]) for k, v in merged.items())  # every LLM weight, bitwise
    assert not os.path.exists(os.path.join(out, "adapter"))
    meta = json.load(open(os.path.join(out, "encoder.json")))
    assert meta["adaptor"] == {"file": "cc_adaptor.pt", "in_dim": 32, "out_dim": 32, "num_blocks": 1, "expansion": 2}
    sd = torch.load(os.path.join(out, "cc_adaptor.pt"), weights_only=True)
    assert "proj.weight" in sd and "LLM frozen, adaptor 1 blocks: 5,376 trainable" in _log(out)

    # load_text_encoder(out_dir) = the frozen LLM's embedding through the trained adaptor
    texts = tiny["texts"][:6]
    loaded, plain = model.load_text_encoder(out), model.load_text_encoder(tiny["model"])
    adaptor = model.Adaptor(32, 32, 1)
    adaptor.load_state_dict(sd)
    assert (loaded.encode(texts) - adaptor(plain.encode(texts))).abs().max().item() <= 1e-5
    assert loaded.dim == 32
    # ... and the adaptor trained: the gate moved although no LLM weight did; it is the saved encoder's
    val = data.read_caption_records(tiny["val"])
    assert res["c2c_after"]["c2c_top1"] == cc_finetune.c2c_eval(loaded, val, cc_finetune.instruction, 64)["c2c_top1"]
    assert res["c2c_after"] != res["c2c_before"]
    # embed_captions.py caches the adaptor's outputs (stage 2 then adds its own adaptor on top)
    import embed_captions
    cache = str(tmp_path / "cache")
    embed_captions.main([f"--text_model={out}", f"--manifest={tiny['val']}", f"--out_dir={cache}", "--fields=captions",
                         "--max_length=64"])
    rows = torch.from_numpy(EmbeddingCache(cache).rows(3, "captions")).float()
    want = loaded.encode(val[3]["captions"], None, 64)
    assert (rows - want).abs().max().item() <= 2e-3 * want.abs().max().item()
    fp = model_fingerprint(out)  # the embedding cache sees a retrained adaptor as another model
    torch.save({k: v + 1 for k, v in sd.items()}, os.path.join(out, "cc_adaptor.pt"))
    assert model_fingerprint(out) != fp
    with pytest.raises(ValueError, match=r"lora_r=0 freezes the LLM: set cc_adaptor_blocks >= 0"):
        cc_finetune.main(_args(tiny, str(tmp_path / "x"), lora_r=0))


def test_init_from_continues_from_the_previous_encoder(tiny, tmp_path, monkeypatch):
    """MNTP then SimCSE: the second run starts from exactly the first run's encoder (LoRA merged,
    fresh LoRA at zero), and its record names the chain."""
    first = str(tmp_path / "mntp")
    r1 = cc_finetune.main(_args(tiny, first, objective="mntp", val_captions=tiny["val"], max_steps=4))
    assert "objective mntp, mask prob 0.2 (80/10/10)" in _log(first) and r1["final_loss"] > 0

    texts, seen = tiny["texts"][:8], []
    orig = cc_finetune.c2c_eval

    def spy(enc, *a, **k):
        if not seen:  # the gate before training
            seen.append(enc.encode(texts, None, 64))
        return orig(enc, *a, **k)

    monkeypatch.setattr(cc_finetune, "c2c_eval", spy)
    second = str(tmp_path / "sup")
    r2 = cc_finetune.main(_args(tiny, second, init_from=first, val_captions=tiny["val"], max_steps=2))
    assert (seen[0] - model.load_text_encoder(first).encode(texts, None, 64)).abs().max().item() <= 1e-5
    assert r2["c2c_before"] == r1["c2c_after"]
    meta = json.load(open(os.path.join(second, "encoder.json")))
    assert meta["base_model"] == tiny["model"] and meta["init_from"] == first and meta["objective"] == "supervised_simcse"
    assert meta["chain"] == [{"out_dir": os.path.abspath(first), "steps": 4, "objective": "mntp"}]
    assert json.load(open(os.path.join(second, "run_cc_finetune.json")))["chain"] == meta["chain"]
    assert f"init_from chain: {tiny['model']} -> mntp 4 steps ({first}) -> supervised_simcse (this run)" in _log(second)
    with pytest.raises(ValueError, match=r"init_from='.*nowhere': no such folder; expected a folder"):
        cc_finetune.main(_args(tiny, str(tmp_path / "x"), init_from=str(tmp_path / "nowhere")))
    os.makedirs(tmp_path / "plain")  # a folder, but no stage-1 out_dir
    with pytest.raises(ValueError, match=r"plain: no encoder.json; expected a cc_finetune.py out_dir"):
        cc_finetune.main(_args(tiny, str(tmp_path / "y"), init_from=str(tmp_path / "plain")))


# -----------------------------------------------------------------------------
# per-record instructions and negatives, single-source batches

def test_source_batch_sampler_never_mixes_and_resumes():
    sizes = [40, 24]
    samplers = [data.SourceBatchSampler(sizes, 8, r, 2, seed=1, max_steps=300) for r in range(2)]
    batches = [list(s) for s in samplers]
    counts = [0, 0]
    for step, (a, b) in enumerate(zip(*batches)):
        k = samplers[0].source_of(step)
        lo, hi = (0, 40) if k == 0 else (40, 64)
        assert len(a) == len(b) == 4 and all(lo <= i < hi for i in a + b) and not set(a) & set(b)
        counts[k] += 1
    assert abs(counts[0] / 300 - 5 / 8) < 0.08  # proportional to each file's full batches (5 and 3)
    # a source's first 3 steps (its epoch: 24 records, batches of 8) visit each of its records once
    own = [a + b for step, (a, b) in enumerate(zip(*batches)) if samplers[0].source_of(step) == 1][:3]
    assert sorted(sum(own, [])) == list(range(40, 64))
    resumed = data.SourceBatchSampler(sizes, 8, 1, 2, seed=1, start_step=123, max_steps=177)
    assert list(resumed) == batches[1][123:]
    weighted = data.SourceBatchSampler(sizes, 8, seed=1, weights=[1, 3])
    assert abs(sum(weighted.source_of(s) for s in range(400)) / 400 - 0.75) < 0.07
    with pytest.raises(data.DataError, match=r"b.jsonl: 24 records, fewer than one global batch of 32"):
        data.SourceBatchSampler(sizes, 32, names=["a.jsonl", "b.jsonl"])


def _pairs_file(path, n):
    path.write_text("".join(json.dumps({"query": f"what is thing {i}", "positive": f"thing {i} is a shape",
                                        "negative": f"not thing {i}",
                                        **({"instruction": "Given a question, retrieve its answer."} if i % 2 else {})})
                            + "\n" for i in range(n)))
    return str(path)


def test_per_record_instruction_is_pooled_around_and_batches_stay_in_one_source(tiny, tmp_path, monkeypatch):
    pairs = _pairs_file(tmp_path / "pairs.jsonl", 16)
    recs = data.read_caption_records(tiny["train"]) + data.read_text_pairs(pairs)
    assert recs[65]["instruction"] == "Given a question, retrieve its answer." and "instruction" not in recs[64]
    ds = data.CaptionPairDataset(recs, seed=0, sources=[(0, 64), (64, 80)])
    caps = cc_finetune.instruction
    (q, qi), (d, di), (h, hi) = cc_finetune.step_texts(ds, [64, 65, 3], 0, "supervised_simcse", True, caps)
    assert q[:2] == ["what is thing 0", "what is thing 1"] and qi == [caps, "Given a question, retrieve its answer.", caps]
    assert h[:2] == ["not thing 0", "not thing 1"] and di == hi == [None] * 3
    assert all(not x.startswith(("what", "thing", "not")) for x in ds.batch(range(64), 1, True)[2])  # caption negatives

    # each row laid out and pooled as if tokenised alone with its own instruction
    enc = model.load_text_encoder(tiny["model"])
    mixed = cc_finetune.tokenize_mixed(enc, q, qi, 64)
    emb = enc(**mixed)
    for i in range(3):
        alone = enc.tokenize([q[i]], qi[i], 64)
        L = alone["input_ids"].shape[1]
        for k in alone:
            assert torch.equal(mixed[k][i, :L], alone[k][0])
            assert k == "input_ids" or not mixed[k][i, L:].any()  # padding: neither attended nor pooled
        n_instr = len(enc.tokenizer(qi[i], add_special_tokens=False)["input_ids"])
        assert alone["embed_mask"][0, 1:1 + n_instr].sum() == 0  # the instruction is attended, not pooled
        assert (emb[i] - enc.encode([q[i]], qi[i], 64)[0]).abs().max().item() <= 1e-5
    assert (enc.encode([q[1]], caps, 64) - emb[1]).abs().max().item() > 1e-4  # the record's own, not the default

    # end to end: every step's batch from one file, pure-text steps with their own negatives
    seen = []
    orig = cc_finetune.step_texts
    monkeypatch.setattr(cc_finetune, "step_texts", lambda ds_, idx, *a: seen.append(list(idx)) or orig(ds_, idx, *a))
    out = str(tmp_path / "run")
    cc_finetune.main(_args(tiny, out, train_pairs=pairs, single_source_batches=True, source_weights="1,1",
                           hard_negatives=True, max_steps=6))
    steps = seen
    assert len(steps) == 6 and all(max(s) < 64 or min(s) >= 64 for s in steps)
    assert any(min(s) >= 64 for s in steps) and any(max(s) < 64 for s in steps)
    assert "one source per batch:" in _log(out) and "weights [1.0, 1.0]" in _log(out)
    with pytest.raises(ValueError, match=r"source_weights: a share of batches per file needs single_source_batches=True"):
        cc_finetune.main(_args(tiny, out, train_pairs=pairs, source_weights="1,1"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "positive": "p", "instruction": ""}) + "\n")
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: \"instruction\" is ''; expected a non-empty string"):
        data.read_text_pairs(str(bad))


# -----------------------------------------------------------------------------
# DDP and resume for the new objectives

def test_mntp_torchrun_two_ranks_equals_single_process(tiny, tmp_path):
    """The loss is a mean over the global batch's masked tokens: 2 ranks x 8 (micro-batches of 4) =
    one process x 16; masks are per record, so the same tokens are masked."""
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    over = dict(objective="mntp", max_steps=2, micro_batch_size=4)
    cc_finetune.main(_args(tiny, single, **over))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run([TORCHRUN, "--nproc_per_node=2", "--standalone", os.path.join(REPO, "cc_finetune.py"),
                           *_args(tiny, multi, **over)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch 16 (2 ranks x 8), 2 micro-batches of <= 4 per rank" in _log(multi)
    assert _max_diff(_adapter(single), _adapter(multi)) <= 1e-5
    loss = lambda d: [ln for ln in _log(d).splitlines() if ln.startswith("step 2/2")]  # noqa: E731
    assert loss(single)[0].split(",")[0] == loss(multi)[0].split(",")[0]


@pytest.mark.parametrize("over", [dict(objective="mntp", lora_dropout=0.1),
                                  dict(objective="unsupervised_simcse", dropout=0.2, lora_r=0, cc_adaptor_blocks=1)],
                         ids=["mntp", "unsup_frozen_adaptor"])
def test_resume_is_exact_for_new_objectives(tiny, tmp_path, monkeypatch, over):
    ref = str(tmp_path / "ref")
    cc_finetune.main(_args(tiny, ref, max_steps=5, **over))
    out = str(tmp_path / "b")
    run_killed_after_first_save(monkeypatch, _args(tiny, out, max_steps=5, save_interval=2, **over))
    cc_finetune.main(_args(tiny, out, max_steps=5, save_interval=2, resume=True, **over))
    assert "steps 2 -> 5 (resumed from" in _log(out)
    if over.get("lora_r") == 0:
        a, b = (torch.load(os.path.join(d, "cc_adaptor.pt"), weights_only=True) for d in (ref, out))
        assert _max_diff(a, b) <= 1e-6
    else:
        assert _max_diff(_adapter(ref), _adapter(out)) <= 1e-6


def test_pipeline_ablate_stage1_runs_every_row(tmp_path, monkeypatch):
    """`python pipeline.py --stage1_ablations=True` at its smallest: every Table 9 row, results read back."""
    monkeypatch.chdir(REPO)  # the rows use config/cc_tiny_cpu.py
    rows = pipeline.main([f"--out_dir={tmp_path}", "--num_train=64", "--num_val=16", "--num_test=4", "--image_size=16",
                          "--cc_steps=1", "--stage1_ablations=True"])
    saved = json.load(open(tmp_path / "ablate_stage1" / "results.json"))["rows"]
    assert saved == rows and [r["row"] for r in rows] == [name for name, _ in pipeline.STAGE1_ABLATIONS]
    by = {r["row"]: r for r in rows}
    assert by["MNTP, then supervised SimCSE"]["c2c_before"] == by["MNTP"]["c2c_after"]  # the chain starts there
    assert by["MNTP, then supervised SimCSE"]["overrides"]["init_from"] == str(tmp_path / "ablate_stage1" / "MNTP")
    meta = json.load(open(tmp_path / "ablate_stage1" / "frozen_LLM_plus_4-block_adaptor" / "encoder.json"))
    assert meta["adaptor"]["num_blocks"] == 4 and meta["lora"]["r"] == 0
