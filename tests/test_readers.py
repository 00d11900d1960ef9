"""One reader per input kind, one rule per oddity (data.py's module docstring), checked for every
reader that builds on it: text and JSONL files, JSON, records, class folders, images, tar shards.

Each bad input must be a DataError that names the file and line (or shard::member, or the field) and
says what was expected; each accepted oddity must read exactly as the plain file does; whatever a
reader skips is counted. Property tests: valid text round-trips unchanged, arbitrary bytes give a
record or a DataError naming the file, never another exception.
"""
import io
import json
import os
import re
import struct
import sys
import tarfile
import warnings
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cache import cache_texts  # noqa: E402
import convert as convert_mod  # noqa: E402
import data  # noqa: E402
from data import DataError  # noqa: E402
import data_index  # noqa: E402


def quiet(*a):
    pass


# --- the JSONL readers, each with a record maker that puts a given text into one of its fields

def _manifest_rec(i, text):
    return {"image": f"im{i}.png", "captions": [text]}


def _index_records(path):
    idx = data_index.build_train_index(path + ".index", manifest=path, check_images=False, log=quiet)
    return [(os.path.basename(idx[r]["image"]), idx[r]["captions"]) for r in range(len(idx))]


READERS = {  # name -> (read(path) -> what it read, free of line numbers; record(i, text); the field of the text)
    "caption_records": (lambda p: [(r["id"], r["captions"]) for r in data.read_caption_records(p)],
                        lambda i, t: {"id": f"r{i}", "captions": [t, "other"]}, "captions[0]"),
    "text_pairs": (lambda p: [(r["id"], r["captions"]) for r in data.read_text_pairs(p)],
                   lambda i, t: {"id": f"r{i}", "query": t, "positive": "p"}, "query"),
    "manifest": (lambda p: [(os.path.basename(r["image"]), r["captions"]) for r in data.read_manifest(p, check_images=False)],
                 _manifest_rec, "captions[0]"),
    "train_index": (_index_records, _manifest_rec, "captions[0]"),
    "cache_texts": (lambda p: cache_texts(p).texts, _manifest_rec, "captions[0]"),
    "read_jsonl": (lambda p: [obj for _, obj in data.read_jsonl(p)], _manifest_rec, "captions[0]"),
}


def _line(reader, i, text="fine", raw=None):
    """Line i (bytes, no line end) of a valid file for `reader`; `raw` replaces the JSON text's
    "TEXT" placeholder with raw bytes (json.dumps cannot write invalid UTF-8 or escapes on purpose)."""
    rec = READERS[reader][1](i, "TEXT" if raw is not None else text)
    line = json.dumps(rec, ensure_ascii=False).encode()
    return line.replace(b"TEXT", raw) if raw is not None else line


def _file(tmp_path, reader, lines, name="f.jsonl", sep=b"\n", prefix=b""):
    p = tmp_path / name
    p.write_bytes(prefix + sep.join(lines) + (sep if lines else b""))
    return str(p)


ACCEPTED = {  # oddity -> (bytes before the file, line separator, lines around the records)
    "BOM at the start": (b"\xef\xbb\xbf", b"\n", False),
    "CRLF line ends": (b"", b"\r\n", False),
    "BOM and CRLF": (b"\xef\xbb\xbf", b"\r\n", False),
    "blank lines": (b"", b"\n", True),
}


@pytest.mark.parametrize("oddity", ACCEPTED)
@pytest.mark.parametrize("reader", READERS)
def test_accepted_oddities_read_as_the_plain_file(tmp_path, reader, oddity):
    prefix, sep, blanks = ACCEPTED[oddity]
    lines = [_line(reader, i, f"caption {i} \u00e9\u4e2d") for i in range(3)]
    plain = READERS[reader][0](_file(tmp_path, reader, lines, "plain.jsonl"))
    odd_lines = [x for ln in lines for x in (ln, b"   ")] if blanks else lines
    odd = READERS[reader][0](_file(tmp_path, reader, odd_lines, "odd.jsonl", sep, prefix))
    assert odd == plain and len(plain) == 3


def test_bom_is_outside_the_byte_range_of_line_one(tmp_path):
    p = _file(tmp_path, "manifest", [_line("manifest", 0), _line("manifest", 1)], prefix=b"\xef\xbb\xbf", sep=b"\r\n")
    rows = list(data.scan_jsonl(p))
    raw = open(p, "rb").read()
    assert rows[0][1] == 3 and all(json.loads(raw[off:off + size]) == obj for _, off, size, obj in rows)


