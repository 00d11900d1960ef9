"""The stage-2 training index: same records, rows and hashes as the old in-memory path, built
once (ranks sharing tar shards), rebuilt when a source file changes, clear errors, and per-rank memory
that does not grow with the dataset beyond a few bytes per record."""
import json
import os
import pickle
import re
import sys
import tarfile
import threading
import tracemalloc

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench_data  # noqa: E402
from cache import EmbeddingCache, cache_texts  # noqa: E402
import data  # noqa: E402
import data_index  # noqa: E402


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """40 synthetic records as a manifest and as 2 tar shards (img2dataset layout: key.png + key.json + key.txt)."""
    d = tmp_path_factory.mktemp("syn")
    recs = data.make_synthetic_dataset(d, 40, image_size=16)
    for s in range(2):
        with tarfile.open(d / f"{s:05d}.tar", "w") as tf:
            for i in range(s * 20, (s + 1) * 20):
                tf.add(d / recs[i]["image"], arcname=f"{i:09d}.png")
                (d / "m.json").write_text(json.dumps({"captions": recs[i]["captions"], "long_captions": recs[i]["long_captions"]}))
                tf.add(d / "m.json", arcname=f"{i:09d}.json")
    return d, str(d / "train.jsonl"), [str(d / "00000.tar"), str(d / "00001.tar")]


def test_index_gives_the_records_rows_and_hash_of_the_old_path(syn, tmp_path):
    d, manifest, shards = syn
    idx = data_index.build_train_index(str(tmp_path / "m"), manifest=manifest, log=quiet)
    old = data.read_manifest(manifest)
    assert len(idx) == 40 and [idx[r] for r in range(40)] == [{k: o[k] for k in ("image", "captions", "long_captions")}
                                                               for o in old]
    texts = cache_texts(manifest)
    assert idx.text_hash == texts.text_hash  # what a cache built by embed_captions.py records
    assert np.array_equal(idx.array("text_row"), texts.record_offsets)
    assert np.array_equal(idx.array("text_hashes"), texts.text_hashes)
    rec = idx[7]
    assert idx.cache_row(7, rec, "long_captions", 2) == texts.record_offsets[7] + len(rec["captions"]) + 2
    assert idx.where(7) == f"{manifest}:8"
    assert idx.used_fields() == ["captions", "long_captions"]

    tar = data_index.build_train_index(str(tmp_path / "t"), shards=shards, log=quiet)
    assert [tar[r] for r in range(40)] == data_index.index_tar_shards(shards)  # image name, captions, byte range
    assert tar.text_hash == idx.text_hash  # same texts -> the same cache serves both
    assert cache_texts(tar.records_file).text_hash == tar.text_hash  # records.jsonl is what embed_captions reads
    with open(shards[1], "rb") as f:  # the byte range is the PNG itself
        f.seek(tar[25]["_tar"][1])
        assert f.read(tar[25]["_tar"][2]) == open(d / old[25]["image"].split(str(d) + os.sep)[-1], "rb").read()


