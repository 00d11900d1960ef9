"""post_train.py end to end on the synthetic shapes data with a tiny text model's cache (CPU).

One module fixture builds the data, the tiny LLM, its embed_captions.py cache and one trained run;
the other tests compare short runs against each other: 2 ranks vs 1, gradient caching vs one pass,
killed + resumed vs uninterrupted, online LLM vs cache, tar shards vs manifest, and bad input.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from cache import EmbeddingCache  # noqa: E402
import data  # noqa: E402
import data_index  # noqa: E402
import model as M  # noqa: E402
import pipeline  # noqa: E402
from conftest import overflow_at, stage2_world  # noqa: E402
import post_train  # noqa: E402

torch.set_num_threads(1)
PRESET = os.path.join(ROOT, "config", "post_tiny_cpu.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return stage2_world(tmp_path_factory.mktemp("post"), 128, 48)


DEFAULTS = {k: getattr(post_train, k) for k in post_train.config_keys}  # the resolved config of no overrides


def args(w, out, *extra):
    return [PRESET, f"--train_manifest={w.train}", f"--cache_dir={w.cache}", "--val_manifest=", f"--out_dir={out}",
            "--num_workers=0", "--batch_size=16", "--log_interval=1", "--warmup_steps=2", "--max_steps=1",
            "--save_interval=1000", *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r for r in rows if "eval" in r]


def final_state(out):
    path = common.checkpoint_paths(str(out))[-1]
    return torch.load(path, map_location="cpu", weights_only=True)


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def trained(w):
    """One single-process run of the tiny preset with the held-out eval at the start and the end."""
    out = w.dir / "trained"
    post_train.main(args(w, out, "--batch_size=32", "--max_steps=60", "--warmup_steps=10", f"--val_manifest={w.val}",
                         "--eval_field=long_captions", "--eval_interval=60", "--log_interval=10"))
    return out


# --- must show 1: trains end to end, retrieval rises well above chance

def test_tiny_preset_trains_single_process(w, trained):
    losses, evals = metrics(trained)
    first, last = evals[0]["eval"], evals[-1]["eval"]
    chance = 100 / 48
    print("single process:", {k: round(v, 2) for k, v in last.items()}, "from", {k: round(v, 2) for k, v in first.items()})
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert losses[60] < losses[10] - 0.3
    for k in ("i2t_R@1", "t2i_R@1"):
        assert last[k] >= 3 * chance and last[k] > first[k], (k, first[k], last[k])
    info = json.load(open(trained / "run_post_train.json"))
    assert info["config"]["max_steps"] == 60 and info["code_version"]


# --- must show 1 + 2: torchrun 2 ranks (gloo) trains, and its first step equals 1 process x the full batch

def test_torchrun_two_ranks_equals_one_process(w, tmp_path):
    out2 = tmp_path / "ddp"
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "post_train.py"),
           *args(w, out2, "--max_steps=100", "--micro_batch_size=4", "--save_interval=1", "--keep_checkpoints=0",
                 "--num_workers=1", f"--val_manifest={w.val}", f"--val_cache_dir={w.val_cache}",
                 "--eval_field=long_captions", "--eval_interval=100")]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _, evals = metrics(out2)
    print("torchrun x2:", {k: round(v, 2) for k, v in evals[-1]["eval"].items()})
    for k in ("i2t_R@1", "t2i_R@1"):
        assert evals[-1]["eval"][k] >= 2 * 100 / 48 and evals[-1]["eval"][k] > evals[0]["eval"][k]
    # one step: 2 ranks x batch 8 (each 2 gradient-cache chunks of 4) vs 1 process x batch 16 in one pass
    out1 = tmp_path / "single"
    post_train.main(args(w, out1))
    two = torch.load(out2 / "checkpoints" / "step_00000001.pt", weights_only=True)
    one = final_state(out1)
    assert one["step"] == two["step"] == 1
    d = max_diff(one["model"], two["model"])
    print("2x8 vs 1x16 max |dw| after one step:", d)
    assert d <= 1e-5


def test_gradient_cache_equals_one_pass(w, tmp_path):
    post_train.main(args(w, tmp_path / "a"))
    post_train.main(args(w, tmp_path / "b", "--micro_batch_size=4"))
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert metrics(tmp_path / "a")[0][1] == pytest.approx(metrics(tmp_path / "b")[0][1], abs=1e-6)
    assert max_diff(a["model"], b["model"]) <= 1e-5


# --- must show 3: SIGKILL after step k, resume, same weights as an uninterrupted run

KILL_AFTER = """
import os, signal, sys
import common, post_train
save = common.Checkpoints.save
def save_then_die(self, step, state):
    path = save(self, step, state)
    if step == {k}:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