# every rule of the text and JSON readers, for every reader: line 2 is the bad one
REFUSED = {
    "invalid UTF-8": (dict(raw=b"caf\xe9"), r"{f}:2: byte \d+ \(b'\\xe9'\) is not UTF-8; expected UTF-8"),
    "an encoded surrogate": (dict(raw=b"\xed\xa0\x80"), r"{f}:2: byte \d+ .* is not UTF-8; expected UTF-8"),
    "a lone surrogate escape": (dict(raw=b"x\\ud800y"), r"{f}:2: field {field}: lone surrogate U\+D800 .*expected valid Unicode"),
    "a lone low surrogate": (dict(raw=b"\\udc00"), r"{f}:2: field {field}: lone surrogate U\+DC00"),
    "a NUL escape": (dict(raw=b"a\\u0000b"), r"{f}:2: field {field}: NUL character at position 1"),
    "a raw NUL byte": (dict(raw=b"a\x00b"), r"{f}:2: NUL character at position \d+; expected text"),
    "malformed JSON": (dict(raw=b'"'), r"{f}:2: malformed JSON \(.*\); expected one JSON object per line"),
}


@pytest.mark.parametrize("rule", REFUSED)
@pytest.mark.parametrize("reader", READERS)
def test_bad_text_is_refused_naming_file_line_and_field(tmp_path, reader, rule):
    kwargs, message = REFUSED[rule]
    p = _file(tmp_path, reader, [_line(reader, 0), _line(reader, 1, **kwargs), _line(reader, 2)])
    with pytest.raises(DataError, match=message.format(f=re.escape(p), field=re.escape(READERS[reader][2]))):
        READERS[reader][0](p)


WHOLE_LINE = {  # a whole bad line 2
    "a key twice in one object": (b'{"id": "x", "image": "a.png", "captions": ["c", "d"], "captions": ["e", "f"]}',
                                  r"{f}:2: duplicate key 'captions' in one JSON object; expected each key once"),
    "a key twice in a nested object": (b'{"id": "x", "image": "a.png", "captions": ["c", "d"], "m": {"k": 1, "k": 2}}',
                                       r"{f}:2: duplicate key 'k'"),
    "not an object": (b'["a", "b"]', r"{f}:2: expected a JSON object, got list"),
    "a BOM starting a later line": (b"\xef\xbb\xbf" + b'{"id": "y"}', r"{f}:2: a UTF-8 byte-order mark starts this line"),
    "UTF-16 text": ('{"id": "y"}'.encode("utf-16"), r"{f}:2: byte 0 .* UTF-16 byte-order mark\); expected UTF-8"),
    "nested too deeply": (b"[" * 100000, r"{f}:2: malformed JSON \(nested too deeply\)"),
    "an integer too long": (b'{"n": ' + b"9" * 5000 + b"}", r"{f}:2: malformed JSON \(Exceeds the limit"),
}


@pytest.mark.parametrize("rule", WHOLE_LINE)
@pytest.mark.parametrize("reader", READERS)
def test_bad_lines_are_refused_naming_file_and_line(tmp_path, reader, rule):
    line, message = WHOLE_LINE[rule]
    p = _file(tmp_path, reader, [_line(reader, 0), line, _line(reader, 2)])
    with pytest.raises(DataError, match=message.format(f=re.escape(p))):
        READERS[reader][0](p)


EMPTY = {"caption_records": "no records", "text_pairs": "no records", "manifest": "empty manifest",
         "train_index": "no records", "cache_texts": "no records", "read_jsonl": "no records"}


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xef\xbb\xbf", b" \r\n\t\r\n"], ids=["empty", "newlines", "BOM", "blank"])
@pytest.mark.parametrize("reader", READERS)
def test_empty_file_is_refused(tmp_path, reader, content):
    p = tmp_path / "f.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{p}: {EMPTY[reader]}")):
        READERS[reader][0](str(p))


# --- field types and repeated records (each reader's own fields)

