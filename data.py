"""Data for every stage: caption files, manifests, images, the embedding cache, samplers, synthetic data.

Plain Python + numpy + PIL; no project imports, so each stage script reads data the same way.
Every reader names the file and line of bad input and what it expected; nothing is silently dropped.
"""
import json
import os


class DataError(ValueError):
    """Bad input data: the message names the file (and line) and what was expected."""


def read_jsonl(path):
    """Yield (line_number, object) for each non-empty line of a JSONL file, with clear errors."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


# === captions and caption pairs (stage 1, c2c eval) ===


# === image-text manifests, images and transforms (stage 2, retrieval eval) ===

def _caption_list(path, lineno, obj, key):
    """obj[key] as a list of non-empty strings ([] when absent), else a DataError naming the line."""
    caps = obj.get(key, [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise DataError(f"{path}:{lineno}: {key!r} must be a list of strings, got {caps!r:.80}")
    for i, c in enumerate(caps):
        if not c.strip():
            raise DataError(f"{path}:{lineno}: {key}[{i}] is an empty caption")
    return caps


def read_manifest(path, image_root=None, field=None, captions_per_image=0, check_images=True):
    """Read an image-text manifest: JSONL `{"image": rel_path, "captions": [...], "long_captions": [...]}`.

    Returns a list of {"image": resolved path, "captions", "long_captions", "line"}. `image_root`
    defaults to the manifest's folder. With `field`, every record must have at least one caption in
    that field, and exactly `captions_per_image` of them when that is > 0 (the 5-caption protocol of
    Flickr30k/COCO: a silently short record would change what R@k means). Missing image files and an
    empty manifest are errors, named with file:line, so a bad path fails before any model runs.
    """
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    records = []
    for lineno, obj in read_jsonl(path):
        image = obj.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{path}:{lineno}: missing \"image\" (expected a relative image path string)")
        rec = {"image": os.path.join(root, image), "line": lineno,
               "captions": _caption_list(path, lineno, obj, "captions"),
               "long_captions": _caption_list(path, lineno, obj, "long_captions")}
        if not rec["captions"] and not rec["long_captions"]:
            raise DataError(f"{path}:{lineno}: no captions (\"captions\" and \"long_captions\" are both empty or absent)")
        if field is not None:
            n = len(rec.get(field, []))
            if n == 0:
                raise DataError(f"{path}:{lineno}: no {field!r} for image {image!r} (this evaluation reads {field!r})")
            if captions_per_image and n != captions_per_image:
                raise DataError(f"{path}:{lineno}: image {image!r} has {n} {field!r}, expected exactly "
                                f"{captions_per_image} (captions_per_image={captions_per_image})")
        if check_images and not os.path.isfile(rec["image"]):
            raise DataError(f"{path}:{lineno}: image file not found: {rec['image']} (image root {root})")
        records.append(rec)
    if not records:
        raise DataError(f"{path}: empty manifest (no records); expected one JSON object per image")
    return records


def write_manifest(path, records):
    """Write manifest records (dicts with "image" and caption lists) as JSONL; returns the count."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(records)


def eval_transform(data_config):
    """The eval transform of a timm data config (`timm.data.resolve_data_config({}, model=m)`).

    Typically a bicubic resize of the short side to size / crop_pct, a centre crop, and the model's
    own mean/std (SigLIP's are not OpenAI's): so each vision model is scored on its own preprocessing.
    """
    from timm.data import create_transform  # local: only image code needs timm
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: data_config[k] for k in keys if k in data_config}, is_training=False)


class ImageDataset:
    """Images by path for evaluation: item i -> (transformed tensor, i). Errors name the file."""

    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image, UnidentifiedImageError
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found") from None
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: cannot read image ({e})") from None
        return self.transform(image), i


# --- converters: public annotation formats -> manifest records (see README, "Evaluation")

def convert_karpathy(src, split="test", captions_per_image=5, prefix="", log=print):
    """Karpathy's `dataset_coco.json` / `dataset_flickr30k.json` -> manifest records of one split.

    Image path = prefix + filepath/filename. COCO has images with 6-7 captions: the standard 5K
    protocol keeps the first 5, which we do with a printed count; fewer than 5 is an error.
    """
    with open(src, encoding="utf-8") as f:
        images = json.load(f).get("images")
    if not isinstance(images, list):
        raise DataError(f"{src}: expected Karpathy format {{\"images\": [...]}}")
    records, cut = [], 0
    for i, im in enumerate(images):
        if im.get("split") != split:
            continue
        caps = [s["raw"].strip() for s in im.get("sentences", [])]
        name = os.path.join(im.get("filepath", ""), im["filename"])
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
    with open(src, encoding="utf-8") as f:
        entries = json.load(f)
    records = []
    for i, e in enumerate(entries[:num]):
        caps = [c["value"].strip() for c in e.get("conversations", []) if c.get("from") == "gpt"]
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
        with open(os.path.join(cap_dir, s + ".txt"), encoding="utf-8") as f:
            text = f.read().strip()
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
        if not obj.get("image_file") or not str(obj.get("description", "")).strip():
            raise DataError(f"{src}:{lineno}: expected \"image_file\" and a non-empty \"description\"")
        records.append({"image": prefix + obj["image_file"], "long_captions": [obj["description"].strip()]})
    if not records:
        raise DataError(f"{src}: no records with split {split!r}")
    return records


# === embedding cache (embed_captions.py writes, post_train.py reads) ===


# === samplers: deterministic, rank-split, resumable ===


# === synthetic image-caption data (the tiny pipeline) ===