common.Checkpoints.save = save_then_die
post_train.main(sys.argv[1:])
"""


def test_exact_resume_after_sigkill(w, tmp_path):
    extra = ("--max_steps=6", "--save_interval=2", "--num_workers=2", "--batch_size=32")  # 4 steps per epoch
    post_train.main(args(w, tmp_path / "full", *extra))
    out = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", KILL_AFTER.format(k=4), *args(w, out, *extra)], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stderr[-2000:]
    assert [os.path.basename(p) for p in common.checkpoint_paths(str(out))] == ["step_00000002.pt", "step_00000004.pt"]
    post_train.main(args(w, out, *extra, "--resume=True"))
    full, resumed = final_state(tmp_path / "full"), final_state(out)
    assert resumed["step"] == 6
    assert max_diff(full["model"], resumed["model"]) == 0  # bitwise on CPU
    opt_full, opt_res = full["optimizer"]["state"], resumed["optimizer"]["state"]
    assert all(torch.equal(opt_full[i]["exp_avg_sq"], opt_res[i]["exp_avg_sq"]) for i in opt_full)
    # the per-step losses (which depend on every caption choice and crop) replay exactly, also across the epoch
    lf, lr_ = metrics(tmp_path / "full")[0], metrics(out)[0]
    assert [lf[s] for s in range(1, 7)] == [lr_[s] for s in range(1, 7)]


# --- float16 with dynamic loss scaling, bfloat16: honoured on CPU when given (the default stays float32 there)

class _Stop(Exception):
    """Raised right after a checkpoint is written: the run dies there."""


def test_float16_loss_scaling_skips_overflows_and_resumes_bitwise(w, tmp_path, monkeypatch, capsys):
    """dtype=float16 on CPU: a step whose gradients overflow is skipped (weights and optimizer untouched,
    the scale halved), counted and logged, and training goes on; metrics.jsonl carries loss_scale and
    skipped_steps; interrupted after step 2 and resumed, the run equals the uninterrupted one bitwise,
    the loss scaler's state included. bfloat16 runs too (no scaler), and the default stays float32."""
    extra = ("--dtype=float16", "--max_steps=4", "--save_interval=1", "--keep_checkpoints=0")
    post_train.main(args(w, tmp_path / "plain", *extra))
    calls = overflow_at(monkeypatch, {2})
    post_train.main(args(w, tmp_path / "full", *extra))
    assert "float16 on cpu with dynamic loss scaling" in capsys.readouterr().out and len(calls) == 4
    cks = {d: [torch.load(p, weights_only=True) for p in common.checkpoint_paths(str(tmp_path / d))] for d in ("plain", "full")}
    plain, full = cks["plain"], cks["full"]
    assert max_diff(plain[2]["model"], plain[1]["model"]) > 0  # step 3 trains without the overflow ...
    assert max_diff(full[2]["model"], full[1]["model"]) == 0  # ... and is skipped with it
    assert full[2]["optimizer"]["state"][0]["step"] == full[1]["optimizer"]["state"][0]["step"]
    assert full[2]["skipped_steps"] == plain[2]["skipped_steps"] + 1 and full[2]["scaler"]["scale"] == plain[2]["scaler"]["scale"] / 2
    assert "step 3: float16 gradients overflowed, step skipped" in open(tmp_path / "full" / "post_train.log").read()
    rows = [json.loads(ln) for ln in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [c["skipped_steps"] for c in full]
    assert all(r["loss_scale"] == c["scaler"]["scale"] and np.isfinite(r["loss"]) for r, c in zip(rows, full))
    # killed after the step-2 checkpoint, resumed: the same trajectory, the scaler's scale and growth counter too
    save = common.Checkpoints.save

    def save_then_stop(self, step, state):
        path = save(self, step, state)
        if step == 2:
            raise _Stop
        return path
    monkeypatch.setattr(common.Checkpoints, "save", save_then_stop)
    calls.clear()
    with pytest.raises(_Stop):
        post_train.main(args(w, tmp_path / "resumed", *extra))
    monkeypatch.setattr(common.Checkpoints, "save", save)
    assert len(calls) == 2  # so the resumed run's first step (step 2) overflows, as in the uninterrupted run
    post_train.main(args(w, tmp_path / "resumed", *extra, "--resume=True"))
    resumed = final_state(tmp_path / "resumed")
    assert max_diff(full[-1]["model"], resumed["model"]) == 0 and resumed["scaler"] == full[-1]["scaler"]
    assert resumed["skipped_steps"] == full[-1]["skipped_steps"] and resumed["scaler"]["scale"] != 2.0 ** 16
    assert all(torch.equal(full[-1]["optimizer"]["state"][i]["exp_avg_sq"], resumed["optimizer"]["state"][i]["exp_avg_sq"])
               for i in resumed["optimizer"]["state"])
    assert metrics(tmp_path / "full")[0] == metrics(tmp_path / "resumed")[0]  # every step's loss
    # bfloat16 autocast on CPU when asked for (no scaler), float32 by default ("auto")
    post_train.main(args(w, tmp_path / "bf16", "--dtype=bfloat16", "--max_steps=2"))
    post_train.main(args(w, tmp_path / "auto", "--dtype=auto", "--max_steps=2"))
    post_train.main(args(w, tmp_path / "fp32", "--max_steps=2"))
    bf16, auto, fp32 = (metrics(tmp_path / d)[0] for d in ("bf16", "auto", "fp32"))
    assert auto == fp32 and 0 < abs(bf16[2] - fp32[2]) < 0.1 and final_state(tmp_path / "bf16")["scaler"] == {}
    assert common.resolve_dtype("auto", "cpu")[0] == torch.float32


def test_float16_refusals_nan_loss_and_overflow_at_every_scale(w, tmp_path, monkeypatch):
    """The divergence rules with the scaler: a non-finite loss (float32, unscaled) still stops the run at once;
    gradients that overflow step after step drive the scale below common.MIN_LOSS_SCALE, which stops it too."""
    monkeypatch.setattr(common, "MIN_LOSS_SCALE", 2.0 ** 13)  # from 2^16, the fourth overflow in a row is below it
    overflow_at(monkeypatch, set(range(100)))
    with pytest.raises(FloatingPointError, match=r"float16 gradients overflow at every loss scale \(now 4096 < 8192\) "
                                                 r"at step 3; last good checkpoint: .*step_00000003.pt: the run diverged"):
        post_train.main(args(w, tmp_path / "a", "--dtype=float16", "--max_steps=5", "--save_interval=1"))
    real = post_train.L.grad_cache_step
    monkeypatch.setattr(post_train.L, "grad_cache_step", lambda *a, **kw: real(*a, **kw) * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 0"):
        post_train.main(args(w, tmp_path / "b", "--dtype=float16"))


def test_caption_choice_is_a_function_of_seed_epoch_record():
    rec = {"captions": ["real a", "real b"], "long_captions": ["long a", "long b", "long c"]}
    picks = [data.choose_caption(rec, data.sample_rng(0, e, r), 0.5) for e in range(20) for r in range(100)]
    again = [data.choose_caption(rec, data.sample_rng(0, e, r), 0.5) for e in range(20) for r in range(100)]
    assert picks == again
    real = sum(f == "captions" for f, _ in picks) / len(picks)
    assert 0.45 < real < 0.55
    assert {s for f, s in picks if f == "long_captions"} == {0, 1, 2}
    assert picks[:100] != picks[100:200]  # a new epoch draws new captions
    assert all(f == "long_captions" for f, _ in (data.choose_caption(rec, data.sample_rng(0, 0, r), 0.0) for r in range(50)))


def test_crop_boxes_stay_inside_with_the_requested_area():
    for r in range(200):
        rng = data.sample_rng(0, 0, r)
        W, H = [(64, 64), (80, 48), (40, 90)][r % 3]
        top, left, h, w = data.random_resized_crop_params(W, H, rng, scale=(0.9, 1.0))
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
        if W == H:  # square images never need the fallback: the area is in the scale range (up to rounding)
            assert 0.87 <= h * w / (W * H) <= 1.0
    a = [data.random_resized_crop_params(64, 64, data.sample_rng(1, 2, 3)) for _ in range(2)]
    assert a[0] == a[1]


# --- must show 4: the frozen LLM online gives the loss of the cache

def test_online_text_matches_cache(w, tmp_path):
    post_train.main(args(w, tmp_path / "cache"))
    post_train.main(args(w, tmp_path / "online", "--text_source=online"))
    a, b = metrics(tmp_path / "cache")[0][1], metrics(tmp_path / "online")[0][1]
    print("loss cache", a, "online", b)
    assert abs(a - b) <= 1e-3


# --- WebDataset tar shards: the same records as the manifest give the same step

def test_tar_shards_match_manifest(w, tmp_path):
    records = data.read_manifest(w.train)
    for s in range(2):  # two shards, img2dataset layout: key.png + key.json (+ key.txt)
        with tarfile.open(tmp_path / f"{s:05d}.tar", "w") as tf:
            for i in range(s * 64, (s + 1) * 64):
                key = f"{i:09d}"
                tf.add(records[i]["image"], arcname=f"{key}.png")
                meta = json.dumps({"captions": records[i]["captions"], "long_captions": records[i]["long_captions"]})
                (tmp_path / "m.json").write_text(meta)
                tf.add(tmp_path / "m.json", arcname=f"{key}.json")
                (tmp_path / "m.txt").write_text(records[i]["captions"][0])
                tf.add(tmp_path / "m.txt", arcname=f"{key}.txt")
    shards = [r for r in data_index.index_tar_shards(data_index.expand_shards(str(tmp_path / "{00000..00001}.tar")))]
    assert [(r["captions"], r["long_captions"]) for r in shards] == [(r["captions"], r["long_captions"]) for r in records]
    post_train.main(args(w, tmp_path / "m"))
    post_train.main(args(w, tmp_path / "t", "--train_manifest=", f"--train_shards={tmp_path}/*.tar", "--num_workers=2"))
    assert metrics(tmp_path / "m")[0][1] == metrics(tmp_path / "t")[0][1]
    assert max_diff(final_state(tmp_path / "m")["model"], final_state(tmp_path / "t")["model"]) == 0


# --- must show 5: bad input stops with a message saying what differs

@pytest.fixture()
def broken(w, tmp_path):
    """A copy of the training data with image 5 missing and image 40 corrupt (same manifest, same cache)."""
    d = tmp_path / "broken"
    shutil.copytree(os.path.dirname(w.train), d)
    recs = [o for _, o in data.read_jsonl(w.train)]
    missing, corrupt = d / recs[5]["image"], d / recs[40]["image"]
    os.remove(missing)
    corrupt.write_bytes(b"not a png at all")
    return d / "train.jsonl", str(missing), str(corrupt)


def test_bad_images_error_with_path_or_are_skipped_and_counted(w, tmp_path, broken, capsys):
    manifest, missing, corrupt = broken
    with pytest.raises(data.DataError, match=re.escape(missing)):  # found before any training
        post_train.main(args(w, tmp_path / "a", f"--train_manifest={manifest}"))
    os.symlink(missing.replace("000005", "000006"), missing)  # now only the corrupt one is left
    with pytest.raises(data.DataError, match=re.escape(corrupt) + ".*skip_bad_images"):  # raised in a worker
        post_train.main(args(w, tmp_path / "b", f"--train_manifest={manifest}", "--max_steps=8", "--num_workers=1"))
    os.remove(missing)
    capsys.readouterr()
    res = post_train.main(args(w, tmp_path / "c", f"--train_manifest={manifest}", "--max_steps=8",
                               "--skip_bad_images=True"))  # 8 steps x 16 = every record once
    assert res["bad_images"] == 2
    log = capsys.readouterr().out
    assert "skipped 2 bad images" in log and missing in log and corrupt in log


def test_cache_from_another_manifest_or_encoder_is_refused(w, tmp_path):
    with pytest.raises(data.DataError, match=r"stale for .*train.jsonl: the manifest has 128 records .* the cache 48"):
        post_train.main(args(w, tmp_path / "a", f"--cache_dir={w.val_cache}"))
    other = pipeline.build_tiny_text_model(str(tmp_path / "other_llm"), texts=[" ".join(data.synthetic_vocabulary())] * 8,
                                           seed=1)
    with pytest.raises(data.DataError, match=r"different encoder settings: model: cache .*llm', expected .*other_llm'"):
        post_train.main(args(w, tmp_path / "b", f"--text_model={other}"))


def test_checkpoint_from_another_config_is_refused(w, tmp_path):
    post_train.main(args(w, tmp_path))
    with pytest.raises(ValueError, match=r"learning_rate \(checkpoint 0.001, now 0.002\)"):
        post_train.main(args(w, tmp_path, "--max_steps=2", "--resume=True", "--learning_rate=0.002"))


def test_unknown_config_key(w, tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'lrate'"):
        post_train.main(args(w, tmp_path, "--lrate=1"))
    with pytest.raises(ValueError, match="config key 'lr' was renamed to 'learning_rate'"):  # an old name
        post_train.main(args(w, tmp_path, "--lr=1"))


def test_nan_loss_names_step_and_checkpoint(w, tmp_path):
    cache = tmp_path / "nan_cache"
    shutil.copytree(w.cache, cache)
    emb = np.load(cache / "embeddings.npy", mmap_mode="r+")
    sampler = data.ResumableBatchSampler(128, 16, seed=0)
    r = sampler.indices(2)[0]  # a record of step 2 (0-based): steps 0 and 1 run, are checkpointed
    off = np.load(cache / "index.npz")["record_offsets"]
    emb[off[r]:off[r + 1]] = np.nan
    emb.flush()
    del emb
    # named when read, not steps later as a non-finite loss
    with pytest.raises(data.DataError, match=rf"embeddings.npy: row \d+ is not finite: record {r} \(.*train.jsonl:{r + 1}, "):
        post_train.main(args(w, tmp_path / "o", f"--cache_dir={cache}", "--max_steps=4", "--save_interval=1"))


# --- optimiser groups and presets

def test_param_groups_layer_decay_and_no_weight_decay():
    vision = M.VisionTower("vit_tiny_patch16_224", embed_dim=16, timm_kwargs=dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2))
    net = M.LLM2CLIP(vision, 32, adaptor_blocks=1)
    cfg = {**DEFAULTS, "weight_decay": 0.05, "layer_decay": 0.5}
    groups = post_train.param_groups(net, cfg)
    names = {id(p): n for n, p in net.named_parameters()}
    scale = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(scale) == len(names)  # every parameter exactly once
    assert scale["vision.model.blocks.2.attn.qkv.weight"] == (0.5, 0.05)
    assert scale["vision.model.blocks.0.attn.qkv.weight"] == (0.125, 0.05)
    assert scale["vision.model.patch_embed.proj.weight"][0] == 0.0625 and scale["vision.model.head.weight"] == (1.0, 0.05)
    for n in ("logit_scale", "vision.model.pos_embed", "vision.model.cls_token", "vision.model.blocks.1.norm1.weight",
              "vision.model.blocks.1.mlp.fc1.bias", "adaptor.proj.bias", "adaptor.norm.weight"):
        assert scale[n][1] == 0.0, n
    assert scale["adaptor.proj.weight"] == (1.0, 0.05)


def test_paper_presets_resolve():
    import glob as g
    import timm
    presets = sorted(g.glob(os.path.join(ROOT, "config", "post_*.py")))
    defaults = {k: getattr(post_train, k) for k in post_train.config_keys}
    names = set()
    for path in presets:
        cfg = post_train.common.configure(defaults, [path])
        names.add(cfg["vision_model"])
        assert timm.is_model(cfg["vision_model"].split(".")[0]) and (cfg["pretrained"] is False or cfg["vision_model"] in timm.list_pretrained()), path
    assert {"vit_large_patch14_clip_224.openai", "vit_large_patch14_clip_336.openai",
            "eva02_large_patch14_clip_224.merged2b", "vit_so400m_patch14_siglip_224.v2_webli"} <= names


# --- must show 6: the export loads into timm and load_llm2clip reproduces the training model

def test_export_loads_in_timm_and_load_llm2clip(w, trained):
    import timm
    meta = json.load(open(trained / "llm2clip.json"))
    vit = timm.create_model(meta["vision"]["model_name"], pretrained=False, **meta["vision"]["timm_kwargs"])
    vit.load_state_dict(torch.load(trained / "vision_tower.pt", weights_only=True), strict=True)
    # the training model, rebuilt from the last checkpoint
    ck = final_state(trained)
    cfg = ck["config"]
    vision = M.VisionTower(cfg["vision_model"], embed_dim=cfg["embed_dim"], timm_kwargs=cfg["timm_kwargs"])
    cache = EmbeddingCache(w.val_cache)
    net = M.LLM2CLIP(vision, cache.dim, cfg["adaptor_blocks"], cfg["adaptor_expansion"])
    net.load_state_dict(ck["model"])  # stage 2 trains every weight of this model: its checkpoint holds them all
    net.eval()
    image_enc, text_enc = M.load_llm2clip(str(trained))
    recs = data.read_manifest(w.val)[:8]
    tf = data.eval_transform(vision.data_config)
    x = torch.stack([tf(data.open_image(r)) for r in recs])
    with torch.no_grad():
        assert torch.allclose(image_enc(x), net.encode_image(x), atol=1e-6)
        assert torch.allclose(vit(x), vision(x), atol=1e-6)
        texts = [r["long_captions"][0] for r in recs]
        rows = torch.from_numpy(np.stack([cache.get(i, "long_captions", 0) for i in range(8)]).astype(np.float32))
        trained_txt = net.encode_text(rows)
        assert torch.allclose(text_enc.encode_embeddings(rows), trained_txt, atol=1e-6)
        online = text_enc.encode(texts)  # raw strings through the stage-1 LLM: only the fp16 cache rounding differs
        assert (online - trained_txt).abs().max().item() < 5e-3
    assert meta["logit_scale"] == pytest.approx(ck["model"]["logit_scale"].exp().item())
    assert image_enc.logit_scale == meta["logit_scale"] and meta["format_version"] == 1


COPIED = """
import sys, numpy as np, torch
import model  # the copy in this folder, nothing else of the repository
torch.set_num_threads(int(sys.argv[6]))  # the same reduction order as the test process
img, txt = model.load_llm2clip(sys.argv[1])
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.savez(sys.argv[3], image=img(x).numpy(), text=txt.encode(sys.argv[4].split("|")).numpy())
ours = {"common", "loss", "zoo", "data", "cache", "data_index", "metrics", "post_train", "cc_finetune"}
assert not ours & set(sys.modules) and model.__file__.startswith(sys.argv[5]), (ours & set(sys.modules), model.__file__)
"""


def test_model_py_copied_alone_loads_the_export_bitwise(w, trained, tmp_path):
    """model.py is what a user copies: alone in an empty folder (no other file of the repository on the
    path) it loads a stage-2 export and gives bitwise the embeddings it gives here."""
    import shutil
    import subprocess
    import sys
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, "model.py"), alone / "model.py")
    recs = data.read_manifest(w.val)[:6]
    image_enc, text_enc = M.load_llm2clip(str(trained))
    x = torch.stack([data.eval_transform(image_enc.data_config)(data.open_image(r)) for r in recs])
    np.save(tmp_path / "x.npy", x.numpy())
    texts = [r["long_captions"][0] for r in recs]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", COPIED, str(trained), str(tmp_path / "x.npy"), str(tmp_path / "o.npz"),
                           "|".join(texts), str(alone), str(torch.get_num_threads())], cwd=alone, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "o.npz")
    with torch.no_grad():
        assert np.array_equal(got["image"], image_enc(x).numpy())
        assert np.array_equal(got["text"], text_enc.encode(texts).numpy())