FIELDS = [  # reader, line 2, message
    ("caption_records", {"id": "b", "captions": "one string"}, r'{f}:2: expected a "captions" list of >= 2 strings, got str'),
    ("caption_records", {"id": "b", "captions": ["a", 3]}, r"{f}:2: caption 1 is 3; expected a non-empty string"),
    ("caption_records", {"id": "b", "captions": ["a", ""]}, r"{f}:2: caption 1 is ''; expected a non-empty string"),
    ("caption_records", {"id": "b", "captions": ["a"]}, r"{f}:2: expected >= 2 captions per record"),
    ("text_pairs", {"query": "q", "positive": ["p"]}, r"""{f}:2: "positive" is \['p'\]; expected a non-empty string"""),
    ("text_pairs", {"query": "q", "positive": "p", "negative": 5}, r'{f}:2: "negative" is 5; expected a non-empty string'),
    ("manifest", {"image": 5, "captions": ["c"]}, r"{f}:2: 'image' must be a relative image path string, got 5"),
    ("manifest", {"image": ["a.png"], "captions": ["c"]}, r"{f}:2: 'image' must be a relative image path string"),
    ("manifest", {"image": " ", "captions": ["c"]}, r'{f}:2: missing "image"'),
    ("manifest", {"image": "b.png", "captions": "c"}, r"{f}:2: 'captions' must be a list of strings, got 'c'"),
    ("manifest", {"image": "b.png", "captions": [None]}, r"{f}:2: 'captions' must be a list of strings"),
    ("manifest", {"image": "b.png", "long_captions": ["ok", "  "]}, r"{f}:2: long_captions\[1\] is an empty caption"),
    ("manifest", {"image": "b.png"}, r"{f}:2: no captions"),
    ("train_index", {"image": 5, "captions": ["c"]}, r"{f}:2: 'image' must be a relative image path string, got 5"),
    ("train_index", {"image": "b.png", "captions": {"a": 1}}, r"{f}:2: 'captions' must be a list of strings"),
    ("cache_texts", {"image": "b.png", "captions": [1]}, r"{f}:2: field 'captions' must be a list of strings"),
]


@pytest.mark.parametrize("reader, rec, message", FIELDS)
def test_a_field_of_the_wrong_type_names_file_line_and_field(tmp_path, reader, rec, message):
    p = _file(tmp_path, reader, [_line(reader, 0), json.dumps(rec).encode()])
    with pytest.raises(DataError, match=message.format(f=re.escape(p))):
        READERS[reader][0](p)


REPEATS = [  # reader, lines, message: the later line, the earlier one, what is expected
    ("caption_records", [{"id": "a", "captions": ["x", "y"]}, {"id": "b", "captions": ["x", "y"]},
                         {"id": "a", "captions": ["z", "w"]}],
     r"{f}:3: id 'a' again \(first on line 1\); expected one record per id"),
    ("caption_records", [{"id": 7, "captions": ["x", "y"]}, {"id": "7", "captions": ["x", "y"]}],
     r"{f}:2: id '7' again \(first on line 1\)"),
    ("text_pairs", [{"id": "q", "query": "a", "positive": "b"}, {"id": "q", "query": "c", "positive": "d"}],
     r"{f}:2: id 'q' again \(first on line 1\)"),
    ("manifest", [{"image": "a.jpg", "captions": ["one"]}, {"image": "b.jpg", "captions": ["two"]},
                  {"image": "a.jpg", "captions": ["three"]}],
     r"{f}:3: image 'a.jpg' again \(first on line 1\); expected one record per image with a list of captions "
     r"\(not one line per caption\)"),
    ("manifest", [{"image": "d/a.jpg", "captions": ["one"]}, {"image": "./d//a.jpg", "captions": ["two"]}],
     r"{f}:2: image 'd/a.jpg' again \(first on line 1\)"),
    ("train_index", [{"image": "b.jpg", "captions": ["x"]}] + [{"image": f"{i}.jpg", "captions": ["x"]} for i in range(50)]
     + [{"image": "b.jpg", "captions": ["y"]}], r"{f}:52: image 'b.jpg' again \(first on line 1\); expected one record per image"),
]


@pytest.mark.parametrize("reader, recs, message", REPEATS)
def test_a_repeated_record_names_both_lines(tmp_path, reader, recs, message):
    p = _file(tmp_path, reader, [json.dumps(r).encode() for r in recs])
    with pytest.raises(DataError, match=message.format(f=re.escape(p))):
        READERS[reader][0](p)


def test_records_without_ids_and_distinct_images_are_not_repeats(tmp_path):
    p = _file(tmp_path, "caption_records", [json.dumps({"captions": ["x", "y"]}).encode()] * 3)
    assert [r["id"] for r in data.read_caption_records(p)] == [f"{p}:{i}" for i in (1, 2, 3)]
    recs = [{"image": n, "captions": ["c"]} for n in ("a.jpg", "A.jpg", "a.jpeg", "sub/a.jpg")]
    assert len(data.read_manifest(_file(tmp_path, "manifest", [json.dumps(r).encode() for r in recs]),
                                  check_images=False)) == 4