def test_two_ranks_scan_tar_shards_in_parallel_to_the_same_index(syn, tmp_path):
    _, _, shards = syn
    one = data_index.build_train_index(str(tmp_path / "one"), shards=shards, log=quiet)
    results = {}

    def rank(k):
        results[k] = data_index.build_train_index(str(tmp_path / "two"), shards=shards, rank=k, world_size=2, log=quiet)

    threads = [threading.Thread(target=rank, args=(k,)) for k in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {0, 1}
    for k in data_index.INDEX_ARRAYS:
        assert np.array_equal(one.array(k), results[1].array(k)), k
    assert open(one.records_file, "rb").read() == open(results[0].records_file, "rb").read()
    assert not os.path.exists(tmp_path / "two" / "parts")  # merged and cleaned up


def test_index_is_reused_and_rebuilt_when_the_manifest_changes(syn, tmp_path):
    d, manifest, _ = syn
    m = tmp_path / "m.jsonl"
    lines = open(manifest).read().splitlines()
    m.write_text("\n".join(lines) + "\n")
    root = str(d)
    first = data_index.build_train_index(str(tmp_path / "i"), manifest=str(m), image_root=root, log=quiet)
    cache = tmp_path / "cache"
    bench_data.fake_cache(str(cache), first, 8)  # what embed_captions.py would write for these texts
    EmbeddingCache(str(cache), manifest=first)  # accepted: the same texts
    meta_mtime = os.stat(tmp_path / "i" / data_index.INDEX_META).st_mtime_ns
    again = data_index.build_train_index(str(tmp_path / "i"), manifest=str(m), image_root=root, log=quiet)
    assert os.stat(tmp_path / "i" / data_index.INDEX_META).st_mtime_ns == meta_mtime and again.text_hash == first.text_hash
    rec = json.loads(lines[5])
    rec["captions"][1] = "a purple elephant"
    lines[5] = json.dumps(rec)
    m.write_text("\n".join(lines) + "\n")
    edited = data_index.build_train_index(str(tmp_path / "i"), manifest=str(m), image_root=root, log=quiet)
    assert edited.text_hash != first.text_hash and edited[5]["captions"][1] == "a purple elephant"
    # an edit in place that keeps the size and the mtime (a restore, cp -p) rebuilds it too
    st = os.stat(m)
    lines[5] = lines[5].replace("a purple elephant", "a violet elephant")
    m.write_text("\n".join(lines) + "\n")
    os.utime(m, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(m).st_size == st.st_size and os.stat(m).st_mtime_ns == st.st_mtime_ns
    same_name = data_index.build_train_index(str(tmp_path / "i"), manifest=str(m), image_root=root, log=quiet)
    assert same_name[5]["captions"][1] == "a violet elephant" and same_name.text_hash != edited.text_hash
    lines[5] = lines[5].replace("a violet elephant", "a purple elephant")
    m.write_text("\n".join(lines) + "\n")
    edited = data_index.build_train_index(str(tmp_path / "i"), manifest=str(m), image_root=root, log=quiet)
    # a cache of the first texts is refused for the edited ones, naming record, line, field, slot and text
    with pytest.raises(data.DataError, match=re.escape(f"is stale for {m}: ") + ".*1 text\\(s\\) changed.*record 5 \\("
                       + re.escape(f"{m}:6) field 'captions' slot 1, now 'a purple elephant'")):
        EmbeddingCache(str(cache), manifest=edited)
    # an index built without the image check is rebuilt when a run wants it checked
    os.remove(tmp_path / "i" / data_index.INDEX_META)
    data_index.build_train_index(str(tmp_path / "i"), manifest=str(m), image_root=str(tmp_path), check_images=False, log=quiet)
    with pytest.raises(data.DataError, match=re.escape(f"{m}:1: image file not found: {tmp_path}")):
        data_index.build_train_index(str(tmp_path / "i"), manifest=str(m), image_root=str(tmp_path), log=quiet)


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "captions": "one string"}', r"m.jsonl:2: 'captions' must be a list of strings"),
    ('{"image": "a.png", "captions": []}', r"m.jsonl:2: no captions"),
    ('{"captions": ["x"]}', r"m.jsonl:2: missing \"image\""),
    ('{"image": "a.png", "captions": ["x"]', r"m.jsonl:2: malformed JSON"),
])
def test_bad_manifest_line_is_named(tmp_path, line, message):
    (tmp_path / "a.png").write_bytes(b"")
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "a.png", "captions": ["fine"]}\n' + line + "\n")
    with pytest.raises(data.DataError, match=message):
        data_index.build_train_index(str(tmp_path / "i"), manifest=str(m), log=quiet)


def test_index_without_format_version_loads_and_a_newer_one_is_refused(syn, tmp_path):
    _, manifest, _ = syn
    first = data_index.build_train_index(str(tmp_path / "i"), manifest=manifest, log=quiet)
    meta_path = tmp_path / "i" / data_index.INDEX_META
    meta = json.loads(meta_path.read_text())
    assert meta["format_version"] == data_index.INDEX_FORMAT_VERSION == 1
    del meta["format_version"]  # an index written before versions existed: read as version 1
    meta_path.write_text(json.dumps(meta))
    mtime = os.stat(meta_path).st_mtime_ns
    old = data_index.build_train_index(str(tmp_path / "i"), manifest=manifest, log=quiet)
    assert os.stat(meta_path).st_mtime_ns == mtime  # reused as it is, not rebuilt
    assert len(old) == len(first) and old[7] == first[7] and old.text_hash == first.text_hash
    meta["format_version"] = 2  # written by a newer version of this code
    meta_path.write_text(json.dumps(meta))
    msg = re.escape(f"{meta_path}: format_version 2 is newer than this code reads (1)")
    with pytest.raises(data.DataError, match=msg):
        data_index.TrainIndex(str(tmp_path / "i"))
    with pytest.raises(data.DataError, match=msg):  # refused, never rebuilt over
        data_index.build_train_index(str(tmp_path / "i"), manifest=manifest, log=quiet)
    assert json.loads(meta_path.read_text())["format_version"] == 2


