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

class ResumableBatchSampler:
    """Deterministic, rank-split, resumable batches over `n` items.

    Epoch e visits a permutation of range(n) seeded by (seed, e); global step s takes the s-th block
    of `global_batch` items of its epoch (the remainder of an epoch is dropped, so every rank always
    gets the same number of items); rank r gets its contiguous slice. The only state is the step:
    starting at `start_step` reproduces the uninterrupted run's order exactly. Iterating yields this
    rank's list of indices per step, `max_steps` steps in all (None: forever). Usable as a
    DataLoader `batch_sampler`.
    """

    def __init__(self, n, global_batch, rank=0, world_size=1, seed=0, shuffle=True, start_step=0, max_steps=None):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if n < global_batch:
            raise DataError(f"only {n} items for a global batch of {global_batch}; need at least one full batch")
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.seed, self.shuffle, self.start_step, self.max_steps = seed, shuffle, start_step, max_steps
        self.steps_per_epoch = n // global_batch
        self._perm_epoch, self._perm = None, None

    def epoch_of(self, step):
        return step // self.steps_per_epoch

    def global_indices(self, step):
        """All ranks' indices of global step `step`, in rank order."""
        import numpy as np
        epoch = self.epoch_of(step)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self._perm_epoch = epoch
        i = (step % self.steps_per_epoch) * self.global_batch
        return self._perm[i:i + self.global_batch].tolist()

    def indices(self, step):
        """This rank's indices of global step `step`."""
        b = self.global_batch // self.world_size
        return self.global_indices(step)[self.rank * b:(self.rank + 1) * b]

    def __iter__(self):
        step = self.start_step
        while self.max_steps is None or step < self.start_step + self.max_steps:
            yield self.indices(step)
            step += 1

    def __len__(self):
        if self.max_steps is None:
            raise TypeError("infinite sampler (max_steps=None) has no length")
        return self.max_steps



# === stage-2 training data: caption choice, training transforms, tar shards ===


# === synthetic image-caption data (the tiny pipeline) ===
# Coloured shapes on a plain background: a retrieval task that a tiny ViT learns in a few hundred CPU
# steps, yet needs colour, shape, size and position to tell ~200 held-out images apart. The closed,
# small vocabulary (synthetic_vocabulary) lets a tokenizer be trained offline from these captions.
import random  # noqa: E402  (kept in this section: only the synthetic generator needs them)
import re  # noqa: E402

SYN_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
               "yellow": (240, 210, 40), "purple": (140, 50, 180), "pink": (245, 130, 190)}
SYN_BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
# canonical name -> phrasings; the canonical name is the first one and is used in short captions
SYN_SHAPES = {"circle": ["circle", "disc", "round shape"], "square": ["square", "box", "square shape"],
              "triangle": ["triangle", "triangular shape"], "cross": ["cross", "plus sign"],
              "diamond": ["diamond", "rhombus"]}
SYN_SIZES = {"small": (0.11, ["small", "little"]), "large": (0.2, ["large", "big"])}  # radius / image size
SYN_POSITIONS = {"left": ((0.2, 0.5), ["on the left", "at the left side"]),
                 "right": ((0.8, 0.5), ["on the right", "at the right side"]),
                 "top": ((0.5, 0.2), ["at the top", "near the top"]),
                 "bottom": ((0.5, 0.8), ["at the bottom", "near the bottom"]),
                 "centre": ((0.5, 0.5), ["in the centre", "in the middle"])}
SYN_LONG_TEMPLATES = ["a {bg} background with {objs}.",
                      "{count} {noun} on a {bg} background: {objs}.",
                      "the image shows {objs}, against a plain {bg} background.",
                      "on a {bg} background there is {objs}."]
SYN_COUNTS = ["one", "two", "three"]


def synthetic_vocabulary():
    """Every word and punctuation mark a synthetic caption can contain (sorted), for offline tokenizers."""
    pieces = [re.sub(r"\{\w+\}", " ", t) for t in SYN_LONG_TEMPLATES] + SYN_COUNTS + ["a and shape shapes"]
    pieces += list(SYN_COLOURS) + list(SYN_BACKGROUNDS) + [w for v in SYN_SHAPES.values() for w in v]
    pieces += [w for _, v in SYN_SIZES.values() for w in v] + [w for _, v in SYN_POSITIONS.values() for w in v]
    return sorted(set(re.findall(r"\w+|[^\w\s]", " ".join(pieces))))