def test_a_repeated_key_check_survives_hash_collisions(tmp_path):
    keys = data.UniqueKeys("f.jsonl", "image")
    for line, k in ((1, "a"), (2, "b"), (3, "c")):
        keys.add(k, line)
    keys.hashes[2] = keys.hashes[0]  # a forced 64-bit collision between different keys: not a repeat
    keys.check(["a", "b", "c"].__getitem__)


# --- whole JSON files (converters) and one-item-per-line text files (class names, templates)

@pytest.mark.parametrize("content, message", [
    (b'{"images": [], "images": []}', r"{f}: duplicate key 'images'"),
    (b'{"images": ["\\ud83d"]}', r"{f}: field images\[0\]: lone surrogate U\+D83D"),
    (b'\xff{"images": []}', r"{f}: byte 0 .* is not UTF-8; expected UTF-8"),
    (b'{"images": [', r"{f}: malformed JSON \(.* at line 1 column 13\); expected Karpathy format"),
    (b"[]", r"{f}: expected a JSON object, got list"),
])
def test_whole_json_files_follow_the_same_rules(tmp_path, content, message):
    p = tmp_path / "k.json"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message.format(f=re.escape(str(p)))):
        convert_mod.convert_karpathy(str(p))


@pytest.mark.parametrize("convert, content, message", [
    ("karpathy", {"images": [{"split": "test", "filename": "a.jpg", "sentences": "x"}]},
     r"{f}: images\[0\]: \"sentences\" must be a list of \{{\"raw\": caption string\}}"),
    ("karpathy", {"images": [{"split": "test", "filename": 3, "sentences": []}]}, r"{f}: images\[0\]: \"filename\""),
    ("karpathy", {"images": ["a.jpg"]}, r"{f}: images\[0\] is str; expected an object"),
    ("sharegpt4v", [{"image": "a.jpg", "conversations": "gpt: long"}], r"{f}: entry 0: expected \{{\"image\": path"),
    ("sharegpt4v", [{"image": 5, "conversations": []}], r"{f}: entry 0: expected"),
    ("sharegpt4v", {"annotations": []}, r"{f}: expected a JSON list, got dict"),
])
def test_converter_inputs_of_the_wrong_shape_name_the_entry(tmp_path, convert, content, message):
    p = tmp_path / "src.json"
    p.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message.format(f=re.escape(str(p)))):
        getattr(convert_mod, f"convert_{convert}")(str(p), **({"num": 1} if convert == "sharegpt4v" else {}))


def test_docci_fields_of_the_wrong_type_name_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"image_file": "a.jpg", "description": "d", "split": "test"}) + "\n"
                 + json.dumps({"image_file": 3, "description": 4, "split": "test"}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{p}:2: expected an \"image_file\" string")):
        convert_mod.convert_docci(str(p))


def test_json_pairs_of_surrogates_are_one_character(tmp_path):
    p = _file(tmp_path, "caption_records", [b'{"id": "a", "captions": ["\\ud83d\\ude00", "ok"]}'])
    assert data.read_caption_records(p)[0]["captions"][0] == "\U0001F600"


def _class_folder(root, classes=("cat", "dog")):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        Image.new("RGB", (4, 4), (200, 0, 0)).save(root / c / "0.png")
    return root


@pytest.mark.parametrize("content, expect", [
    (b"\xef\xbb\xbfa cat\r\na dog\r\n", ["a cat", "a dog"]),
    (b"a cat\n\n  \na dog", ["a cat", "a dog"]),
    (b"a cat\na d\xf6g\n", r"names.txt:2: byte 3 .* is not UTF-8; expected UTF-8"),
    (b"a cat\na\x00dog\n", r"names.txt:2: NUL character"),
    (b"\n\n", r"names.txt: no class names; expected one per line"),
])
def test_class_name_files_follow_the_text_rules(tmp_path, content, expect):
    root = _class_folder(tmp_path / "f")
    (tmp_path / "names.txt").write_bytes(content)
    if isinstance(expect, list):
        assert data.read_class_folder(str(root), str(tmp_path / "names.txt"))[2] == expect
    else:
        with pytest.raises(DataError, match=expect):
            data.read_class_folder(str(root), str(tmp_path / "names.txt"))