def test_model_py_imports_only_its_declared_dependencies():
    import ast
    tree = ast.parse(open(os.path.join(ROOT, "model.py")).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    import sys
    assert names - set(sys.stdlib_module_names) <= {"torch", "transformers", "peft", "timm", "numpy"}, names
    # a file read in one sitting: the chat wrappings of five LLM families and SigLIP's bias grew it past 750
    assert len(open(os.path.join(ROOT, "model.py")).read().splitlines()) <= 860


def test_zero_steps_exports_the_untrained_model(w, tmp_path):
    """pipeline.py's baseline row: max_steps=0 exports the initial model (same init for the same seed)."""
    res = post_train.main(args(w, tmp_path / "z", "--max_steps=0"))
    assert res["step"] == 0 and common.checkpoint_paths(str(tmp_path / "z")) == []
    image_enc, _ = M.load_llm2clip(str(tmp_path / "z"), load_text=False)
    torch.manual_seed(0)
    cfg = post_train.common.configure({k: getattr(post_train, k) for k in post_train.config_keys}, [PRESET])
    fresh = M.VisionTower(cfg["vision_model"], embed_dim=cfg["embed_dim"], timm_kwargs=cfg["timm_kwargs"])
    assert max_diff(fresh.model.state_dict(), image_enc.vision.model.state_dict()) == 0


def test_evaluate_scores_the_export_as_training_did(w, trained, tmp_path):
    """evaluate.py on the exported out_dir reproduces post_train's own held-out eval at the last step."""
    import evaluate
    payload = evaluate.main(["--task=retrieval", f"--model={trained}", f"--data={w.val}", "--caption_field=long_captions",
                             "--captions_per_image=0", "--num_workers=0"])
    (scores,) = payload["results"][str(trained)].values()
    final = metrics(trained)[1][-1]["eval"]
    for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert scores[k] == pytest.approx(final[k], abs=1e-9), k


def test_baseline_clip_and_post_trained_export_side_by_side(w, trained, tiny_clip, tmp_path, capsys):
    """A real post_train.py export and a random baseline CLIPModel (own text tower) go
    through the same evaluate.py command into one table; the JSON matches the printed rows."""
    import evaluate
    out = tmp_path / "res.json"
    evaluate.main(["--task=retrieval", f"--model={tiny_clip},{trained}", f"--data={w.val}",
                   "--caption_field=long_captions", "--captions_per_image=0", "--num_workers=0", f"--out={out}"])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert list(res["results"]) == [tiny_clip, str(trained)]
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| model") and len(rows) == 3
    for name, row in zip(res["results"], rows[1:]):
        (m,) = res["results"][name].values()
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == name and float(cells[1]) == pytest.approx(m["i2t_R@1"], abs=0.05)
        assert float(cells[2]) == pytest.approx(m["t2i_R@1"], abs=0.05)
    (trained_scores,) = res["results"][str(trained)].values()
    (base_scores,) = res["results"][tiny_clip].values()
    assert trained_scores["t2i_R@1"] > base_scores["t2i_R@1"]  # the trained tower beats a random CLIP


# --- the logit scale starts where the pretrained CLIP's is and can be given its own lr

def test_logit_scale_starts_at_the_pretrained_value_and_reaches_the_clamp(w, tmp_path):
    import math
    defaults = {k: getattr(post_train, k) for k in post_train.config_keys}
    for name in ("post_clip_vitl14_224.py", "post_clip_vitl14_336.py", "post_eva02_l14.py",
                 "post_official_eva02_l14_336.py"):
        cfg = post_train.common.configure(defaults, [os.path.join(ROOT, "config", name)])
        assert math.exp(cfg["logit_scale_init"]) == pytest.approx(100.0), name  # OpenAI / EVA02-CLIP: x100
        net = M.LLM2CLIP(M.VisionTower("vit_tiny_patch16_224", embed_dim=8, timm_kwargs=dict(
            img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=1)), 8, 0, logit_scale_init=cfg["logit_scale_init"])
        assert net(torch.zeros(1, 3, 16, 16), torch.ones(1, 8))["logit_scale"].item() == pytest.approx(100.0)
    # the tiny preset (from scratch, x14.3): with its own lr the scale moves in a short run; at the base lr it barely does
    runs = {}
    for scale_lr in (0.0, 0.05):
        out = tmp_path / f"scale{scale_lr}"
        post_train.main(args(w, out, "--batch_size=32", "--max_steps=20", "--warmup_steps=0", f"--logit_scale_lr={scale_lr}"))
        runs[scale_lr] = [json.loads(ln)["logit_scale"] for ln in open(out / "metrics.jsonl") if '"logit_scale"' in ln]
    print("logit scale per step:", {k: [round(s, 2) for s in v] for k, v in runs.items()})
    moved = {k: abs(math.log(v[-1] * 0.07)) for k, v in runs.items()}  # |ln(scale / 14.3)|
    assert moved[0.0] < 0.02 and moved[0.05] > 0.3
    # where the gradient pushes it up, the scale reaches ln(100) and is held there by the clamp
    net.logit_scale.data.fill_(math.log(90))
    cfg = {**cfg, "logit_scale_lr": 1e-2}
    opt = torch.optim.AdamW(post_train.param_groups(net, cfg), lr=cfg["learning_rate"])
    for g in opt.param_groups:
        g["lr"] = cfg["learning_rate"] * g["lr_scale"]
    seen = []
    for _ in range(20):
        (-net.logit_scale).backward()  # a loss that always wants a larger scale
        post_train.optimizer_step(net, opt, cfg)
        seen.append(net.logit_scale.exp().item())
    assert seen[0] > 90 and seen[-1] == pytest.approx(100.0, abs=1e-4) and max(seen) <= 100.0 + 1e-4
    (g,) = [g for g in post_train.param_groups(net, cfg) if any(p is net.logit_scale for p in g["params"])]
    assert len(g["params"]) == 1 and g["lr_scale"] == pytest.approx(1e-2 / cfg["learning_rate"]) and g["weight_decay"] == 0


def test_siglip2_preset_keeps_its_pooled_1152d_output():
    """The official SigLIP2 config keeps the attention-pool output (embed_dim 1152, no
    projection); the preset builds the tower with no new Linear head."""
    import timm
    defaults = {k: getattr(post_train, k) for k in post_train.config_keys}
    cfg = post_train.common.configure(defaults, [os.path.join(ROOT, "config", "post_siglip2_so400m.py")])
    tiny = dict(img_size=28, depth=1)  # the real width (1152), one block, two patches a side
    vision = M.VisionTower(cfg["vision_model"], embed_dim=None if cfg["embed_dim"] < 0 else cfg["embed_dim"],
                           timm_kwargs=tiny)
    assert vision.output_dim == 1152 and vision(torch.zeros(1, 3, 28, 28)).shape == (1, 1152)
    assert isinstance(vision.model.head, torch.nn.Identity)
    plain = timm.create_model(cfg["vision_model"], pretrained=False, **tiny)  # what the pretrained weights fill
    assert set(vision.model.state_dict()) == set(plain.state_dict())  # nothing new, nothing random beyond timm's


def test_online_text_encoder_settings_match_a_cache_built_with_them(w, tmp_path):
    """text_source=online with bidirectional=False embeds as a causal cache does (same
    first-step loss), llm2clip.json records it, and a cache that contradicts a setting is refused."""
    import embed_captions
    causal = str(tmp_path / "causal_cache")
    embed_captions.main([f"--text_model={w.llm}", f"--manifest={w.train}", f"--out_dir={causal}", "--bidirectional=False"])
    post_train.main(args(w, tmp_path / "cache", f"--cache_dir={causal}"))
    post_train.main(args(w, tmp_path / "online", "--text_source=online", "--bidirectional=False"))
    a, b = metrics(tmp_path / "cache")[0][1], metrics(tmp_path / "online")[0][1]
    print("causal: loss cache", a, "online", b)
    assert abs(a - b) <= 1e-3
    for run in ("cache", "online"):
        text = json.load(open(tmp_path / run / M.LLM2CLIP_CONFIG))["text"]
        assert text["bidirectional"] is False and text["pooling"] == "mean" and not text["chat_template"], run
    _, enc = M.load_llm2clip(str(tmp_path / "online"))
    assert enc.text_encoder.settings["bidirectional"] is False and M.is_causal_model(enc.text_encoder.model)
    # evaluate.py's retrieval text side: the recorded settings by default, its text-encoder keys override them
    import evaluate
    ev = {k: getattr(evaluate, k) for k in evaluate.config_keys}
    t = post_train.zoo.load_model(str(tmp_path / "online"), "cpu", ev).text_encoder
    assert t.text_encoder.settings["bidirectional"] is False and t.max_length == 512
    t = post_train.zoo.load_model(str(tmp_path / "online"), "cpu", {**ev, "bidirectional": True, "max_length": 32}).text_encoder
    assert t.text_encoder.settings["bidirectional"] is True and t.max_length == 32
    with pytest.raises(ValueError, match=r"bidirectional=False, but the cache .* was embedded with bidirectional=True"):
        post_train.main(args(w, tmp_path / "bad", "--bidirectional=False"))


def test_scoring_an_export_whose_text_model_changed_is_refused(w, trained, tmp_path):
    """The export names its stage-1 encoder by path; retrained in place, it would silently give other
    embeddings to the adaptor: zoo.load_models (evaluate.py) refuses it, naming both fingerprints."""
    import shutil
    import zoo
    export, text = tmp_path / "export", tmp_path / "text_model"
    shutil.copytree(trained, export, ignore=shutil.ignore_patterns("checkpoints"))
    meta = json.load(open(export / "llm2clip.json"))
    shutil.copytree(meta["text"]["model"], text)
    meta["text"]["model"] = str(text)
    (export / "llm2clip.json").write_text(json.dumps(meta))
    assert meta["text"]["fingerprint"] and zoo.load_models(str(export), "cpu")  # the same weights elsewhere: fine
    weights = [p for p in text.rglob("*.safetensors")][0]
    raw = bytearray(weights.read_bytes())
    raw[-8:] = bytes(8)  # "retrained in place": same size, other weights
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"llm2clip.json: its text model .*text_model is not the one it was trained "
                                         r"with \(fingerprint [0-9a-f]{12}, now [0-9a-f]{12}\)"):
        zoo.load_models(str(export), "cpu")
