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

def read_caption_records(path):
    """Caption JSONL `{"id": ..., "captions": [>= 2 non-empty strings]}` -> list of {"id", "captions"}.

    Every record must have two or more non-empty captions (stage 1 needs a positive pair, c2c eval a
    query and a gallery caption); anything else is a DataError naming file:line, never a skip.
    A missing "id" becomes "<file>:<line>".
    """
    records = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        caps = obj.get("captions")
        if not isinstance(caps, list):
            raise DataError(f"{where}: expected a \"captions\" list of >= 2 strings, got {type(caps).__name__}"
                            f" (keys: {sorted(obj)})")
        if len(caps) < 2:
            raise DataError(f"{where}: expected >= 2 captions per record (a positive pair), got {len(caps)}")
        for k, c in enumerate(caps):
            if not isinstance(c, str) or not c.strip():
                raise DataError(f"{where}: caption {k} is {c!r}; expected a non-empty string")
        records.append({"id": str(obj.get("id", where)), "captions": caps})
    if not records:
        raise DataError(f"{path}: no records; expected one JSON object with >= 2 captions per line")
    return records


def read_text_pairs(path):
    """Pure-text pairs JSONL `{"query": ..., "positive": ...}` -> records whose two captions keep that
    order (`"ordered": True`): the query is always the query side, the positive the positive side."""
    records = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("query", "positive"):
            v = obj.get(key)
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{where}: \"{key}\" is {v!r}; expected a non-empty string "
                                "(pairs file: one {\"query\": ..., \"positive\": ...} per line)")
        records.append({"id": str(obj.get("id", where)), "captions": [obj["query"], obj["positive"]], "ordered": True})
    if not records:
        raise DataError(f"{path}: no records; expected one {{\"query\": ..., \"positive\": ...}} object per line")
    return records


def split_paths(paths):
    """'a.jsonl,b.jsonl' or a list -> list of paths (empty entries dropped)."""
    if isinstance(paths, str):
        paths = paths.split(",")
    return [p.strip() for p in (paths or []) if p and p.strip()]


class CaptionPairDataset:
    """Caption records -> (query, positive[, hard negative]) texts for a given training step.

    Item `i` at step `s` draws its two different captions (and the hard negative: a caption of another
    record) from an RNG seeded by (seed, s, i) only, so any step of any rank can be rebuilt exactly on
    resume, whatever ran before. Ordered records (text pairs) always give (query, positive).
    """

    def __init__(self, records, seed=0):
        if len(records) < 2:
            raise DataError(f"{len(records)} caption record(s); expected at least 2 (negatives come from other records)")
        self.records, self.seed = records, seed

    def __len__(self):
        return len(self.records)

    def _rng(self, index, step, stream):
        import numpy as np
        return np.random.default_rng([self.seed, step, index, stream])

    def pair(self, index, step):
        rec = self.records[index]
        if rec.get("ordered"):
            return rec["captions"][0], rec["captions"][1]
        a, b = self._rng(index, step, 0).choice(len(rec["captions"]), size=2, replace=False)
        return rec["captions"][a], rec["captions"][b]

    def hard_negative(self, index, step):
        rng = self._rng(index, step, 1)  # its own stream: independent of pair()'s draws
        j = int(rng.integers(len(self.records) - 1))
        j += j >= index  # any record but this one
        caps = self.records[j]["captions"]
        return caps[int(rng.integers(len(caps)))]

    def batch(self, indices, step, hard_negatives=False):
        """-> (queries, positives, hard negatives or None), lists of strings in `indices` order."""
        pairs = [self.pair(i, step) for i in indices]
        hard = [self.hard_negative(i, step) for i in indices] if hard_negatives else None
        return [q for q, _ in pairs], [d for _, d in pairs], hard



# === image-text manifests, images and transforms (stage 2, retrieval eval) ===


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