def test_template_files_follow_the_text_rules(tmp_path):
    root = _class_folder(tmp_path / "f")
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfa photo of a {}.\r\nart of a {}.\r\n")
    assert data.read_class_folder(str(root), templates_file=str(tmp_path / "t.txt"))[3] == ["a photo of a {}.", "art of a {}."]
    (tmp_path / "t.txt").write_bytes(b"a photo of a {}.\n\xc3\x28\n")
    with pytest.raises(DataError, match=r"t.txt:2: byte 0 .*expected UTF-8"):
        data.read_class_folder(str(root), templates_file=str(tmp_path / "t.txt"))


# --- class folders: hidden entries and non-images skipped and counted; an empty class refused

def test_class_folder_skips_hidden_and_non_image_entries_and_says_how_many(tmp_path):
    root = _class_folder(tmp_path / "f")
    for p in ("__MACOSX/cat", ".ipynb_checkpoints", "cat/.thumbs"):
        os.makedirs(root / p)
    for p in (".DS_Store", "cat/._0.png", "cat/notes.txt", "dog/labels.csv", "README.md"):
        (root / p).write_text("x")
    said = []
    paths, labels, names, _ = data.read_class_folder(str(root), log=said.append)
    assert names == ["cat", "dog"] and labels == [0, 1]
    assert [os.path.relpath(p, root) for p in paths] == ["cat/0.png", "dog/0.png"]
    assert said == [f"{root}: skipped 5 hidden entries, 1 files beside the class folders, 2 non-image files "
                    "(read 2 images in 2 classes)"]
    said.clear()
    data.read_class_folder(str(_class_folder(tmp_path / "clean")), log=said.append)
    assert said == []  # nothing skipped, nothing said


def test_empty_class_is_refused_unless_allowed(tmp_path):
    root = _class_folder(tmp_path / "f", ("cat", "dog", "eel"))
    os.remove(root / "eel" / "0.png")
    (root / "eel" / "about.txt").write_text("x")
    with pytest.raises(DataError, match=re.escape(f"{root / 'eel'}: class 'eel' has no images (1 entries")
                       + ".*expected at least one image per class"):
        data.read_class_folder(str(root))
    assert data.read_class_folder(str(root), allow_empty_classes=True, log=quiet)[2] == ["cat", "dog", "eel"]


# --- images: every mode to RGB by one rule; every failure a DataError naming the image

def _px(img):
    return data.to_rgb(img).getpixel((0, 0))


def _transparent_palette():
    im = Image.new("P", (2, 2), 1)
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    im.info["transparency"] = 1
    return im


MODES = [  # image, its RGB pixel (0, 0)
    (Image.new("RGB", (2, 2), (1, 2, 3)), (1, 2, 3)),
    (Image.new("RGBA", (2, 2), (10, 20, 30, 0)), (255, 255, 255)),  # transparent: white, not what lies under
    (Image.new("RGBA", (2, 2), (0, 0, 0, 128)), (127, 127, 127)),  # half black over white
    (Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
    (Image.new("La", (2, 2), (0, 0)), (255, 255, 255)),
    (Image.new("PA", (2, 2), (0, 0)), (255, 255, 255)),
    (_transparent_palette(), (255, 255, 255)),
    (Image.new("I;16", (2, 2), 65535), (255, 255, 255)),  # 16 bit: divided by 257, not clipped at 255
    (Image.new("I;16", (2, 2), 257 * 100), (100, 100, 100)),
    (Image.new("I;16B", (2, 2), 257 * 7), (7, 7, 7)),
    (Image.new("I", (2, 2), 257 * 200), (200, 200, 200)),
    (Image.new("I", (2, 2), -5), (0, 0, 0)),  # clipped
    (Image.new("F", (2, 2), 0.5), (128, 128, 128)),  # float: 0..1
    (Image.new("F", (2, 2), 7.0), (255, 255, 255)),
    (Image.new("1", (2, 2), 1), (255, 255, 255)),
    (Image.new("L", (2, 2), 9), (9, 9, 9)),
    (Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0)),
]


@pytest.mark.parametrize("img, rgb", MODES, ids=[f"{m.mode}-{i}" for i, (m, _) in enumerate(MODES)])
def test_every_mode_becomes_rgb_by_its_rule(img, rgb):
    out = data.to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size and out.getpixel((0, 0)) == rgb


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("LA", "PNG"), ("1", "BMP"),
                                       ("CMYK", "JPEG"), ("F", "TIFF"), ("L", "WEBP")])
