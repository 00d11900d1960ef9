"""Fault injection end to end on the tiny configuration: nothing lost, nothing silent.

Every fault below once passed silently or crashed naming nothing: truncated tar shards and string
captions, a resume that drifts with drop-path or accepts other data, truncated/corrupt cache and
checkpoint files, NaN cache rows, temp files left by a kill, silent text truncation, two runs in one
out_dir, bad config values found after the work. Each test injects one and checks the named error,
the fallback or the log line. One module fixture holds the data, a tiny LLM and its caches.
"""
import io
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
import cc_finetune  # noqa: E402
import common  # noqa: E402
from cache import EmbeddingCache  # noqa: E402
import data  # noqa: E402
import data_index  # noqa: E402
import embed_captions  # noqa: E402
import evaluate  # noqa: E402
import pipeline  # noqa: E402
from conftest import stage2_world  # noqa: E402
from test_post_train import args as post_args  # noqa: E402
import post_train  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return stage2_world(tmp_path_factory.mktemp("faults"), 48, 32)


def args(w, out, *extra):
    """test_post_train's tiny run, two steps with a checkpoint after each (a later --key wins)."""
    return post_args(w, out, "--warmup_steps=1", "--max_steps=2", "--save_interval=1", *extra)


def log_of(out, name="post_train"):
    with open(os.path.join(out, f"{name}.log")) as f:
        return f.read()


def weights(out):
    return torch.load(common.checkpoint_paths(str(out))[-1], weights_only=True)["model"]


# --- 1. tar shards: a truncated shard or a bad caption field is an error naming the shard, never fewer samples

def write_shard(path, recs, meta=None):
    with tarfile.open(path, "w") as tf:
        for i, r in enumerate(recs):
            tf.add(r["image"], arcname=f"{i:05d}.png")
            m = json.dumps(meta(i) if meta else {"captions": r["captions"], "long_captions": r["long_captions"]})
            info = tarfile.TarInfo(f"{i:05d}.json")
            info.size = len(m.encode())
            tf.addfile(info, io.BytesIO(m.encode()))
    return str(path)


def test_truncated_tar_shard_is_refused_wherever_it_is_cut(w, tmp_path):
    recs = data.read_manifest(w.train)[:6]
    full = write_shard(tmp_path / "full.tar", recs)
    assert len(data_index.index_tar_shards([full])) == 6
    raw = open(full, "rb").read()
    members = tarfile.open(full).getmembers()
    cuts = {"inside the 4th image's bytes": members[6].offset_data + 10,
            "inside the 4th image's header": members[6].offset + 100,
            "at the 4th image's header": members[6].offset,
            "before the end-of-archive blocks": members[-1].offset_data + 512}
    for what, cut in cuts.items():
        p = tmp_path / "cut.tar"
        p.write_bytes(raw[:cut])
        with pytest.raises(data.DataError, match=re.escape(str(p)) + ": (truncated|cannot read)"):
            data_index.index_tar_shards([str(p)])
        print(what, "-> refused")


@pytest.mark.parametrize("meta,expected", [
    ({"captions": "a red circle"}, r"'captions' must be a list of strings, got 'a red circle'"),
    ({"captions": ["ok", 3]}, r"'captions' must be a list of strings"),
    ({"captions": ["ok"], "long_captions": [""]}, r"long_captions\[0\] is an empty caption"),
    ({"caption": 7}, r"'caption' must be a string"),
])
def test_tar_caption_fields_are_validated_like_manifests(w, tmp_path, meta, expected):
    recs = data.read_manifest(w.train)[:3]
    shard = write_shard(tmp_path / "s.tar", recs, lambda i: meta if i == 1 else {"captions": ["fine"]})
    with pytest.raises(data.DataError, match=re.escape(f"{shard}::00001.json: ") + expected):
        data_index.index_tar_shards([shard])


# --- 2. kill + resume is bitwise with drop-path on (the loader no longer draws from the restored RNG)

