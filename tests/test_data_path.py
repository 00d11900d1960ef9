"""The stage-2 input path and the CPU settings around it: the training transform equals torchvision's bit for bit,
batches built in place (and in a worker's shared memory) equal stacked samples, a manifest index built by several
ranks equals one rank's, packed caption embedding gives the default's rows, threads never oversubscribe the cores
(set for a command, never for an in-process main), and bench.py's loader rows."""
import json
import os
import sys
import threading

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import find_shared_data  # noqa: E402
import common  # noqa: E402
import convert  # noqa: E402
import data  # noqa: E402
import data_index  # noqa: E402

CLIP = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A manifest of real COCO JPEGs (shared/data) when present, else synthetic PNGs, 24 records (folders of links:
    a manifest names each image once), and the same records as 3 tar shards."""
    d = tmp_path_factory.mktemp("images")
    shared = find_shared_data()
    src = os.path.join(shared, "images", "coco6") if shared else None
    if src and os.path.isdir(src):
        base = [r for _, r in data.read_jsonl(os.path.join(src, "manifest.jsonl"))]
    else:
        base = data.make_synthetic_dataset(d / "syn", 6, image_size=48)
        src = str(d / "syn")
    recs = []
    for j in range(4):
        os.symlink(src, d / f"img_{j}")
        recs += [{"image": f"img_{j}/{r['image']}", "captions": r["captions"][:2]} for r in base]
    data.write_manifest(str(d / "m.jsonl"), recs)
    shards = convert.write_tar_shards(data.read_manifest(str(d / "m.jsonl")), str(d / "shards" / "{:05d}.tar"), 8)
    return d, str(d / "m.jsonl"), shards


def test_train_transform_is_torchvisions_bit_for_bit(images):
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    _, manifest, _ = images
    tf = data.TrainTransform({"input_size": (3, 40, 56), **CLIP})
    for i, rec in enumerate(data.read_manifest(manifest)[:6]):
        img = data.open_image(rec)
        ours = tf(img, data.sample_rng(0, 0, i))
        top, left, h, w = data.random_resized_crop_params(img.width, img.height, data.sample_rng(0, 0, i), (0.9, 1.0))
        ref = TF.normalize(TF.to_tensor(TF.resized_crop(img, top, left, h, w, [40, 56], InterpolationMode.BICUBIC)),
                           CLIP["mean"], CLIP["std"])
        assert ours.shape == (3, 40, 56) and ours.is_contiguous() and torch.equal(ours, ref)
        slot = torch.full((3, 40, 56), float("nan"))
        assert torch.equal(tf(img, data.sample_rng(0, 0, i), slot), ref) and torch.equal(slot, ref)  # in place


def test_batches_in_place_and_in_a_worker_equal_stacked_samples(images, tmp_path):
    _, _, shards = images
    index = data_index.build_train_index(str(tmp_path / "i"), shards=shards, log=quiet)
    dc = {"input_size": (3, 32, 32), **CLIP}
    samples = data_index.TrainSamples(index, data.TrainTransform(dc), seed=3)
    items = [(1, i) for i in (5, 0, 17, 9)]
    built, stacked = samples.__getitems__(items), data_index.collate_train([samples[it] for it in items])
    assert torch.equal(built["image"], stacked["image"]) and built["text"] == stacked["text"]
    assert built["index"].tolist() == stacked["index"].tolist() == [5, 0, 17, 9]
    cfg = {"crop_scale": (0.9, 1.0), "text_source": "online", "seed": 3, "real_caption_ratio": 0.5,
           "skip_bad_images": False, "batch_size": 8, "max_steps": 2}
    inline = list(data_index.train_loader({**cfg, "num_workers": 0}, index, None, dc, 0, 1, 0))
    worker = list(data_index.train_loader({**cfg, "num_workers": 1}, index, None, dc, 0, 1, 0))
    assert len(inline) == len(worker) == 2
    for a, b in zip(inline, worker):  # the worker's batch came through shared memory, unchanged
        assert torch.equal(a["image"], b["image"]) and a["text"] == b["text"] and torch.equal(a["index"], b["index"])


def _ranks(fn, world):
    results, errors = {}, {}

    def run(k):
        try:
            results[k] = fn(k)
        except Exception as e:  # noqa: BLE001  (reported by the test)
            errors[k] = e
    threads = [threading.Thread(target=run, args=(k,)) for k in reversed(range(world))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results, errors


def test_a_manifest_index_built_by_three_ranks_equals_one_ranks(images, tmp_path):
    d, manifest, _ = images
    lines = open(manifest, encoding="utf-8").read().splitlines()
    m = tmp_path / "m.jsonl"  # a BOM, CRLF line ends, blank and whitespace-only lines anywhere
    m.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines[:7] + ["", "  \t"] + lines[7:15] + ["\u3000"] + lines[15:]).encode()
                  + b"\r\n")
    one = data_index.build_train_index(str(tmp_path / "one"), manifest=str(m), image_root=str(d), log=quiet)
    results, errors = _ranks(lambda k: data_index.build_train_index(str(tmp_path / "three"), manifest=str(m),
                                                                    image_root=str(d), rank=k, world_size=3, log=quiet), 3)
    assert not errors and set(results) == {0, 1, 2}
    three = results[0]
    assert len(one) == len(three) == 24 and one.text_hash == three.text_hash
    for k in data_index.INDEX_ARRAYS:
        assert np.array_equal(one.array(k), three.array(k)), k
    assert [three[r] for r in range(24)] == [one[r] for r in range(24)] and three.where(23) == one.where(23)
    assert not os.path.exists(tmp_path / "three" / "parts")  # merged and cleaned up
    from cache import cache_texts
    assert cache_texts(str(m)).text_hash == three.text_hash  # what embed_captions.py records for these texts


def test_a_later_parts_errors_name_the_files_own_lines(images, tmp_path):
    d, manifest, _ = images
    lines = open(manifest).read().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:20] + ['{"image": "x.jpg", "captions": "one string"}'] + lines[20:]) + "\n")
    source = data_index.index_source(str(bad), str(d))
    parts = tmp_path / "p"
    os.makedirs(parts)
    with pytest.raises(data.DataError, match="bad.jsonl:21: 'captions' must be a list of strings"):
        data_index._scan_manifest_part(source, True, 1, 2, str(parts), "x-")  # rank 1 of 2: lines 13..
    assert not [n for n in os.listdir(parts) if ".tmp" in n]  # nothing half-written left behind
    dup = tmp_path / "dup.jsonl"  # an image on lines 3 and 22: in different parts, found by the merge
    dup.write_text("\n".join(lines[:21] + [lines[2]] + lines[21:]) + "\n")
    source = data_index.index_source(str(dup), str(d))
    img = json.loads(lines[2])["image"]
    for world in (1, 2):
        out = tmp_path / f"d{world}"
        os.makedirs(out / "parts")

        def rank(k):  # rank 0 builds and merges; the others only scan (they would wait for rank 0's index)
            if k == 0:
                return data_index.build_train_index(str(out), manifest=str(dup), image_root=str(d), world_size=world,
                                                    log=quiet)
            return data_index._scan_manifest_part(source, True, k, world, str(out / "parts"),
                                                  data_index._part_name(source, True, k, world))
        _, errors = _ranks(rank, world)
        assert str(errors.get(0)) == (f"{dup}:22: image {img!r} again (first on line 3); expected one record per "
                                      "image with a list of captions (not one line per caption)"), (world, errors)


def test_threads_never_oversubscribe_and_follow_an_explicit_choice(monkeypatch):
    cores = common.cpu_cores()
    assert 1 <= cores <= os.cpu_count()
    assert common.intra_op_threads({"num_workers": 0}, {})[0] == cores
    assert common.intra_op_threads({}, {"LOCAL_WORLD_SIZE": "4"})[0] == max(1, cores // 4)
    assert common.intra_op_threads({"num_workers": 2}, {"LOCAL_WORLD_SIZE": "1"}, )[0] == max(1, cores - 2)
    assert common.intra_op_threads({"num_workers": 10 ** 6}, {})[0] == 1  # at least one
    assert common.intra_op_threads({"num_workers": 8}, {"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert common.intra_op_threads({"threads": 5}, {"OMP_NUM_THREADS": "3"}) == (5, "the threads key")
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    try:
        torch.set_num_threads(7)
        common.configure({"num_workers": 1}, [])  # main([...]) in-process: the caller's threads stay
        assert torch.get_num_threads() == 7
        seen = common.run_main(lambda argv: (common.configure({"num_workers": 1}, argv), torch.get_num_threads())[1], [])
        assert seen == max(1, cores - 1)  # a command: its share of the cores
        torch.set_num_threads(7)
        common.configure({"num_workers": 1}, [])  # and after the command, in-process again
        assert torch.get_num_threads() == 7
    finally:
        torch.set_num_threads(before)


def test_packed_embedding_gives_the_default_rows_and_cpu_batches_are_narrow(tmp_path, one_thread):
    import embed_captions
    import pipeline
    recs = data.make_synthetic_dataset(tmp_path / "syn", 10, seed=1)
    texts = [t for r in recs for t in r["captions"] + r["long_captions"]]
    model = pipeline.build_tiny_text_model(str(tmp_path / "tiny"), "llama", texts=texts)
    args = [f"--text_model={model}", f"--manifest={tmp_path / 'syn' / 'train.jsonl'}"]
    embed_captions.main(args + [f"--out_dir={tmp_path / 'plain'}"])
    embed_captions.main(args + [f"--out_dir={tmp_path / 'packed'}", "--packed=True", "--batch_tokens=256"])
    plain, packed = (np.load(tmp_path / k / "embeddings.npy").astype(np.float32) for k in ("plain", "packed"))
    assert plain.shape == packed.shape and len(plain) == len(texts)
    assert np.abs(plain - packed).max() <= 2e-3 * np.abs(plain).max()  # float16 rows of the same embeddings
    meta = json.load(open(tmp_path / "plain" / "meta.json"))
    assert meta["config"]["batch_tokens"] == embed_captions.default_batch_tokens("cpu") == 2048


def test_bench_loader_rows(images):
    pytest.importorskip("webdataset")
    import bench
    _, manifest, shards = images
    small = ["--benchmarks=loader", "--image_size=24", "--loader_batch=4", "--loader_batches=2", "--loader_repeats=1",
             "--loader_profile=4"]
    for source, workers, ref in ((f"--shards={','.join(shards)}", 1, "webdataset"), (f"--manifest={manifest}", 0,
                                                                                      "plain Dataset")):
        res = bench.main(small + [source, f"--num_workers={workers}"])
        rows = res["rows"]
        assert [r["bench"] for r in rows] == ["loader", "loader"] and all(r["median"] > 0 for r in rows)
        assert rows[1]["ratios"][0]["ratio"] == pytest.approx(rows[1]["median"] / rows[0]["median"])
        lo = res["info"]["loader"]
        assert lo["ref"] == ref and lo["samples"] == 24 and set(lo["profile"]) == {"read", "decode", "transform", "collate"}
    with pytest.raises(ValueError, match="benchmarks="):
        bench.main(["--benchmarks=loaderx"])