def test_open_image_reads_files_of_every_mode(tmp_path, mode, fmt):
    p = tmp_path / f"x.{fmt.lower()}"
    Image.new(mode, (3, 5)).save(p, fmt)
    img = data.open_image({"image": str(p)})
    assert img.mode == "RGB" and img.size == (3, 5)


def _png(w, h):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * w) * h)) + chunk(b"IEND", b""))


def _saved(fmt, size=(32, 32)):
    b = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(b, fmt)
    return b.getvalue()


BAD_IMAGES = {  # name -> (bytes, or None: no file; or "dir"), message after "<path>: "
    "missing": (None, r"image file not found"),
    "a folder": ("dir", r"cannot read image \(IsADirectoryError"),
    "empty": (b"", r"empty image file \(0 bytes\); expected an image"),
    "not an image": (b"<html>404</html>", r"cannot read image \(UnidentifiedImageError"),
    "truncated PNG": (_saved("PNG")[:300], r"cannot read image \(OSError: .*truncated"),
    "truncated JPEG": (_saved("JPEG")[:400], r"cannot read image \(OSError: .*(?i:truncated)"),
    "corrupt PNG data": (_saved("PNG")[:100] + b"\0" * 400 + _saved("PNG")[500:], r"cannot read image"),
    "zero width": (_png(0, 4), r"(cannot read image|image of size 0x4)"),
}


def _write_bad(tmp_path, name):
    content, _ = BAD_IMAGES[name]
    p = tmp_path / (re.sub(r"\W", "_", name) + ".png")
    if content == "dir":
        os.makedirs(p)
    elif content is not None:
        p.write_bytes(content)
    return str(p)


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_image_is_a_data_error_naming_it(tmp_path, name):
    p = _write_bad(tmp_path, name)
    with pytest.raises(DataError, match=re.escape(p) + ": " + BAD_IMAGES[name][1]):
        data.open_image({"image": p})
    with pytest.raises(DataError, match=re.escape(p) + r" \(manifest line 7\): "):  # read_manifest's records
        data.open_image({"image": p, "line": 7})
    with pytest.raises(DataError, match=re.escape(p) + ": "):  # what every eval dataset calls
        data.ImageDataset([p], lambda im: im)[0]


def test_decompression_bombs_are_data_errors(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 pixels > 2 x 100: PIL's error
    with pytest.raises(DataError, match=re.escape(str(p)) + r": image too large \(.*\); expected at most "
                       r"Image.MAX_IMAGE_PIXELS=100 pixels"):
        data.open_image({"image": str(p)})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 > 300: PIL only warns, and would decode it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(DataError, match=re.escape(f"{p}: image too large (20x20 = 400 pixels); expected at most "
                                                      "Image.MAX_IMAGE_PIXELS=300 pixels")):
            data.open_image({"image": str(p)})
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # the warning turned into an error
        with pytest.raises(DataError, match=re.escape(str(p)) + ": image too large"):
            data.open_image({"image": str(p)})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the limit switched off: read as it is
    assert data.open_image({"image": str(p)}).size == (20, 20)


def test_tar_record_byte_range_past_the_shard_is_a_data_error(tmp_path):
    p = tmp_path / "s.tar"
    p.write_bytes(b"x" * 100)
    with pytest.raises(DataError, match=re.escape(f"{p}::a.png: truncated: 50 of its 60 bytes in {p}")):
        data.open_image({"image": f"{p}::a.png", "_tar": [str(p), 50, 60]})


def test_skip_bad_images_covers_every_failure_and_counts_it(tmp_path):
    """Every kind of bad image in one training manifest: without skip_bad_images each is a DataError
    naming it and its manifest line; with it, each is skipped, listed in "bad", and replaced."""
    good = [tmp_path / f"good{i}.png" for i in range(2)]
    for g in good:
        Image.new("RGB", (8, 8)).save(g)
    bad = [_write_bad(tmp_path, n) for n in BAD_IMAGES]
    big = tmp_path / "huge.png"
    Image.new("RGB", (300, 300)).save(big)  # a decompression bomb once MAX_IMAGE_PIXELS is lowered below
    bad.append(str(big))
    images = [str(good[0])] + bad + [str(good[1])]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"image": os.path.basename(p), "captions": [f"c{i}"]}) + "\n" for i, p in enumerate(images)))
    idx = data_index.build_train_index(str(tmp_path / "i"), manifest=str(m), check_images=False, log=quiet)
    keep = lambda img, rng: img.size  # noqa: E731
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 20000
    try:
        strict = data_index.TrainSamples(idx, keep)
        for r, p in enumerate(images[1:-1], 1):
            with pytest.raises(DataError, match=re.escape(f"{p} ({m}:{r + 1}): ") + ".*skip_bad_images=True"):
                strict[(0, r)]
        skipping = data_index.TrainSamples(idx, keep, skip_bad_images=True)
        item = skipping[(0, 1)]
        assert item["index"] == len(images) - 1 and item["bad"] == bad  # all skipped, in order, then the good one
        batch = data_index.collate_train([dict(skipping[(0, r)], image=torch.zeros(1)) for r in (0, 3)])
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert batch["bad"] == bad[2:]  # the count post_train.py reports
    assert strict[(0, 0)]["image"] == (8, 8)