def test_index_pickles_without_its_mappings_for_spawned_workers(syn, tmp_path):
    _, _, shards = syn
    idx = data_index.build_train_index(str(tmp_path / "t"), shards=shards, log=quiet)
    first = idx[3]
    clone = pickle.loads(pickle.dumps(idx))
    assert clone._mm == {} and clone._fds == {} and clone[3] == first


def test_epoch_permutation_is_uint32_and_unchanged():
    s = data.ResumableBatchSampler(1000, 10, seed=3)
    got = s.global_indices(250)  # epoch 2
    assert s._perm.dtype == np.uint32
    assert np.array_equal(s._perm, np.random.default_rng([3, 2]).permutation(1000))  # the int64 order of before
    assert got == s._perm[500:510].tolist()


def test_per_rank_memory_does_not_grow_with_the_dataset(tmp_path):
    """Python-heap growth of a rank's data setup (index, cache check, sampler, a few samples), between 1k
    and 10k records of the paper's shape: <= 64 bytes per record (the old path held ~5 KB per record)."""
    import torch  # noqa: F401  (imported before measuring)
    import torchvision.transforms.functional  # noqa: F401
    peaks = {}
    for n in (1000, 10000):
        spec = bench_data.make_shards(str(tmp_path / f"n{n}"), n, 2000)
        index_dir = str(tmp_path / f"n{n}" / "index")
        data_index.build_train_index(index_dir, shards=data_index.expand_shards(spec), log=quiet)
        bench_data.fake_cache(str(tmp_path / f"n{n}" / "cache"), data_index.TrainIndex(index_dir), 8)
        tracemalloc.start()
        index = data_index.build_train_index(index_dir, shards=data_index.expand_shards(spec), log=quiet)
        cache = EmbeddingCache(str(tmp_path / f"n{n}" / "cache"), manifest=index, fields=index.used_fields())
        samples = data_index.TrainSamples(index, data.TrainTransform({"input_size": (3, 16, 16), "mean": (0.5,) * 3,
                                                                      "std": (0.5,) * 3}), cache)
        sampler = data_index.EpochBatchSampler(n, 64, seed=0)
        batch = data_index.collate_train([samples[item] for item in next(iter(sampler))])
        assert batch["embedding"].shape == (64, 8)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del index, cache, samples, sampler, batch
    per_record = (peaks[10000] - peaks[1000]) / 9000
    print(f"data setup heap peak: 1k records {peaks[1000] / 1024:.0f} KiB, 10k {peaks[10000] / 1024:.0f} KiB, "
          f"{per_record:.1f} B per record")
    assert per_record <= 64


def test_data_identity_tells_an_official_extraction_cache_apart_and_keeps_older_identities():
    import types
    import data_index
    enc = {"fingerprint": "f", "base_model": "m", "pooling": "mean", "chat_template": "llama3", "dim": 8}
    cache = lambda e: types.SimpleNamespace(meta={"text_hash": "h", "encoder": e}, count=3, fields=["x"])  # noqa: E731
    old = data_index.data_identity([0, 1, 2], cache(enc))  # a checkpoint's, written before the switch existed
    assert data_index.identity_mismatch(old, data_index.data_identity([0, 1, 2], cache({**enc, "official_extraction": False}))) == []
    diff = data_index.identity_mismatch(old, data_index.data_identity([0, 1, 2], cache({**enc, "official_extraction": True})))
    assert len(diff) == 1 and diff[0].startswith("encoder:") and "official_extraction" in diff[0]