class Killed(Exception):
    pass


def test_resume_with_drop_path_is_bitwise(w, tmp_path, monkeypatch):
    dp = ["--timm_kwargs={'img_size': 32, 'patch_size': 8, 'embed_dim': 64, 'depth': 2, 'num_heads': 2, "
          "'drop_path_rate': 0.2}", "--max_steps=4", "--save_interval=2"]
    post_train.main(args(w, tmp_path / "full", *dp))
    save = common.Checkpoints.save

    def save_then_die(self, step, state):
        save(self, step, state)
        if step == 2:
            raise Killed
    monkeypatch.setattr(common.Checkpoints, "save", save_then_die)
    with pytest.raises(Killed):
        post_train.main(args(w, tmp_path / "killed", *dp))
    monkeypatch.setattr(common.Checkpoints, "save", save)
    post_train.main(args(w, tmp_path / "killed", *dp, "--resume=True"))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


# --- 3. resume refuses other data, accepts the same data moved elsewhere

def test_resume_on_other_data_is_refused_and_moved_data_accepted(w, tmp_path):
    out = tmp_path / "run"
    post_train.main(args(w, out))
    with pytest.raises(data.DataError, match=r"step_00000002.pt: checkpoint was trained on other data: "
                       r"num_records: checkpoint 48, now 32; text_hash: checkpoint '[0-9a-f]+', now '[0-9a-f]+'"):
        post_train.main(args(w, out, f"--train_manifest={w.val}", f"--cache_dir={w.val_cache}", "--max_steps=3",
                             "--resume=True"))
    moved = tmp_path / "moved"
    shutil.copytree(os.path.dirname(w.train), moved / "data")
    shutil.copytree(w.cache, moved / "cache")
    res = post_train.main(args(w, out, f"--train_manifest={moved / 'data' / 'train.jsonl'}",
                               f"--cache_dir={moved / 'cache'}", "--max_steps=3", "--resume=True"))
    assert res["step"] == 3 and "resumed from" in log_of(out)


# --- 4. integrity: every load names its path; corrupt newest checkpoint -> the previous one; NaN rows named