# --- tar shards: captions by the same text/JSON rules, naming shard::member; what is skipped is counted

def _shard(path, members):
    """members: (name, bytes) or (name, None) for a folder."""
    with tarfile.open(path, "w") as tf:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
    return str(path)


PNG = _saved("PNG", (8, 8))

TAR_BAD = [  # members after a good first sample, message after "<shard>"
    ([("1.png", PNG), ("1.txt", b"caf\xe9")], r"::1.txt: byte 3 .* is not UTF-8; expected UTF-8"),
    ([("1.png", PNG), ("1.txt", b"a\x00b")], r"::1.txt: NUL character"),
    ([("1.png", PNG), ("1.json", b'{"captions": ["a"], "captions": ["b"]}')], r"::1.json: duplicate key 'captions'"),
    ([("1.png", PNG), ("1.json", b'{"captions": ["\\ud800"]}')], r"::1.json: field captions\[0\]: lone surrogate"),
    ([("1.png", PNG), ("1.json", b'{"captions": ["\xff"]}')], r"::1.json: byte \d+ .*expected UTF-8"),
    ([("1.png", PNG), ("1.json", b'["a"]')], r"::1.json: expected a JSON object, got list"),
    ([("1.png", PNG), ("1.json", b'{"captions": [')], r"::1.json: malformed JSON .*expected a JSON object of captions"),
    ([("1.png", PNG), ("1.json", b'{"captions": [""]}')], r"::1.json: captions\[0\] is an empty caption"),
    ([("1.png", PNG), ("1.json", b'{"long_captions": "x"}')], r"::1.json: 'long_captions' must be a list of strings"),
    ([("1.png", PNG)], r"::1: no caption \(expected 1.txt or captions/long_captions in 1.json\)"),
    ([("1.png", PNG), ("1.txt", b"x"), ("1.txt", b"y")], r"::1.txt: member name appears twice in the shard"),
    ([("1.png", PNG), ("1.jpg", PNG), ("1.txt", b"x")], r"::1.jpg: a second image for sample '1' \(first '1.png'\)"),
]


@pytest.mark.parametrize("members, message", TAR_BAD)
def test_bad_tar_member_names_shard_and_member(tmp_path, members, message):
    shard = _shard(tmp_path / "s.tar", [("0.png", PNG), ("0.txt", b"fine")] + members)
    with pytest.raises(DataError, match=re.escape(shard) + message):
        data_index.index_tar_shards([shard])


def test_truncated_tar_names_the_member(tmp_path):
    shard = _shard(tmp_path / "s.tar", [("0.png", PNG), ("0.txt", b"a"), ("1.png", PNG), ("1.txt", b"b")])
    raw = open(shard, "rb").read()
    members = tarfile.open(shard).getmembers()
    open(shard, "wb").write(raw[:members[2].offset_data + 10])
    with pytest.raises(DataError, match=re.escape(f"{shard}: truncated tar shard: member '1.png' needs bytes")):
        data_index.index_tar_shards([shard])


def test_tar_skips_are_counted_and_logged_and_bad_images_named_when_read(tmp_path):
    shard = _shard(tmp_path / "s.tar", [
        ("d", None), ("0.png", PNG), ("0.txt", b"\xef\xbb\xbfa caption\r\n"), ("0.cls", b"3"),
        ("1.json", b'{"status": "failed_to_download"}'), ("2.jpg", b"<html>not an image</html>"), ("2.txt", b"x")])
    skipped = {}
    recs = data_index.index_tar_shards([shard], skipped)
    assert [(r["image"], r["captions"]) for r in recs] == [(f"{shard}::0.png", ["a caption"]), (f"{shard}::2.jpg", ["x"])]
    assert skipped == {"non-file members (folders, links)": 1, "members of other kinds": 1, "samples without an image": 1}
    said = []
    idx = data_index.build_train_index(str(tmp_path / "i"), shards=[shard], log=said.append)
    assert any("skipped, not samples): 1 members of other kinds, 1 non-file members (folders, links), "
               "1 samples without an image" in s for s in said)
    assert data.open_image(idx[0]).size == (8, 8)
    with pytest.raises(DataError, match=re.escape(f"{shard}::2.jpg") + ".*cannot read image"):
        data.open_image(idx[1])