def _synthetic_scene(rng):
    """1-3 objects at distinct positions; the first is the main one: alone, or the only large one."""
    n = rng.choice([1, 2, 3])
    sizes = [rng.choice(list(SYN_SIZES))] if n == 1 else ["large"] + ["small"] * (n - 1)
    objs = [{"colour": rng.choice(list(SYN_COLOURS)), "shape": rng.choice(list(SYN_SHAPES)), "size": s, "pos": p}
            for s, p in zip(sizes, rng.sample(list(SYN_POSITIONS), n))]
    return objs, rng.choice(list(SYN_BACKGROUNDS))


def _draw_synthetic(objs, bg, image_size, rng):
    """Render with PIL; small objects first so the main object is never covered. Centres jitter a
    little (S/32 px) so position is not a single pixel pattern, but each shape still covers its
    nominal centre."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (image_size, image_size), SYN_BACKGROUNDS[bg])
    draw, jit = ImageDraw.Draw(img), image_size // 32
    for o in reversed(objs):
        (fx, fy), r = SYN_POSITIONS[o["pos"]][0], SYN_SIZES[o["size"]][0] * image_size
        cx, cy = fx * image_size + rng.randint(-jit, jit), fy * image_size + rng.randint(-jit, jit)
        fill, box = SYN_COLOURS[o["colour"]], [cx - r, cy - r, cx + r, cy + r]
        if o["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        elif o["shape"] == "cross":
            w = 0.45 * r
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def _long_caption(objs, bg, template, rng):
    """One dense description: every object (size, colour, shape, position) and the background."""
    phrases = [f"a {rng.choice(SYN_SIZES[o['size']][1])} {o['colour']} {rng.choice(SYN_SHAPES[o['shape']])} "
               f"{rng.choice(SYN_POSITIONS[o['pos']][1])}" for o in objs]
    objs_text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return template.format(bg=bg, objs=objs_text, count=SYN_COUNTS[len(objs) - 1],
                           noun="shape" if len(objs) == 1 else "shapes")


def make_synthetic_dataset(out_dir, num_images, seed=0, image_size=64, split="train", num_long=3):
    """Write `num_images` PNGs to out_dir/images/, the manifest out_dir/<split>.jsonl and the stage-1
    caption file out_dir/<split>_captions.jsonl; return the manifest records.

    Each image has its own random.Random seeded by (seed, split, index), so a rerun is byte-identical
    and splits never share images. Short captions name the main object ("a red circle"; one with the
    background too); the `num_long` dense captions are paraphrases (distinct templates, synonyms, and
    object order shuffled after the first) and double as the stage-1 positive pairs.
    """
    if not 2 <= num_long <= len(SYN_LONG_TEMPLATES):
        raise ValueError(f"num_long={num_long}: expected 2..{len(SYN_LONG_TEMPLATES)} (one per template)")
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: expected >= 16 so small shapes stay visible")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records, caption_records = [], []
    for i in range(num_images):
        rng = random.Random(f"synthetic/{seed}/{split}/{i}")
        objs, bg = _synthetic_scene(rng)
        name = f"images/{split}_{i:06d}.png"
        _draw_synthetic(objs, bg, image_size, rng).save(os.path.join(out_dir, name), format="PNG")
        main = f"a {objs[0]['colour']} {objs[0]['shape']}"
        longs = []
        for k, t in enumerate(rng.sample(SYN_LONG_TEMPLATES, num_long)):
            order = objs if k == 0 else rng.sample(objs, len(objs))  # first long caption: main object first
            longs.append(_long_caption(order, bg, t, rng))
        records.append({"image": name, "captions": [main, f"{main} on a {bg} background"], "long_captions": longs})
        caption_records.append({"id": f"{split}_{i:06d}", "captions": longs})
    for path, rows in ((f"{split}.jsonl", records), (f"{split}_captions.jsonl", caption_records)):
        with open(os.path.join(out_dir, path), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return records
