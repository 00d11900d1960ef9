"""evaluate.py and metrics.py, no model: the metric vs a naive loop, manifests, converters, bad input, c2c scoring."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import evaluate  # noqa: E402
import metrics  # noqa: E402

from convert import convert_karpathy  # noqa: E402
from data import DataError, ImageDataset, read_manifest  # noqa: E402

EVAL_DEFAULTS = {k: getattr(evaluate, k) for k in evaluate.config_keys}

torch.set_num_threads(1)


# --- the metric against a naive reference

def naive_recall(image_features, text_features, text_to_image, ks):
    """Python loops over a float64 score matrix; ties by lowest index via a stable sort."""
    img, txt = image_features.double().tolist(), text_features.double().tolist()
    S = [[sum(a * b for a, b in zip(i, t)) for t in txt] for i in img]
    out = {}
    for k in ks:
        hits = 0
        for i in range(len(img)):
            order = sorted(range(len(txt)), key=lambda t: (-S[i][t], t))
            hits += any(text_to_image[t] == i for t in order[:k])
        out[f"i2t_R@{k}"] = 100.0 * hits / len(img)
    for k in ks:
        hits = 0
        for t in range(len(txt)):
            order = sorted(range(len(img)), key=lambda i: (-S[i][t], i))
            hits += text_to_image[t] in order[:k]
        out[f"t2i_R@{k}"] = 100.0 * hits / len(txt)
    return out


def _ties_features(n, d, gen):
    """Small integer features: every dot product is exact in float32, so many exact ties, bit for bit."""
    return torch.randint(-1, 2, (n, d), generator=gen).float()


@pytest.mark.parametrize("per_image", [5, 1])
@pytest.mark.parametrize("kind", ["random", "integer_ties", "duplicates"])
def test_retrieval_metrics_equal_naive_loop(per_image, kind):
    gen = torch.Generator().manual_seed(per_image * 10 + len(kind))
    n_img, d = 23, 6
    t2i = [i for i in range(n_img) for _ in range(per_image)]
    perm = torch.randperm(len(t2i), generator=gen).tolist()  # captions not grouped by image
    t2i = [t2i[p] for p in perm]
    if kind == "integer_ties":
        img, txt = _ties_features(n_img, 3, gen), _ties_features(len(t2i), 3, gen)
    else:
        img = F.normalize(torch.randn(n_img, d, generator=gen), dim=-1)
        txt = F.normalize(torch.randn(len(t2i), d, generator=gen), dim=-1)
        if kind == "duplicates":  # exact duplicate images and captions: exact score ties
            img[5], img[17], img[9] = img[2], img[2], img[20]
            txt[7], txt[len(t2i) - 1], txt[3] = txt[1], txt[1], txt[10]
    ks = (1, 5, 10)
    got = metrics.retrieval_metrics(img, txt, t2i, ks=ks)
    want = naive_recall(img, txt, t2i, ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    if kind == "integer_ties":  # ties really occur and decide hits: reversing the tie rule changes the result
        flipped = naive_recall(img.flip(0), txt.flip(0), [n_img - 1 - t for t in reversed(t2i)], ks)
        assert flipped != want


def test_retrieval_metrics_tie_rule_documented_example():
    # all scores equal: image i's best caption is its lowest-index caption; rank = that index
    img, txt = torch.ones(3, 2), torch.ones(6, 2)
    t2i = [2, 2, 0, 0, 1, 1]
    r = metrics.retrieval_metrics(img, txt, t2i, ks=(1, 3))
    # i2t ranks: image 0 -> caption 2 (rank 2), image 1 -> caption 4 (rank 4), image 2 -> caption 0 (rank 0)
    assert r["i2t_R@1"] == pytest.approx(100 / 3) and r["i2t_R@3"] == pytest.approx(200 / 3)
    # t2i: each caption ranks its image at the image's index: ranks 2,2,0,0,1,1
    assert r["t2i_R@1"] == pytest.approx(100 / 3) and r["t2i_R@3"] == pytest.approx(100.0)


def test_retrieval_metrics_chunked_equals_unchunked(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(40, 8, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(200, 8, generator=gen), dim=-1)
    t2i = [i // 5 for i in range(200)]
    whole = metrics.retrieval_metrics(img, txt, t2i)
    monkeypatch.setattr(metrics, "chunk_rows", lambda n: 7)
    assert metrics.retrieval_metrics(img, txt, t2i) == whole


def test_retrieval_metrics_rejects_bad_mapping():
    img, txt = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="at least one caption"):
        metrics.retrieval_metrics(img, txt, [0, 0, 1])
    with pytest.raises(ValueError, match=r"must be in \[0, 3\)"):
        metrics.retrieval_metrics(img, txt, [0, 1, 3])
    with pytest.raises(ValueError, match="one image index per text"):
        metrics.retrieval_metrics(img, txt, [0, 1])


# --- manifests, images, transforms

def _image(path, size=(40, 30), color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_read_manifest_resolves_images_and_counts(tmp_path):
    _image(tmp_path / "imgs" / "a.jpg")
    _image(tmp_path / "imgs" / "b.jpg")
    m = _jsonl(tmp_path / "m.jsonl", [{"image": "imgs/a.jpg", "captions": ["x", "y"], "long_captions": ["long"]},
                                       "", {"image": "imgs/b.jpg", "captions": ["z", "w"]}])
    recs = read_manifest(m, field="captions", captions_per_image=2)
    assert [r["image"] for r in recs] == [str(tmp_path / "imgs" / "a.jpg"), str(tmp_path / "imgs" / "b.jpg")]
    assert [r["line"] for r in recs] == [1, 3] and recs[1]["long_captions"] == []
    other_root = read_manifest(m, image_root=str(tmp_path), check_images=False)
    assert other_root[0]["image"] == os.path.join(str(tmp_path), "imgs/a.jpg")


@pytest.mark.parametrize("rows,kwargs,message", [
    ([{"image": "missing.jpg", "captions": ["x"]}], {}, r"m.jsonl:1: image file not found: .*missing.jpg"),
    ([{"image": "a.jpg", "captions": ["x"]}, {"image": "a.jpg", "captions": ["x", ""]}], {},
     r"m.jsonl:2: captions\[1\] is an empty caption"),
    ([{"image": "a.jpg", "captions": ["1", "2", "3", "4", "5"]}, {"image": "a.jpg", "captions": ["1", "2", "3", "4"]}],
     {"field": "captions", "captions_per_image": 5}, r"m.jsonl:2: image 'a.jpg' has 4 'captions', expected exactly 5"),
    ([{"image": "a.jpg", "captions": ["x"]}], {"field": "long_captions"}, r"m.jsonl:1: no 'long_captions' for image 'a.jpg'"),
    ([{"image": "a.jpg"}], {}, r"m.jsonl:1: no captions"),
    ([{"captions": ["x"]}], {}, r"m.jsonl:1: missing \"image\""),
    (["{not json"], {}, r"m.jsonl:1: malformed JSON"),
    ([], {}, r"m.jsonl: empty manifest"),
])
def test_read_manifest_errors(tmp_path, rows, kwargs, message):
    _image(tmp_path / "a.jpg")
    with pytest.raises(DataError, match=message):
        read_manifest(_jsonl(tmp_path / "m.jsonl", rows), **kwargs)


def test_eval_transform_resizes_short_side_and_center_crops(tmp_path):
    cfg = {"input_size": (3, 16, 16), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
           "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    # a 64x32 image: left half black, right half white. Short side -> 16 gives 32x16; the centre 16x16 crop
    # keeps columns 8..23 of the resized image: black then white, split in the middle.
    im = Image.new("RGB", (64, 32), (0, 0, 0))
    im.paste((255, 255, 255), (32, 0, 64, 32))
    path = tmp_path / "half.png"
    im.save(path)
    x, idx = ImageDataset([str(path)], data.eval_transform(cfg))[0]
    assert idx == 0 and x.shape == (3, 16, 16)
    assert torch.allclose(x[:, :, :6], torch.tensor(-2.0), atol=1e-4)  # (0 - 0.5) / 0.25
    assert torch.allclose(x[:, :, 10:], torch.tensor(2.0), atol=1e-4)  # (1 - 0.5) / 0.25


def test_image_dataset_names_bad_files(tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"not an image")
    ds = ImageDataset([str(tmp_path / "gone.jpg"), str(bad)], lambda im: im)
    with pytest.raises(DataError, match=r"gone.jpg: image file not found"):
        ds[0]
    with pytest.raises(DataError, match=r"corrupt.jpg: cannot read image"):
        ds[1]


# --- converters, through the CLI, from fixtures in each public format

def test_convert_karpathy_coco_cuts_to_five(tmp_path, capsys):
    def img(i, split, n):
        return {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "split": split,
                "sentences": [{"raw": f"caption {j} of {i} ", "tokens": []} for j in range(n)]}
    images = [img(0, "test", 5), img(1, "test", 7), img(2, "train", 5), img(3, "test", 6), img(4, "val", 5)]
    src = tmp_path / "dataset_coco.json"
    src.write_text(json.dumps({"images": images, "dataset": "coco"}))
    out = tmp_path / "coco" / "manifest.jsonl"
    assert evaluate.main(["--task=convert", "--format=karpathy", f"--src={src}", f"--out={out}"]) == 3
    assert "2 of 3 images had more than 5 captions; kept the first 5" in capsys.readouterr().out
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in recs] == [f"val2014/COCO_val2014_{i:012d}.jpg" for i in (0, 1, 3)]
    assert all(len(r["captions"]) == 5 for r in recs) and recs[1]["captions"][4] == "caption 4 of 1"
    with pytest.raises(DataError, match=r"images\[0\] \(val2014/COCO_val2014_000000000000.jpg\) has 4 captions"):
        images[0]["sentences"].pop()
        src.write_text(json.dumps({"images": images}))
        convert_karpathy(str(src))


def test_convert_karpathy_flickr_prefix_and_split(tmp_path):
    images = [{"filename": f"{i}.jpg", "split": "test" if i % 2 else "train",
               "sentences": [{"raw": f"c{j}"} for j in range(5)]} for i in range(10)]
    src = tmp_path / "dataset_flickr30k.json"
    src.write_text(json.dumps({"images": images}))
    out = tmp_path / "m.jsonl"
    evaluate.main(["--task=convert", "--format=karpathy", f"--src={src}", f"--out={out}",
                   "--image_prefix=flickr30k-images/"])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in recs] == [f"flickr30k-images/{i}.jpg" for i in (1, 3, 5, 7, 9)]
    evaluate.main(["--task=convert", "--format=karpathy", f"--src={src}", f"--out={out}", "--split=train"])
    assert len(out.read_text().splitlines()) == 5


def test_convert_sharegpt4v_first_1000(tmp_path):
    entries = [{"id": str(i), "image": f"coco/train2017/{i:012d}.jpg",
                "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                  {"from": "gpt", "value": f"A long caption number {i}."}]} for i in range(1005)]
    src = tmp_path / "share-captioner_coco_lcs_sam_1246k_1107.json"
    src.write_text(json.dumps(entries))
    out = tmp_path / "m.jsonl"
    assert evaluate.main(["--task=convert", "--format=sharegpt4v", f"--src={src}", f"--out={out}"]) == 1000
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[999] == {"image": "coco/train2017/000000000999.jpg", "long_captions": ["A long caption number 999."]}


def test_convert_urban1k_folder(tmp_path):
    src = tmp_path / "Urban1k"
    for i in (1, 2, 10):  # numeric order, not string order
        _image(src / "image" / f"{i}.jpg")
        (src / "caption").mkdir(exist_ok=True)
        (src / "caption" / f"{i}.txt").write_text(f"urban scene {i}\n")
    out = src / "manifest.jsonl"
    assert evaluate.main(["--task=convert", "--format=urban1k", f"--src={src}", f"--out={out}"]) == 3
    recs = read_manifest(str(out), field="long_captions", captions_per_image=1)  # images resolve
    assert [r["long_captions"] for r in recs] == [["urban scene 1"], ["urban scene 2"], ["urban scene 10"]]
    (src / "caption" / "11.txt").write_text("orphan")
    with pytest.raises(DataError, match=r"11.txt: no matching image"):
        evaluate.main(["--task=convert", "--format=urban1k", f"--src={src}", f"--out={out}"])


def test_convert_docci_test_split(tmp_path):
    rows = [{"example_id": f"{s}_{i:05d}", "split": s, "image_file": f"{s}_{i:05d}.jpg",
             "description": f"A detailed description {i}."} for s, n in (("train", 4), ("test", 3), ("qual_test", 2))
            for i in range(n)]
    src = _jsonl(tmp_path / "docci_descriptions.jsonlines", rows)
    out = tmp_path / "m.jsonl"
    assert evaluate.main(["--task=convert", "--format=docci", f"--src={src}", f"--out={out}"]) == 3
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[0] == {"image": "images/test_00000.jpg", "long_captions": ["A detailed description 0."]}


def test_convert_bad_format_and_src(tmp_path):
    with pytest.raises(ValueError, match="--format='coco': expected one of karpathy, sharegpt4v, urban1k, docci"):
        evaluate.main(["--task=convert", "--format=coco", "--src=x", "--out=y"])
    with pytest.raises(DataError, match="--src=.*nope.json.*not found"):
        evaluate.main(["--task=convert", "--format=karpathy", f"--src={tmp_path}/nope.json", "--out=y"])


# --- config and dataset resolution errors

def test_unknown_config_key_and_task():
    with pytest.raises(ValueError, match="unknown config key 'modell'; valid keys: task, model, data"):
        evaluate.main(["--modell=x"])
    with pytest.raises(ValueError, match="--task='retreival': expected one of retrieval, classify, c2c, convert"):
        evaluate.main(["--task=retreival"])


def test_unknown_dataset_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'flickr': expected a manifest .jsonl path or one of "
                                         "flickr30k, coco, sharegpt4v, urban1k, docci"):
        evaluate.main(["--model=whatever", "--data=flickr", f"--data_root={tmp_path}"])
    with pytest.raises(DataError, match=r"dataset 'coco': .*coco/manifest.jsonl not found; convert"):
        evaluate.main(["--model=whatever", "--data=coco", f"--data_root={tmp_path}"])


def test_known_dataset_requires_five_captions(tmp_path):
    root = tmp_path / "flickr30k"
    _image(root / "a.jpg")
    _image(root / "b.jpg")
    _jsonl(root / "manifest.jsonl", [{"image": "a.jpg", "captions": ["1", "2", "3", "4", "5"]},
                                     {"image": "b.jpg", "captions": ["1", "2", "3"]}])
    with pytest.raises(DataError, match=r"manifest.jsonl:2: image 'b.jpg' has 3 'captions', expected exactly 5"):
        evaluate.resolve_dataset("flickr30k", {**EVAL_DEFAULTS, "data_root": str(tmp_path)})
    d = evaluate.resolve_dataset("flickr30k", {**EVAL_DEFAULTS, "data_root": str(tmp_path), "captions_per_image": 0})
    assert d["text_to_image"] == [0] * 5 + [1] * 3 and d["texts"][5:] == ["1", "2", "3"]


def test_manifest_path_picks_long_captions_when_no_short(tmp_path):
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    m = _jsonl(tmp_path / "urban.jsonl", [{"image": x, "long_captions": ["dense text"]} for x in ("a.jpg", "b.jpg")])
    d = evaluate.resolve_dataset(m, dict(EVAL_DEFAULTS))
    assert (d["name"], d["field"], d["texts"], d["text_to_image"]) == ("urban", "long_captions", ["dense text"] * 2, [0, 1])


# --- caption-to-caption scoring

class BagOfWordsEncoder:
    """Deterministic stand-in for load_text_encoder: hashed word counts (+ an instruction flag)."""

    def __init__(self, dim=64):
        self.dim, self.calls = dim, []

    def encode(self, texts, instruction=None, max_length=512, batch_size=64):
        self.calls.append((len(texts), instruction, max_length, batch_size))
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % self.dim] += 1.0
            if instruction:
                out[i, 0] += 5.0
        return out * 3.0  # not normalised: c2c_eval must normalise


def naive_c2c(enc, caps, instruction):
    def emb(texts, ins):
        return F.normalize(enc.encode(texts, instruction=ins), dim=-1).double().tolist()
    res = []
    for qi, gi in ((0, 1), (1, 0)):
        q, g = emb([c[qi] for c in caps], instruction), emb([c[gi] for c in caps], None)
        hits = 0
        for i, qv in enumerate(q):
            s = [sum(a * b for a, b in zip(qv, gv)) for gv in g]
            hits += min(range(len(g)), key=lambda j: (-s[j], j)) == i
        res.append(100.0 * hits / len(caps))
    return res


@pytest.mark.parametrize("instruction", [None, "Given a caption, retrieve a similar relevant caption."])
def test_c2c_eval_equals_naive(instruction):
    caps = [["a red car on a road", "red car driving", "x"], ["a dog in the park", "dog running on grass"],
            ["two cats sleeping", "cats asleep on a sofa"], ["a red car on a road", "a car that is red"],
            ["bowl of fruit", "fruit in a bowl"], ["empty street", "dog"]]
    enc = BagOfWordsEncoder()
    got = metrics.c2c_eval(enc, [{"id": i, "captions": c} for i, c in enumerate(caps)], instruction=instruction,
                           max_length=128, batch_size=4)
    top1, rev = naive_c2c(BagOfWordsEncoder(), caps, instruction)
    assert got == {"c2c_top1": pytest.approx(top1), "c2c_top1_reverse": pytest.approx(rev), "n": 6}
    assert 0 < got["c2c_top1"] < 100
    assert {c[1:] for c in enc.calls} == {(None, 128, 4)} | ({(instruction, 128, 4)} if instruction else set())
    assert metrics.c2c_eval(BagOfWordsEncoder(), caps, instruction=instruction) == got  # plain lists too


def test_c2c_eval_restores_training_mode():
    class Enc(torch.nn.Module, BagOfWordsEncoder):
        def __init__(self):
            torch.nn.Module.__init__(self)
            BagOfWordsEncoder.__init__(self)
            self.modes = []

        def encode(self, texts, **kw):
            self.modes.append(self.training)
            return BagOfWordsEncoder.encode(self, texts, **kw)
    enc = Enc().train()
    metrics.c2c_eval(enc, [["a b", "a"], ["c d", "c"]])
    assert enc.modes == [False, False] and enc.training


@pytest.mark.parametrize("rows,message", [
    ([{"id": 1, "captions": ["only one"]}], r"c.jsonl:1: expected >= 2 captions per record"),
    ([{"id": 1, "captions": ["a", "b"]}, {"id": 2, "captions": ["a", " "]}], r"c.jsonl:2: caption 1 is ' '; expected a non-empty"),
    ([{"id": 1, "captions": ["a", "b"]}, "[1, 2]"], r"c.jsonl:2: expected a JSON object"),
    ([], r"c.jsonl: no records"),
])
def test_read_caption_records_errors(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        data.read_caption_records(_jsonl(tmp_path / "c.jsonl", rows))
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        data.read_caption_records(str(tmp_path / "nope.jsonl"))


def test_imagenet_wnid_folders_get_class_names_and_80_templates(tmp_path):
    """WordNet-id class folders get the shipped ImageNet names and CLIP's 80 prompts by
    default; other folders keep their names and one template; an unknown WNID is named."""
    for wnid in ("n01440764", "n02012849", "n03126707"):  # tench, crane (bird), crane (machine)
        os.makedirs(tmp_path / "in" / wnid)
        Image.new("RGB", (8, 8)).save(tmp_path / "in" / wnid / "a.jpg")
    paths, labels, names, templates = data.read_class_folder(str(tmp_path / "in"))
    assert names == ["tench", "crane bird", "construction crane"] and labels == [0, 1, 2]
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}." and all("{}" in t for t in templates)
    full = data.imagenet_classnames()
    assert len(full) == 1000 and list(full) == sorted(full) and full["n04008634"] == "missile"
    dupes = sorted({n for n in full.values() if list(full.values()).count(n) > 1})
    assert dupes == ["missile", "sunglasses"]  # CLIP's list as published (two WNID pairs share a name)
    os.makedirs(tmp_path / "plain" / "red_circle")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain" / "red_circle" / "a.jpg")
    assert data.read_class_folder(str(tmp_path / "plain"))[2:] == (["red circle"], ["a photo of a {}."])
    os.makedirs(tmp_path / "in" / "n99999999")
    with pytest.raises(DataError, match=r"\['n99999999'\] are WordNet ids but not ImageNet-1k classes"):
        data.read_class_folder(str(tmp_path / "in"))