# --- properties: valid text round-trips; arbitrary bytes give records or a DataError naming the file

TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1).filter(str.strip)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("prop")


@FAST
@given(captions=st.lists(TEXT, min_size=2, max_size=4), ascii=st.booleans(), bom=st.booleans(), crlf=st.booleans())
def test_valid_text_round_trips_unchanged(scratch, captions, ascii, bom, crlf):
    sep = "\r\n" if crlf else "\n"
    p = scratch / "rt.jsonl"
    body = sep.join(json.dumps({"id": str(i), "captions": captions}, ensure_ascii=ascii) for i in range(2)) + sep
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8"))
    assert [r["captions"] for r in data.read_caption_records(str(p))] == [captions, captions]
    m = scratch / "rt_m.jsonl"
    m.write_bytes(body.replace('"id": "', '"image": "').encode("utf-8"))
    assert [r["captions"] for r in data.read_manifest(str(m), check_images=False)] == [captions, captions]


@FAST
@given(text=TEXT, at=st.integers(0, 50), code=st.integers(0xD800, 0xDFFF))
def test_any_lone_surrogate_is_refused(scratch, text, at, code):
    p = scratch / "s.jsonl"
    bad = json.dumps(text[:at])[:-1] + f"\\u{code:04x}" + json.dumps(text[at:])[1:]
    p.write_text(f'{{"id": "a", "captions": ["ok", {bad}]}}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{p}:1: field captions[1]: lone surrogate U+{code:04X}")):
        data.read_caption_records(str(p))


_VALID = b'{"id": "a", "image": "x.png", "captions": ["a red \\u00e9 circle", "b"], "query": "q", "positive": "p"}\n'


def _mutated(base):
    """Bytes near `base`: random insertions, deletions and overwrites, or wholly random bytes."""
    def apply(edits):
        b = bytearray(base)
        for pos, val, kind in edits:
            pos %= len(b) + 1
            if kind == 0:
                b[pos:pos] = val
            elif kind == 1:
                del b[pos:pos + len(val)]
            else:
                b[pos:pos + len(val)] = val
        return bytes(b)
    edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=4), st.integers(0, 2)), max_size=6)
    return st.one_of(st.binary(max_size=200), edits.map(apply))


@FAST
@given(content=_mutated(_VALID * 2))
def test_arbitrary_bytes_give_records_or_a_data_error_naming_the_file(scratch, content):
    p = scratch / "any.jsonl"
    p.write_bytes(content)
    for name in ("caption_records", "text_pairs", "manifest", "read_jsonl"):
        try:
            READERS[name][0](str(p))
        except DataError as e:
            assert str(e).startswith(str(p)) and "\n" not in str(e)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt TIFF tags it skips ...
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # ... and huge sizes open_image refuses
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.sampled_from([_saved("PNG", (6, 6)), _saved("JPEG", (6, 6)), _saved("GIF", (6, 6)),
                                _saved("BMP", (6, 6)), _saved("TIFF", (6, 6)), _saved("WEBP", (6, 6))]).flatmap(_mutated))
def test_arbitrary_image_bytes_give_an_rgb_image_or_a_data_error_naming_it(scratch, content):
    p = scratch / "any.img"
    p.write_bytes(content)
    try:
        img = data.open_image({"image": str(p)})
    except DataError as e:
        assert str(e).startswith(f"{p}: ") and "\n" not in str(e)
    else:
        assert img.mode == "RGB" and img.width > 0 and img.height > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(caption=_mutated(b'{"captions": ["a \\u00e9"], "long_captions": ["b"]}'))
def test_arbitrary_tar_caption_bytes_give_records_or_a_data_error_naming_the_member(scratch, caption):
    shard = _shard(scratch / "any.tar", [("0.png", PNG), ("0.json", caption)])
    try:
        recs = data_index.index_tar_shards([shard])
    except DataError as e:
        assert str(e).startswith(f"{shard}::0") and "\n" not in str(e)
    else:
        assert len(recs) == 1 and all(isinstance(c, str) and c.strip() for c in recs[0]["captions"])
