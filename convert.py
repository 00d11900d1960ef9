"""Converters: public annotation formats -> our manifest records (docs/evaluation.md): Karpathy's COCO /
Flickr30k splits, ShareGPT4V, Urban1k, DOCCI. `evaluate.py --task=convert` runs them; each reads its input
through data.py's readers, so a file of another shape is a DataError naming it and what was expected.
And one writer the other way: manifest records -> WebDataset tar shards (write_tar_shards)."""
import json
import os

from data import DataError, decode_text, read_json, read_jsonl


def convert_karpathy(src, split="test", captions_per_image=5, prefix="", log=print):
    """Karpathy's `dataset_coco.json` / `dataset_flickr30k.json` -> manifest records of one split.

    Image path = prefix + filepath/filename. COCO has images with 6-7 captions: the standard 5K
    protocol keeps the first 5, which we do with a printed count; fewer than 5 is an error.
    """
    images = read_json(src, what="Karpathy format {\"images\": [...]}").get("images")
    if not isinstance(images, list):
        raise DataError(f"{src}: expected Karpathy format {{\"images\": [...]}}")
    records, cut = [], 0
    for i, im in enumerate(images):
        where = f"{src}: images[{i}]"
        if not isinstance(im, dict):
            raise DataError(f"{where} is {type(im).__name__}; expected an object with \"filename\" and \"sentences\"")
        if im.get("split") != split:
            continue
        sents, fname, fpath = im.get("sentences", []), im.get("filename"), im.get("filepath", "")
        if not isinstance(sents, list) or not all(isinstance(t, dict) and isinstance(t.get("raw"), str) for t in sents):
            raise DataError(f"{where}: \"sentences\" must be a list of {{\"raw\": caption string}}, got {sents!r:.80}")
        if not isinstance(fname, str) or not fname or not isinstance(fpath, str):
            raise DataError(f"{where}: \"filename\" (and \"filepath\") must be strings, got {fname!r:.40}, {fpath!r:.40}")
        caps = [t["raw"].strip() for t in sents]
        name = os.path.join(fpath, fname)
        if len(caps) < captions_per_image:
            raise DataError(f"{src}: images[{i}] ({name}) has {len(caps)} captions, expected at least {captions_per_image}")
        cut += len(caps) > captions_per_image
        records.append({"image": prefix + name, "captions": caps[:captions_per_image]})
    if cut:
        log(f"karpathy: {cut} of {len(records)} images had more than {captions_per_image} captions; kept the first {captions_per_image}")
    if not records:
        raise DataError(f"{src}: no images with split {split!r}")
    return records


def convert_sharegpt4v(src, num=1000, prefix=""):
    """ShareGPT4V JSON (list of {"image", "conversations": [..., {"from": "gpt", "value": caption}]})
    -> the first `num` entries as 1:1 long-caption records (the paper's ShareGPT4V-1K)."""
    entries = read_json(src, list, "a ShareGPT4V JSON list of {\"image\", \"conversations\"}")
    records = []
    for i, e in enumerate(entries[:num]):
        turns = e.get("conversations", []) if isinstance(e, dict) else None
        if not isinstance(turns, list) or not all(isinstance(c, dict) for c in turns) or not isinstance(e.get("image"), str):
            raise DataError(f"{src}: entry {i}: expected {{\"image\": path, \"conversations\": [{{\"from\", \"value\"}}, "
                            f"...]}}, got {json.dumps(e)[:80]}")
        caps = [c["value"].strip() for c in turns if c.get("from") == "gpt" and isinstance(c.get("value"), str)]
        if "image" not in e or not caps or not caps[0]:
            raise DataError(f"{src}: entry {i}: expected an \"image\" and a \"gpt\" turn with the caption")
        records.append({"image": prefix + e["image"], "long_captions": [caps[0]]})
    if len(records) < num:
        raise DataError(f"{src}: {len(records)} entries, expected at least {num}")
    return records


def convert_urban1k(src, prefix=""):
    """Urban1K folder (`image/N.jpg` + `caption/N.txt`) -> 1:1 long-caption records, numeric order."""
    cap_dir, img_dir = os.path.join(src, "caption"), os.path.join(src, "image")
    if not os.path.isdir(cap_dir) or not os.path.isdir(img_dir):
        raise DataError(f"{src}: expected Urban1K folders 'image/' and 'caption/'")
    stems = sorted((os.path.splitext(n)[0] for n in os.listdir(cap_dir) if n.endswith(".txt")),
                   key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    images = {os.path.splitext(n)[0]: n for n in os.listdir(img_dir)}
    records = []
    for s in stems:
        if s not in images:
            raise DataError(f"{cap_dir}/{s}.txt: no matching image in {img_dir}")
        cap = os.path.join(cap_dir, s + ".txt")
        with open(cap, "rb") as f:
            text = decode_text(cap, f.read()).strip()
        if not text:
            raise DataError(f"{cap_dir}/{s}.txt: empty caption")
        records.append({"image": prefix + "image/" + images[s], "long_captions": [text]})
    if not records:
        raise DataError(f"{cap_dir}: no caption .txt files")
    return records


def convert_docci(src, split="test", prefix="images/"):
    """DOCCI `docci_descriptions.jsonlines` ({"image_file", "description", "split"}) -> 1:1 records."""
    records = []
    for lineno, obj in read_jsonl(src):
        if obj.get("split") != split:
            continue
        image, text = obj.get("image_file"), obj.get("description")
        if not isinstance(image, str) or not image or not isinstance(text, str) or not text.strip():
            raise DataError(f"{src}:{lineno}: expected an \"image_file\" string and a non-empty \"description\" "
                            f"string, got {image!r:.40}, {text!r:.40}")
        records.append({"image": prefix + obj["image_file"], "long_captions": [obj["description"].strip()]})
    if not records:
        raise DataError(f"{src}: no records with split {split!r}")
    return records


def write_tar_shards(records, pattern, per_shard=10000):
    """Manifest records (read_manifest's: resolved image paths) -> WebDataset tar shards in img2dataset's
    layout, the one scan_tar_shard reads: per record `<key>.<ext>` (the image file's bytes, unchanged) and
    `<key>.json` ({"captions", "long_captions"}), keys numbered in record order. `pattern` names shard i
    with `pattern.format(i)` (e.g. "out/{:05d}.tar"); each shard is written under a temp name and renamed.
    Returns the shard paths."""
    import io
    import tarfile
    from data_index import IMAGE_EXTS
    paths = []
    for s in range(0, len(records), per_shard):
        path = pattern.format(s // per_shard)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, rec in enumerate(records[s:s + per_shard], s):
                ext = os.path.splitext(rec["image"])[1].lower().lstrip(".")
                if ext not in IMAGE_EXTS:
                    raise DataError(f"{rec['image']}: a tar shard holds {', '.join(IMAGE_EXTS)} images, not {ext!r}")
                with open(rec["image"], "rb") as f:
                    image = f.read()
                caps = {k: rec.get(k) or [] for k in ("captions", "long_captions")}
                for name, payload in ((f"{i:09d}.{ext}", image), (f"{i:09d}.json", json.dumps(caps).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        os.replace(tmp, path)
        paths.append(path)
    return paths