def test_corrupt_cache_files_are_named_and_verify_reports(w, tmp_path, capsys):
    for name, damage in (("embeddings.npy", lambda p: p.write_bytes(p.read_bytes()[:-100])),
                         ("meta.json", lambda p: p.write_text('{"format": "llm2clip')),
                         ("index.npz", lambda p: p.write_bytes(p.read_bytes()[:50]))):
        cache = tmp_path / name
        shutil.copytree(w.cache, cache)
        damage(cache / name)
        with pytest.raises(data.DataError, match=re.escape(str(cache / name)) + ": (cannot read|corrupt)"):
            EmbeddingCache(str(cache), manifest=w.train).record_offsets  # index.npz: read on first use
        capsys.readouterr()
        with pytest.raises(SystemExit):  # reported, exit status 1, no traceback from numpy/json
            embed_captions.main([f"--manifest={w.train}", f"--out_dir={cache}", "--verify_only=True"])
        assert re.search(r"verify: PROBLEM: .*" + re.escape(str(cache / name)), capsys.readouterr().out)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(w, tmp_path):
    out = tmp_path / "run"
    post_train.main(args(w, out))
    first, newest = common.checkpoint_paths(str(out))
    assert open(newest + ".sha256").read().strip() == common.file_sha256(newest)
    raw = bytearray(open(newest, "rb").read())
    raw[len(raw) // 2] ^= 0x01  # one bit flipped: torch.load alone would load it silently
    open(newest, "wb").write(bytes(raw))
    res = post_train.main(args(w, out, "--max_steps=3", "--resume=True"))
    log = log_of(out)
    assert f"warning: {newest}: checksum mismatch" in log and "falling back to the previous checkpoint" in log
    assert f"resumed from {first} at step 1" in log and res["step"] == 3


def test_corrupt_export_and_encoder_json_are_named(w, tmp_path, capsys):
    import model as M
    out = tmp_path / "run"
    post_train.main(args(w, out, "--max_steps=1"))
    capsys.readouterr()  # while the export is intact: retrieval logs how many texts max_length cut
    evaluate.main(["--task=retrieval", f"--model={out}", f"--data={w.val}", "--caption_field=long_captions",
                   "--captions_per_image=0", "--num_workers=0"])
    assert f"{out} on val: truncation: none of 96 texts exceeded max_length=512" in capsys.readouterr().out
    p = out / "vision_tower.pt"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(ValueError, match=re.escape(str(p)) + ": cannot load"):
        M.load_llm2clip(str(out), load_text=False)
    enc = tmp_path / "enc"
    os.makedirs(enc)
    (enc / "encoder.json").write_text('{"model_subdir": ')
    with pytest.raises(ValueError, match=re.escape(str(enc / "encoder.json")) + ": cannot read JSON"):
        M.load_text_encoder(str(enc))


def test_nan_cache_row_names_record_and_row(w, tmp_path):
    cache = tmp_path / "nan_cache"
    shutil.copytree(w.cache, cache)
    emb = np.load(cache / "embeddings.npy", mmap_mode="r+")
    emb[:] = np.nan  # whichever caption step 0 draws, its row is bad
    emb.flush()
    del emb
    with pytest.raises(data.DataError, match=re.escape(str(cache / "embeddings.npy")) +
                       r": row \d+ is not finite: record \d+ \(.*train.jsonl:\d+, image .*\.png\), (long_)?captions\[\d\]"):
        post_train.main(args(w, tmp_path / "o", f"--cache_dir={cache}"))


def test_non_finite_loss_still_names_step(w, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 1; last good checkpoint: .*step_00000001.pt"):
        post_train.main(args(w, tmp_path / "o", "--learning_rate=1e30", "--warmup_steps=0", "--grad_clip=0"))


# --- 5. temp files: a killed writer's partial file is swept at the next start

def test_partial_file_of_a_killed_writer_is_removed_at_start(w, tmp_path):
    out = tmp_path / "run"
    ck = out / "checkpoints" / "step_00000002.pt"
    os.makedirs(ck.parent)
    kill = f"import os, signal; f = open({str(ck)!r} + '.tmp%d' % os.getpid(), 'wb'); f.write(b'x' * 4096); " \
           "f.flush(); os.kill(os.getpid(), signal.SIGKILL)"
    r = subprocess.run([sys.executable, "-c", kill], timeout=60)
    assert r.returncode == -9
    (tmp,) = [p for p in os.listdir(ck.parent) if ".tmp" in p]
    post_train.main(args(w, out, "--max_steps=1"))
    assert not [p for root, _, names in os.walk(out) for p in names if ".tmp" in p]
    assert f"removed 1 temp file(s) of a killed run: {ck.parent / tmp}" in log_of(out)


# --- 6. truncation is counted and logged in stage 1, the cache and evaluation

def test_truncation_counts_are_logged(w, tmp_path, capsys):
    caps = os.path.join(os.path.dirname(w.train), "train_captions.jsonl")
    res = cc_finetune.main([f"--text_model={w.llm}", f"--train_captions={caps}", f"--out_dir={tmp_path / 'cc'}",
                            "--batch_size=8", "--micro_batch_size=8", "--max_steps=1", "--max_length=8",
                            "--instruction=", "--gradient_checkpointing=False", "--dtype=float32"])
    t = res["truncation"]
    assert t["texts"] == 16 and 0 < t["truncated"] <= 16 and t["tokens_cut"] >= t["truncated"]
    assert f"truncation: {t['truncated']} of 16 texts" in log_of(tmp_path / "cc", "cc_finetune")
    embed_captions.main([f"--text_model={w.llm}", f"--manifest={w.val}", f"--out_dir={tmp_path / 'e'}",
                         "--max_length=8"])
    assert re.search(r"truncation: [1-9]\d* of 160 texts \(.*\) were cut to max_length=8", log_of(tmp_path / "e", "embed"))
    assert "truncation: none of" in log_of(w.cache, "embed")
    capsys.readouterr()
    evaluate.main(["--task=c2c", f"--text_model={w.llm}", f"--captions={caps}", "--max_length=8"])
    assert re.search(r"truncation: [1-9]\d* of 96 texts", capsys.readouterr().out)


def test_tiny_stage1_preset_truncates_nothing(tmp_path):
    """config/cc_tiny_cpu.py's max_length fits BOS + instruction + the longest synthetic long caption
    with the tokenizer the pipeline trains (2000 records, vocabulary 400)."""
    recs = data.make_synthetic_dataset(tmp_path, 2000, image_size=16)
    tok = pipeline.train_tokenizer([c for r in recs for c in r["captions"] + r["long_captions"]], 400)
    scope = {}
    exec(open(os.path.join(ROOT, "config", "cc_tiny_cpu.py")).read(), {}, scope)
    need = 1 + len(tok(cc_finetune.instruction, add_special_tokens=False)["input_ids"]) + max(
        len(ids) for ids in tok([c for r in recs for c in r["long_captions"]], add_special_tokens=False)["input_ids"])
    assert need <= scope["max_length"], (need, scope["max_length"])


# --- 7. one run per out_dir

def test_second_run_in_the_same_out_dir_is_refused(w, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import common, time; "
                               f"common.lock_out_dir({str(out)!r}); print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"{re.escape(str(out))}' is in use by another run \(pid {holder.pid} on "):
            post_train.main(args(w, out))
        with pytest.raises(ValueError, match=rf"pid {holder.pid}"):
            embed_captions.main([f"--text_model={w.llm}", f"--manifest={w.val}", f"--out_dir={out}"])
    finally:
        holder.kill()
        holder.wait()
    assert post_train.main(args(w, out, "--max_steps=1"))["step"] == 1  # the OS dropped the dead holder's lock


# --- 8. bad values fail at start naming the key (a missing manifest shows nothing else ran first)

@pytest.mark.parametrize("bad,expected", [
    ("--dtype=fp8", "dtype='fp8': expected one of 'float32', 'bfloat16', 'float16'"),
    ("--batch_size=0", "batch_size=0: expected a positive integer"),
    ("--micro_batch_size=-1", "micro_batch_size=-1: expected an integer >= 0"),
    ("--crop_scale=(0.5,)", r"crop_scale=\(0.5,\): expected \(min, max\)"),
    ("--crop_scale=(1.0, 0.5)", r"crop_scale=\(1.0, 0.5\): expected \(min, max\) with 0 < min <= max <= 1"),
    ("--out_dir=/proc/llm2clip_unwritable", "out_dir='/proc/llm2clip_unwritable': cannot write there"),
])
def test_post_train_bad_values_fail_at_start(w, bad, expected):
    with pytest.raises(ValueError, match=expected):
        post_train.main(args(w, "unused") + ["--train_manifest=/nonexistent/train.jsonl", bad])


def test_other_stages_validate_at_start(w, tmp_path):
    with pytest.raises(ValueError, match="chunk_rows=0: expected a positive integer"):
        embed_captions.main([f"--text_model={w.llm}", f"--manifest={w.val}", f"--out_dir={tmp_path}", "--chunk_rows=0"])
    with pytest.raises(ValueError, match="dtype='fp8': expected 'auto', 'float32', 'bfloat16' or 'float16'"):
        cc_finetune.main([f"--text_model={w.llm}", "--train_captions=/nonexistent.jsonl", "--dtype=fp8"])
    with pytest.raises(ValueError, match="out='/proc/nope/results.json': cannot create /proc/nope"):
        evaluate.main(["--task=retrieval", f"--model={w.llm}", "--data=/nonexistent.jsonl", "--out=/proc/nope/results.json"])
