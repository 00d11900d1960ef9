"""The synthetic image-caption generator: deterministic, well-formed, and captions true to the pixels."""
import os
import re
import sys

import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def _files(out_dir):
    """{relative path: bytes} of everything the generator wrote."""
    out = {}
    for root, _, names in os.walk(out_dir):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, out_dir)] = f.read()
    return out


def _earliest(text, options):
    """The key of `options` ({key: [phrases]}) whose phrase occurs first in `text`."""
    hits = [(m.start(), k) for k, phrases in options.items() for ph in phrases
            for m in re.finditer(rf"\b{re.escape(ph)}\b", text)]
    return min(hits)[1]


def test_same_seed_is_byte_identical(tmp_path):
    data.make_synthetic_dataset(tmp_path / "a", 30, seed=3)
    data.make_synthetic_dataset(tmp_path / "b", 30, seed=3)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 30 + 2 and a == b


def test_different_seed_or_split_differs(tmp_path):
    base = data.make_synthetic_dataset(tmp_path / "a", 30, seed=0)
    other_seed = data.make_synthetic_dataset(tmp_path / "b", 30, seed=1)
    other_split = data.make_synthetic_dataset(tmp_path / "c", 30, seed=0, split="test")
    for other, d in ((other_seed, "b"), (other_split, "c")):
        assert [r["long_captions"] for r in base] != [r["long_captions"] for r in other]
        pixels = lambda d, recs: [Image.open(tmp_path / d / r["image"]).tobytes() for r in recs]  # noqa: E731
        same = sum(x == y for x, y in zip(pixels("a", base), pixels(d, other)))
        assert same <= 3, f"{same}/30 images identical across seed/split"
    assert other_split[0]["image"] == "images/test_000000.png"


def test_manifest_and_caption_files_read_back(tmp_path):
    recs = data.make_synthetic_dataset(tmp_path, 25, split="val", num_long=4)
    manifest = [obj for _, obj in data.read_jsonl(tmp_path / "val.jsonl")]
    captions = [obj for _, obj in data.read_jsonl(tmp_path / "val_captions.jsonl")]
    assert manifest == recs and len(captions) == 25
    for r, c in zip(manifest, captions):
        assert set(r) == {"image", "captions", "long_captions"}
        assert r["image"].startswith("images/") and r["image"].endswith(".png")
        assert len(r["captions"]) == 2 and len(r["long_captions"]) == 4
        assert set(c) == {"id", "captions"} and c["captions"] == r["long_captions"]
    assert len({c["id"] for c in captions}) == 25


@pytest.mark.parametrize("size", [32, 64])
def test_images_exist_and_have_the_right_size(tmp_path, size):
    for r in data.make_synthetic_dataset(tmp_path, 20, image_size=size):
        with Image.open(tmp_path / r["image"]) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (size, size)


@pytest.mark.parametrize("size", [32, 64])
def test_captions_match_drawn_pixels(tmp_path, size):
    """Short caption = main object's colour and shape; the first long caption names the main object
    first; its colour sits at its position's centre, the background colour in the corner, and the
    set of colours drawn is exactly the set of colours the long caption names."""
    colour_of = {v: k for k, v in data.SYN_COLOURS.items()}
    for r in data.make_synthetic_dataset(tmp_path, 150, image_size=size, seed=7):
        short, long0 = r["captions"][0], r["long_captions"][0]
        _, colour, shape = short.split(" ", 2)
        assert colour == _earliest(long0, {c: [c] for c in data.SYN_COLOURS})
        assert shape == _earliest(long0, data.SYN_SHAPES)
        bg = _earliest(long0, {b: [b] for b in data.SYN_BACKGROUNDS})
        assert r["captions"][1] == f"{short} on a {bg} background"
        (fx, fy), _ = data.SYN_POSITIONS[_earliest(long0, {k: v[1] for k, v in data.SYN_POSITIONS.items()})]
        im = Image.open(tmp_path / r["image"]).convert("RGB")
        assert im.getpixel((int(fx * size), int(fy * size))) == data.SYN_COLOURS[colour], r
        assert im.getpixel((0, 0)) == data.SYN_BACKGROUNDS[bg]
        drawn = {colour_of[c] for _, c in im.getcolors() if c in colour_of}
        assert drawn == {c for c in data.SYN_COLOURS if re.search(rf"\b{c}\b", long0)}, r
        assert {c for _, c in im.getcolors()} <= set(colour_of) | {data.SYN_BACKGROUNDS[bg]}  # no blending


def test_caption_file_has_distinct_paraphrases(tmp_path):
    data.make_synthetic_dataset(tmp_path, 50)
    for _, rec in data.read_jsonl(tmp_path / "train_captions.jsonl"):
        assert len(rec["captions"]) >= 2 and len(set(rec["captions"])) == len(rec["captions"])


def test_content_is_diverse_enough_for_retrieval(tmp_path):
    recs = data.make_synthetic_dataset(tmp_path, 200, split="test")
    assert len({r["captions"][0] for r in recs}) >= 25  # of 6 colours x 5 shapes
    assert len({r["long_captions"][0] for r in recs}) >= 190
    assert {len(re.findall(r"\b(?:small|little|large|big)\b", r["long_captions"][0])) for r in recs} == {1, 2, 3}


def test_vocabulary_covers_every_caption(tmp_path):
    vocab = set(data.synthetic_vocabulary())
    recs = data.make_synthetic_dataset(tmp_path, 200)
    words = {w for r in recs for c in r["captions"] + r["long_captions"] for w in re.findall(r"\w+|[^\w\s]", c)}
    assert words <= vocab and len(vocab) < 100


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="num_long"):
        data.make_synthetic_dataset(tmp_path, 2, num_long=1)
    with pytest.raises(ValueError, match="image_size"):
        data.make_synthetic_dataset(tmp_path, 2, image_size=8)
