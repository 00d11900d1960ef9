"""Data for every stage: caption files, manifests, images, the embedding cache, samplers, synthetic data.

Plain Python + numpy + PIL; no project imports, so each stage script reads data the same way.
Every reader names the file and line of bad input and what it expected; nothing is silently dropped.
"""
import json
import os


class DataError(ValueError):
    """Bad input data: the message names the file (and line) and what was expected."""


def scan_jsonl(path):
    """Yield (line_number, byte_offset, byte_size, object) for each non-empty line of a JSONL file:
    read_jsonl plus where each line lies, so a reader can come back to one record with one pread."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            size = len(line)
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); expected one JSON object per line") from None
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text; expected one JSON object per line") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, offset, size, obj
            offset += size


def read_jsonl(path):
    """Yield (line_number, object) for each non-empty line of a JSONL file, with clear errors."""
    for lineno, _, _, obj in scan_jsonl(path):
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
    order (`"ordered": True`): the query is always the query side, the positive the positive side.
    Optional per record (E5-style data): "instruction" (the query's own instruction, instead of the
    caption one) and "negative" (its own hard negative)."""
    records = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("query", "positive", "instruction", "negative"):
            v = obj.get(key)
            if key in ("instruction", "negative") and key not in obj:
                continue
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{where}: \"{key}\" is {v!r}; expected a non-empty string "
                                "(pairs file: one {\"query\": ..., \"positive\": ...[, \"instruction\": ..., "
                                "\"negative\": ...]} per line)")
        rec = {"id": str(obj.get("id", where)), "captions": [obj["query"], obj["positive"]], "ordered": True}
        rec.update({k: obj[k] for k in ("instruction", "negative") if k in obj})
        records.append(rec)
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
    resume, whatever ran before. Ordered records (text pairs) always give (query, positive); a record's
    own "negative" is its hard negative. `sources`: (start, end) index ranges (one per input file); a
    drawn hard negative then comes from the record's own source, so caption and E5 negatives never mix.
    """

    def __init__(self, records, seed=0, sources=None):
        if len(records) < 2:
            raise DataError(f"{len(records)} caption record(s); expected at least 2 (negatives come from other records)")
        self.records, self.seed = records, seed
        self.sources = sources or [(0, len(records))]

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
        if "negative" in self.records[index]:
            return self.records[index]["negative"]
        lo, hi = next((a, b) for a, b in self.sources if a <= index < b)
        if hi - lo < 2:
            lo, hi = 0, len(self.records)
        rng = self._rng(index, step, 1)  # its own stream: independent of pair()'s draws
        j = lo + int(rng.integers(hi - lo - 1))
        j += j >= index  # any record but this one
        caps = self.records[j]["captions"]
        return caps[int(rng.integers(len(caps)))]

    def batch(self, indices, step, hard_negatives=False):
        """-> (queries, positives, hard negatives or None), lists of strings in `indices` order."""
        pairs = [self.pair(i, step) for i in indices]
        hard = [self.hard_negative(i, step) for i in indices] if hard_negatives else None
        return [q for q, _ in pairs], [d for _, d in pairs], hard

    def instructions(self, indices, default=None):
        """The query-side instruction of each record: its own "instruction", else `default`."""
        return [self.records[i].get("instruction", default) for i in indices]


class SourceBatchSampler:
    """Every global batch from ONE source (input file), as the official LLM2CLIP / llm2vec sampler
    draws them, so in-batch negatives never mix caption and pure-text data.

    Global step s picks source k with probability weights[k] (one draw seeded by (seed, s)); it then
    takes the next block of source k's own ResumableBatchSampler order. Like ResumableBatchSampler its
    only state is the step, so a resumed run replays the uninterrupted one. weights None: proportional
    to each source's number of full batches (every batch once per epoch, in expectation).
    """

    def __init__(self, sizes, global_batch, rank=0, world_size=1, seed=0, weights=None, start_step=0,
                 max_steps=None, names=None):
        import numpy as np
        names = names or [f"source {k}" for k in range(len(sizes))]
        for n, name in zip(sizes, names):
            if n < global_batch:
                raise DataError(f"{name}: {n} records, fewer than one global batch of {global_batch} "
                                "(single_source_batches draws each batch from one file)")
        weights = [n // global_batch for n in sizes] if not weights else list(weights)
        if len(weights) != len(sizes) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"source weights {weights}: expected {len(sizes)} non-negative numbers, one per "
                             f"source ({', '.join(names)}), not all zero")
        self.offsets = np.cumsum([0] + list(sizes))[:-1].tolist()
        self.cum = np.cumsum(weights) / sum(weights)
        self.inner = [ResumableBatchSampler(n, global_batch, rank, world_size, seed=int(np.random.SeedSequence(
            [seed, k]).generate_state(1)[0]), shuffle=True) for k, n in enumerate(sizes)]
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps
        self.steps_per_epoch = sum(n // global_batch for n in sizes)
        self._source, self._position = [], []  # per global step: its source, and that source's own step
        self._taken = [0] * len(sizes)  # steps drawn so far from each source

    def source_of(self, step):
        """The source of global step `step` (draws every earlier step's once, to know each source's position)."""
        import numpy as np
        while len(self._source) <= step:
            u = np.random.default_rng([self.seed, len(self._source), 7]).random()
            k = min(int(np.searchsorted(self.cum, u, side="right")), len(self.cum) - 1)
            self._source.append(k)
            self._position.append(self._taken[k])
            self._taken[k] += 1
        return self._source[step]

    def indices(self, step):
        """This rank's indices (into the concatenated records) of global step `step`."""
        k = self.source_of(step)
        return [self.offsets[k] + i for i in self.inner[k].indices(self._position[step])]

    def __iter__(self):
        step = self.start_step
        while self.max_steps is None or step < self.start_step + self.max_steps:
            yield self.indices(step)
            step += 1


# === image-text manifests, images and transforms (stage 2, retrieval eval) ===

def _caption_list(where, obj, key):
    """obj[key] as a list of non-empty strings ([] when absent), else a DataError naming `where`
    (file:line of a manifest, shard::key of a tar sample): manifests and shards are validated alike."""
    caps = obj.get(key, [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise DataError(f"{where}: {key!r} must be a list of strings, got {caps!r:.80}")
    for i, c in enumerate(caps):
        if not c.strip():
            raise DataError(f"{where}: {key}[{i}] is an empty caption")
    return caps


def train_record(where, obj):
    """(image, captions, long_captions) of one stage-2 record (a manifest line, a tar sample's JSON),
    validated as read_manifest validates: an image string and at least one caption, every caption a
    non-empty string. The one check every stage-2 reader shares; errors name `where`."""
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: missing \"image\" (expected a relative image path string)")
    caps, longs = _caption_list(where, obj, "captions"), _caption_list(where, obj, "long_captions")
    if not caps and not longs:
        raise DataError(f"{where}: no captions (\"captions\" and \"long_captions\" are both empty or absent)")
    return image, caps, longs


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
        image, caps, longs = train_record(f"{path}:{lineno}", obj)
        rec = {"image": os.path.join(root, image), "line": lineno, "captions": caps, "long_captions": longs}
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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException as e:  # no partial temp file left behind; a full disk names the file
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise
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
        return self.transform(open_image({"image": self.paths[i]})), i


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
# A cache directory (format "llm2clip-embedding-cache/1"):
#   embeddings.npy  float16 [count, dim], a plain .npy file, read with np.load(mmap_mode="r")
#   index.npz       record_offsets int64 [num_records + 1] (first row of each record),
#                   counts int32 [num_records, num_fields], text_hashes uint64 [count] (8-byte blake2b
#                   of each text: lets a stale cache say exactly which caption changed)
#   meta.json       format, encoder identity, dim, dtype, count, num_records, fields, text_hash,
#                   manifest, complete, code_version, config
# Texts are enumerated in manifest order: record r (the r-th non-empty line), field f (in `fields`
# order; a missing field has no texts), slot s -> one row, so
#   row(r, f, s) = record_offsets[r] + counts[r, :f].sum() + s.
import hashlib  # noqa: E402
import zipfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

CACHE_FORMAT = "llm2clip-embedding-cache/1"
CACHE_FIELDS = ("captions", "long_captions")
CACHE_EMBEDDINGS, CACHE_INDEX, CACHE_META = "embeddings.npy", "index.npz", "meta.json"


@dataclass
class CacheTexts:
    """Every text a cache holds, in row order, plus the index and the hashes that identify them."""
    source: object  # the manifest path, or the list of records it came from
    fields: list
    texts: list  # [count] str, row order
    counts: np.ndarray  # int32 [num_records, num_fields]
    lines: np.ndarray  # int64 [num_records]: the manifest line of each record (for messages)
    text_hashes: np.ndarray  # uint64 [count]
    text_hash: str  # sha256 hex over (record, field, slot, text) of every row in order

    @property
    def record_offsets(self):
        return np.concatenate([[0], np.cumsum(self.counts.sum(1), dtype=np.int64)]).astype(np.int64)

    def where(self, r):
        """Where record r comes from, for messages: 'file:line', or the record's image."""
        if isinstance(self.source, (str, os.PathLike)):
            return f"{self.source}:{self.lines[r]}"
        return f"image {self.source[r].get('image', '?')}"


def _field_texts(where, obj, field):
    """The texts of one record field: a list of non-empty strings (a bare string is one text)."""
    value = obj.get(field)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise DataError(f"{where}: field {field!r} must be a list of strings, got {json.dumps(value, default=str)[:80]}")
    for s, t in enumerate(value):
        if not t.strip():
            raise DataError(f"{where}: field {field!r} slot {s} is an empty caption")
    return list(value)


def hash_record_texts(h, hashes, r, field, values):
    """Add record r's texts of one field to the running text hash `h` (sha256) and their 8-byte
    blake2b hashes to `hashes`: the one definition of a cache's text identity (cache_texts and the
    training index both call it, so their hashes agree)."""
    for s, t in enumerate(values):
        b = t.encode("utf-8")
        # length-prefixed, so no text can imitate a record boundary
        h.update(f"{r}\0{field}\0{s}\0{len(b)}\0".encode() + b)
        hashes.append(int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little"))


class ManifestTexts:
    """A manifest's texts in cache row order, read from the file on demand (one pread and one JSON
    parse per record) instead of held as strings: len(), [row] and [start:stop]. What lets each
    embed_captions.py rank hold only the texts of the chunk it is embedding."""

    def __init__(self, path, fields, line_offset, line_size, record_offsets):
        self.path, self.fields = path, list(fields)
        self.line_offset, self.line_size, self.record_offsets = line_offset, line_size, record_offsets
        self._fd, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __len__(self):
        return int(self.record_offsets[-1])

    def record(self, r):
        """Every text of record r, fields in order."""
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        obj = json.loads(os.pread(self._fd, int(self.line_size[r]), int(self.line_offset[r])))
        return [t for f in self.fields for t in _field_texts(self.path, obj, f)]

    def _record_of(self, row):
        return int(np.searchsorted(self.record_offsets, row, side="right") - 1)

    def __getitem__(self, k):
        if isinstance(k, slice):
            start, stop, step = k.indices(len(self))
            if step != 1:
                raise ValueError("ManifestTexts supports contiguous slices only")
            out = []
            for r in range(self._record_of(start), self._record_of(stop - 1) + 1 if stop > start else 0):
                out += self.record(r)
            first = int(self.record_offsets[self._record_of(start)]) if stop > start else start
            return out[start - first:stop - first]
        k = int(k)
        if not 0 <= k < len(self):
            raise IndexError(f"text row {k} out of range (0..{len(self) - 1})")
        r = self._record_of(k)
        return self.record(r)[k - int(self.record_offsets[r])]


def cache_texts(manifest, fields=CACHE_FIELDS, lazy=False):
    """Enumerate a manifest's texts in cache row order and hash them (see the section comment).

    manifest: a JSONL path, or a list of record dicts in record order (e.g. from tar shards).
    lazy (a path only): `texts` is a ManifestTexts that reads each text from the file when asked, so
    memory is a few arrays of numbers per record, not the strings."""
    import array
    fields = list(fields)
    texts, counts, lines, hashes = [], array.array("i"), array.array("q"), array.array("Q")
    offsets, sizes = array.array("q"), array.array("q")
    h = hashlib.sha256()
    if isinstance(manifest, (str, os.PathLike)):
        items = ((lineno, off, size, obj, f"{manifest}:{lineno}") for lineno, off, size, obj in scan_jsonl(manifest))
    else:
        lazy = False
        items = ((r + 1, 0, 0, obj, f"record {r} (image {obj.get('image', '?')})") for r, obj in enumerate(manifest))
    for r, (lineno, off, size, obj, where) in enumerate(items):
        for field in fields:
            values = _field_texts(where, obj, field)
            hash_record_texts(h, hashes, r, field, values)
            if not lazy:
                texts.extend(values)
            counts.append(len(values))
        lines.append(lineno)
        offsets.append(off)
        sizes.append(size)
    counts = np.frombuffer(counts, dtype=np.int32).reshape(len(lines), len(fields))
    out = CacheTexts(manifest, fields, texts, counts, np.frombuffer(lines, dtype=np.int64),
                     np.frombuffer(hashes, dtype=np.uint64), h.hexdigest())
    if lazy:
        out.texts = ManifestTexts(manifest, fields, np.frombuffer(offsets, dtype=np.int64),
                                  np.frombuffer(sizes, dtype=np.int64), out.record_offsets)
    return out


def _where(offsets, counts, fields, row):
    """(record, field, slot) of a row."""
    r = int(np.searchsorted(offsets, row, side="right") - 1)
    local = row - int(offsets[r])
    ends = np.cumsum(counts[r])
    f = int(np.searchsorted(ends, local, side="right"))
    return r, fields[f], int(local - (ends[f] - counts[r, f]))


def describe_text_mismatch(cached_counts, cached_hashes, fields, new):
    """Why `new` (a CacheTexts) is not the text set a cache was built from: sizes, then the first
    differing record / field / slot (with the text as it is now). Returns a message."""
    n_old, n_new = len(cached_counts), len(new.counts)
    msg = [f"the manifest has {n_new} records / {len(new.texts)} texts, the cache {n_old} records / "
           f"{len(cached_hashes)} texts"]
    if list(fields) != list(new.fields):
        return f"fields differ: cache {list(fields)}, requested {list(new.fields)}"
    old_offsets = np.concatenate([[0], np.cumsum(cached_counts.sum(1))]).astype(np.int64)
    n = min(n_old, n_new)
    # rows line up up to the first record whose counts differ; compare text hashes over that prefix
    differ = np.flatnonzero((cached_counts[:n] != new.counts[:n]).any(1))
    first_count = int(differ[0]) if len(differ) else n
    aligned = int(old_offsets[first_count])
    changed = np.flatnonzero(cached_hashes[:aligned] != new.text_hashes[:aligned])
    if len(changed):
        r, field, s = _where(old_offsets, cached_counts, fields, int(changed[0]))
        text = new.texts[int(changed[0])]
        msg.append(f"{len(changed)} text(s) changed in the first {first_count} records; first: record {r} "
                   f"({new.where(r)}) field {field!r} slot {s}, now {text[:100]!r}")
    if first_count < n:
        f = int(np.flatnonzero(cached_counts[first_count] != new.counts[first_count])[0])
        msg.append(f"record {first_count} ({new.where(first_count)}) field {fields[f]!r} has "
                   f"{new.counts[first_count, f]} texts in the manifest, {cached_counts[first_count, f]} in the cache")
    elif n_new > n_old:
        msg.append(f"records {n_old}.. ({new.where(n_old)} on) are not in the cache")
    elif n_old > n_new:
        msg.append(f"the cache has {n_old - n_new} records beyond the manifest's end")
    return "; ".join(msg)


def model_fingerprint(path, probe_bytes=1 << 20):
    """A cheap identity of a local model: sha256 over the files of the folder that is loaded (for a
    stage-1 out_dir: encoder.json, its model subfolder and stage-1 adaptor), each by name, size, and its first and
    last `probe_bytes` (weights retrained in place change there). None for a hub name."""
    if not os.path.isdir(path):
        return None
    files, folder = [], path
    if os.path.isfile(os.path.join(path, "encoder.json")):
        with open(os.path.join(path, "encoder.json")) as f:
            meta = json.load(f)
        folder = os.path.join(path, meta.get("model_subdir", "merged"))
        files.append(os.path.join(path, "encoder.json"))
        if meta.get("adaptor"):  # a stage-1 adaptor changes the embeddings too
            files.append(os.path.join(path, meta["adaptor"]["file"]))
    files += sorted(os.path.join(folder, n) for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    h = hashlib.sha256()
    for name in files:
        size = os.path.getsize(name)
        h.update(f"{os.path.relpath(name, path)}\0{size}\0".encode())
        with open(name, "rb") as f:
            h.update(f.read(probe_bytes))
            if size > probe_bytes:
                f.seek(max(probe_bytes, size - probe_bytes))
                h.update(f.read())
    return h.hexdigest()


def _name(manifest):
    return manifest if isinstance(manifest, (str, os.PathLike)) else f"the given {len(manifest)} records"


def _normalise_setting(key, value):
    if key in ("instruction", "chat_template"):  # None, "" (and "none" for chat_template) all mean none
        return "" if value in (None, "none") else value
    if key in ("model", "adapter", "base_model") and isinstance(value, str) and os.path.exists(value):
        return os.path.abspath(value)
    return value


def encoder_mismatch(cached, expect):
    """['key: cache X, expected Y', ...] for every expected encoder setting the cache differs in."""
    out = []
    for k, v in expect.items():
        have = _normalise_setting(k, cached.get(k))
        want = _normalise_setting(k, v)
        if have != want:
            out.append(f"{k}: cache {have!r}, expected {want!r}")
    return out


def read_cache_meta(cache_dir):
    path = os.path.join(cache_dir, CACHE_META)
    if not os.path.isfile(path):
        raise DataError(f"{cache_dir}: no {CACHE_META}; not an embedding cache (build one with embed_captions.py)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: corrupt meta.json ({e}); rebuild the cache with embed_captions.py") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise DataError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                        f"expected {CACHE_FORMAT!r}")
    return meta


def load_cache_file(cache_dir, name, **kw):
    """np.load of a cache file; a missing, truncated or corrupt file is a DataError naming it."""
    path = os.path.join(cache_dir, name)
    try:
        out = np.load(path, **kw)
        if name == CACHE_INDEX:  # npz members are read lazily: check the small ones now, while errors can be named
            for k in ("record_offsets", "counts"):
                out[k]
        return out
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); the cache is truncated or corrupt, "
                        "rebuild it with embed_captions.py --overwrite=True") from None


def data_identity(records, cache=None, shards=()):
    """What identifies stage-2 training data, kept in checkpoints so a resume on other data is refused:
    the record count, the cache's text hash and size, and the shards' names and sizes. Cheap (nothing
    is re-read) and free of paths, so moved files with the same content still resume."""
    ident = {"num_records": len(records)}
    if cache is not None:
        ident.update(text_hash=cache.meta["text_hash"], count=cache.count, fields=list(cache.fields))
    if shards:
        h = hashlib.sha256()
        for p in shards:
            h.update(f"{os.path.basename(p)}\0{os.path.getsize(p)}\0".encode())
        ident["shards"] = f"{len(shards)} shards, sha256 {h.hexdigest()[:16]}"
    return ident


def identity_mismatch(old, new):
    """['key: checkpoint X, now Y', ...] over the keys both identities have (the text hash only when the
    cache fields agree: text_source may change on resume)."""
    keys = [k for k in (old or {}) if k in new and not (k == "text_hash" and old.get("fields") != new.get("fields"))]
    return [f"{k}: checkpoint {old[k]!r}, now {new[k]!r}" for k in keys if old[k] != new[k]]


class EmbeddingCache:
    """Read an embedding cache built by embed_captions.py, refusing one that does not fit.

    manifest: a JSONL path or a list of records (e.g. from tar shards): its texts are enumerated and
        hashed again; any difference (records, texts, a changed caption) raises DataError naming the
        first differing record, line, field and slot.
    fields: the fields the caller will read; each must be in the cache.
    expect: encoder settings (model, pooling, instruction, max_length, bidirectional, ...) that must
        equal the ones the cache was built with; DataError lists every differing key.
    manifest may also be a TrainIndex (stage 2): its text hash, computed once when the index was built,
        is compared in O(1), and the cache's own index.npz is never loaded (rows come from the index).
    The float16 matrix is memory-mapped lazily, once per process (safe in DataLoader workers); the
    cache's index (row lookup by record) is loaded on first use of row/get/rows/counts.
    """

    def __init__(self, cache_dir, manifest=None, fields=None, expect=None):
        self.cache_dir = cache_dir
        self._mm, self._pid = None, None  # the memmap, opened lazily in whichever process reads
        self.meta = meta = read_cache_meta(cache_dir)
        if not meta.get("complete"):
            raise DataError(f"{cache_dir}: the cache is incomplete (an interrupted embed_captions.py run); "
                            "rerun it with the same settings to finish")
        self.fields = list(meta["fields"])
        if isinstance(fields, str):
            fields = [f.strip() for f in fields.split(",") if f.strip()]
        missing = [f for f in (fields or []) if f not in self.fields]
        if missing:
            raise DataError(f"{cache_dir}: fields {missing} are not in the cache (it has {self.fields})")
        if expect:
            diff = encoder_mismatch(meta["encoder"], expect)
            if diff:
                raise DataError(f"{cache_dir}: built with different encoder settings: " + "; ".join(diff))
        self._index = None  # (record_offsets, counts, starts): loaded on first use, never by stage 2
        if isinstance(manifest, TrainIndex):  # stage 2: the index hashed the texts once, when it was built
            if manifest.text_hash != meta["text_hash"]:
                new = manifest.texts(self.fields) if self.fields == list(manifest.fields) else None
                index = load_cache_file(cache_dir, CACHE_INDEX)
                why = (f"fields differ: cache {self.fields}, training records {manifest.fields}" if new is None else
                       describe_text_mismatch(index["counts"], index["text_hashes"], self.fields, new))
                raise DataError(f"{cache_dir} is stale for {manifest.records_file}: {why}")
        elif manifest is not None:
            new = cache_texts(manifest, self.fields, lazy=True)
            if new.text_hash != meta["text_hash"]:  # per-text hashes are read only to say what differs
                index = load_cache_file(cache_dir, CACHE_INDEX)
                raise DataError(f"{cache_dir} is stale for {_name(manifest)}: "
                                + describe_text_mismatch(index["counts"], index["text_hashes"], self.fields, new))
        emb = self._open()
        if emb.shape != (meta["count"], meta["dim"]) or emb.dtype != np.float16:
            raise DataError(f"{cache_dir}/{CACHE_EMBEDDINGS}: {emb.dtype} {emb.shape}, meta.json says float16 "
                            f"{(meta['count'], meta['dim'])}")

    def _rows_index(self):
        if self._index is None:
            index = load_cache_file(self.cache_dir, CACHE_INDEX)
            offsets, counts = index["record_offsets"].astype(np.int64), index["counts"].astype(np.int32)
            # row of slot 0 of each (record, field)
            self._index = offsets, counts, offsets[:-1, None] + np.cumsum(counts, 1) - counts
        return self._index

    @property
    def record_offsets(self):
        return self._rows_index()[0]

    @property
    def _counts(self):
        return self._rows_index()[1]

    @property
    def _starts(self):
        return self._rows_index()[2]

    def _open(self):
        if self._mm is None or self._pid != os.getpid():
            self._mm = load_cache_file(self.cache_dir, CACHE_EMBEDDINGS, mmap_mode="r")
            self._pid = os.getpid()
        return self._mm

    def __getstate__(self):  # DataLoader workers get the index, never a parent's mapping
        return {**self.__dict__, "_mm": None, "_pid": None}

    @property
    def embeddings(self):
        """The whole [count, dim] float16 matrix, memory-mapped (read-only)."""
        return self._open()

    @property
    def dim(self):
        return int(self.meta["dim"])

    @property
    def count(self):
        return int(self.meta["count"])

    @property
    def num_records(self):
        return int(self.meta["num_records"])

    def __len__(self):
        return self.num_records

    def _f(self, field):
        if isinstance(field, str):
            if field not in self.fields:
                raise KeyError(f"field {field!r} is not in the cache (it has {self.fields})")
            return self.fields.index(field)
        return int(field)

    def counts(self, r, field):
        """How many texts record r has in `field`."""
        return int(self._counts[r, self._f(field)])

    def row(self, r, field, slot):
        f = self._f(field)
        if not 0 <= slot < self._counts[r, f]:
            raise IndexError(f"record {r} field {self.fields[f]!r} has {self._counts[r, f]} texts; no slot {slot}")
        return int(self._starts[r, f] + slot)

    def get(self, r, field, slot):
        """(dim,) float16 embedding of one text."""
        return np.array(self._open()[self.row(r, field, slot)])

    def rows(self, r, field):
        """(n, dim) float16 embeddings of every text of record r's field (n may be 0)."""
        f = self._f(field)
        start = int(self._starts[r, f])
        return np.array(self._open()[start:start + int(self._counts[r, f])])

    def take(self, rows):
        """(len(rows), dim) float16 embeddings of the given row numbers (reads in sorted order)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.dim), dtype=np.float16)
        out[order] = self._open()[rows[order]]
        return out


def verify_cache(cache_dir, manifest=None, block_bytes=64 << 20, row_range=None):
    """Check a cache: meta complete, the embedding file's shape, every row written and finite, and
    (given the manifest) the texts unchanged. Returns a list of problems (empty: all good).
    row_range=(start, end) checks only those rows (ranks split the scan)."""
    problems = []
    try:  # a truncated or corrupt file is reported, never a crash
        meta = read_cache_meta(cache_dir)
        index = load_cache_file(cache_dir, CACHE_INDEX)
        emb = load_cache_file(cache_dir, CACHE_EMBEDDINGS, mmap_mode="r")
    except DataError as e:
        return [str(e)]
    if not meta.get("complete"):
        problems.append("meta.json says the cache is incomplete")
    if manifest is not None:
        new = cache_texts(manifest, meta["fields"], lazy=True)  # streams: texts are not held
        if new.text_hash != meta["text_hash"]:
            problems.append(f"stale for {_name(manifest)}: "
                            + describe_text_mismatch(index["counts"], index["text_hashes"], meta["fields"], new))
    if emb.shape != (meta["count"], meta["dim"]) or emb.dtype != np.float16:
        problems.append(f"{CACHE_EMBEDDINGS} is {emb.dtype} {emb.shape}, meta says float16 {(meta['count'], meta['dim'])}")
        return problems
    start, end = row_range or (0, len(emb))
    bad, empty = [], []
    block_rows = max(1, block_bytes // max(1, emb.shape[1] * 2))  # bounded memory at any width
    for a in range(start, end, block_rows):
        block = np.asarray(emb[a:min(a + block_rows, end)])  # float16: isfinite/any need no float32 copy
        bad.extend((a + np.flatnonzero(~np.isfinite(block).all(1))).tolist())
        empty.extend((a + np.flatnonzero(~block.any(1))).tolist())  # never written (all zeros)
    if bad:
        problems.append(f"{len(bad)} rows are not finite (float16 overflow?), first rows {bad[:5]}")
    if empty:
        problems.append(f"{len(empty)} rows are all zeros (never written), first rows {empty[:5]}")
    return problems



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
            # uint32 (4 bytes per record; int64 past 2^32): the same permutation rng.permutation(n) gives
            self._perm = np.arange(self.n, dtype=np.uint32 if self.n < 2 ** 32 else np.int64)
            if self.shuffle:
                np.random.default_rng([self.seed, epoch]).shuffle(self._perm)
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
# Each sample's caption choice and crop come from its own numpy generator seeded by (seed, epoch,
# record), never from a global RNG: the same step gives the same batch whatever the number of
# workers or ranks, and a resumed run replays the uninterrupted one exactly.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def sample_rng(seed, epoch, index):
    """The generator for record `index` in `epoch`: caption choice first, then the crop."""
    import numpy as np
    return np.random.default_rng([seed, epoch, index])


def choose_caption(record, rng, real_caption_ratio=0.5):
    """(field, slot): a real caption with probability real_caption_ratio, else a long one (uniform slot).
    A record with only one kind of caption always uses that kind."""
    real, long = record.get("captions") or [], record.get("long_captions") or []
    use_real = (rng.random() < real_caption_ratio) if (real and long) else bool(real)
    field = "captions" if use_real else "long_captions"
    slot = int(rng.integers(len(real if use_real else long)))
    return field, slot


def random_resized_crop_params(width, height, rng, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box (top, left, h, w), drawn from `rng` instead of torch's RNG."""
    import math
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    w, h = width, height  # fallback: the whole image clipped to the ratio range, centred
    if width / height < ratio[0]:
        h = int(round(w / ratio[0]))
    elif width / height > ratio[1]:
        w = int(round(h * ratio[1]))
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """RandomResizedCrop(scale) to the model's input size, bicubic, then the model's mean/std.

    `data_config` is the vision model's timm preprocessing config (input_size, mean, std)."""

    def __init__(self, data_config, scale=(0.9, 1.0)):
        self.size = tuple(data_config["input_size"][-2:])
        self.mean, self.std, self.scale = list(data_config["mean"]), list(data_config["std"]), scale

    def __call__(self, img, rng):
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode
        top, left, h, w = random_resized_crop_params(img.width, img.height, rng, self.scale)
        img = TF.resized_crop(img, top, left, h, w, list(self.size), InterpolationMode.BICUBIC)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)


def open_image(record):
    """PIL RGB image of a manifest record (read_manifest resolves its path) or a tar-shard record (byte range).
    Raises DataError naming the file when it is missing or cannot be decoded."""
    import io
    from PIL import Image
    if "_tar" in record:
        path, offset, size = record["_tar"]
        where = record["image"]
    else:
        path = where = record["image"]
    try:
        if "_tar" in record:
            with open(path, "rb") as f:
                f.seek(offset)
                img = Image.open(io.BytesIO(f.read(size)))
        else:
            img = Image.open(path)
        return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found") from None
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError, truncated files
        raise DataError(f"{where}: cannot read image ({type(e).__name__}: {e})") from None


def expand_shards(spec):
    """Tar shard paths from a comma list of globs or brace ranges: "data/{00000..00099}.tar,more/*.tar"."""
    import glob
    import re
    paths = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if m:
            a, b = m.group(1), m.group(2)
            names = [part[:m.start()] + str(i).zfill(len(a)) + part[m.end():] for i in range(int(a), int(b) + 1)]
        else:
            names = sorted(glob.glob(part)) or [part]
        for n in names:
            if not os.path.isfile(n):
                raise DataError(f"{n}: tar shard not found (from {spec!r})")
        paths += names
    return paths


def scan_tar_shard(path):
    """Yield the manifest-style records of one WebDataset tar shard (img2dataset output), in member order.

    A sample is the members sharing a key (the name up to the first dot): an image (.jpg/.png/...)
    plus `.txt` (the real caption) and/or `.json` (keys `captions`, `long_captions`, or `caption`).
    Image bytes are not read here: each record keeps the byte range of its image (`_tar`), so any
    rank or worker reads its own samples with a plain seek. Records with no caption are an error.
    Integrity: tarfile stops quietly at a truncated header, so every member must lie within the file
    and the archive must end with its end-of-archive blocks; a shard cut anywhere is a DataError naming
    it (never fewer samples). Caption fields are validated as manifests are (_caption_list), naming
    `shard::key`.
    """
    import tarfile
    samples = {}
    size = os.path.getsize(path)
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if m.offset_data + m.size > size:
                    raise DataError(f"{path}: truncated tar shard: member {m.name!r} needs bytes up to "
                                    f"{m.offset_data + m.size}, the file has {size}")
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                key, _, ext = base.partition(".")
                s = samples.setdefault(os.path.join(d, key), {})
                ext = ext.lower()
                if ext in IMAGE_EXTS:
                    s["image"] = m
                elif ext in ("txt", "json"):
                    s[ext] = tf.extractfile(m).read().decode("utf-8")
            end = tf.offset  # where the member list stopped: must be two zero blocks (POSIX end of archive)
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read(2 * tarfile.BLOCKSIZE)
        if len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
            raise DataError(f"{path}: truncated or corrupt tar shard: no end-of-archive blocks at byte {end} "
                            f"(file size {size}); samples after that point would be lost")
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read tar shard ({e})") from None
    for key, s in samples.items():
        where = f"{path}::{key}"
        if "image" not in s:
            continue  # img2dataset also writes failed samples as .json only
        meta = {}
        if "json" in s:
            try:
                meta = json.loads(s["json"])
            except json.JSONDecodeError as e:
                raise DataError(f"{where}.json: malformed JSON ({e.msg})") from None
            if not isinstance(meta, dict):
                raise DataError(f"{where}.json: expected a JSON object, got {type(meta).__name__}")
            if "caption" in meta and not isinstance(meta["caption"], (str, type(None))):
                raise DataError(f"{where}.json: 'caption' must be a string, got {meta['caption']!r:.80}")
        captions = _caption_list(f"{where}.json", meta, "captions") or (
            [meta["caption"]] if (meta.get("caption") or "").strip() else [])
        if not captions and s.get("txt", "").strip():
            captions = [s["txt"].strip()]
        long_captions = _caption_list(f"{where}.json", meta, "long_captions")
        if not captions and not long_captions:
            raise DataError(f"{where}: no caption (expected {key}.txt or captions/long_captions in {key}.json)")
        m = s["image"]
        yield {"image": f"{path}::{m.name}", "captions": captions, "long_captions": long_captions,
               "_tar": [path, m.offset_data, m.size]}


def index_tar_shards(paths):
    """Every record of the given tar shards (scan_tar_shard), in shard then member order, as a list."""
    return [rec for path in paths for rec in scan_tar_shard(path)]


# --- the training index: what a stage-2 rank needs per record, built once, memory-mapped by everyone
# Built once per training set (post_train.py builds it on first use, ranks sharing the work, and
# reuses it until the manifest or a shard changes), as plain .npy files that every rank and DataLoader
# worker memory-maps read-only. 8 ranks and their workers share one copy through the page cache, there
# is no per-record Python object (forked workers copied those as reference counts changed), and a rank
# touches ~40 bytes of it per sample. Files in the index folder:
#   index_meta.json   format, source (files, sizes, mtimes; image_root), num_records, fields,
#                     num_texts, text_hash (equal to the cache's for the same texts), images_checked
#   records.jsonl     tar shards only: their records as a manifest (image = "shard::member"); this is the
#                     file embed_captions.py embeds and text_source="online" reads captions from
#   line_offset.npy   int64 [N]   byte offset of record r's JSON line in the records file (the manifest,
#   line_size.npy     int64 [N]   or records.jsonl): a record is re-read with one pread, on demand
#   line_no.npy       int64 [N]   its line number, for messages
#   image_shard.npy   int32 [N]   tar shard id of the image, or -1: a file named by the line's "image"
#   image_offset.npy  int64 [N]   the image's byte range inside its shard
#   image_size.npy    int64 [N]
#   counts.npy        int32 [N, 2] number of captions, long_captions
#   text_row.npy      int64 [N+1] cache row of record r's first text (= the cache's record_offsets)
#   text_hashes.npy   uint64 [T]  per-text hashes; read only to say which caption differs from a cache
INDEX_FORMAT = "llm2clip-train-index/1"
INDEX_META = "index_meta.json"
INDEX_ARRAYS = ("line_offset", "line_size", "line_no", "image_shard", "image_offset", "image_size", "counts",
                "text_row", "text_hashes")


def index_source(manifest=None, image_root=None, shards=None):
    """What a training index is built from, with each file's size and mtime: a changed file rebuilds it."""
    files = [os.path.abspath(manifest)] if manifest else [os.path.abspath(p) for p in shards]
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"{f}: file not found")
    stats = [os.stat(f) for f in files]
    root = None
    if manifest:
        root = os.path.abspath(image_root) if image_root else os.path.dirname(files[0])
    return {"kind": "manifest" if manifest else "shards", "files": files, "image_root": root,
            "sizes": [st.st_size for st in stats], "mtimes_ns": [st.st_mtime_ns for st in stats]}


class _IndexBuilder:
    """Accumulates the index arrays record by record (compact typed buffers, not Python objects)."""

    def __init__(self):
        import array
        self.a = {"line_offset": array.array("q"), "line_size": array.array("q"), "line_no": array.array("q"),
                  "image_shard": array.array("i"), "image_offset": array.array("q"), "image_size": array.array("q"),
                  "counts": array.array("i")}

    def add(self, line_offset, line_size, line_no, shard, image_offset, image_size, n_real, n_long):
        a = self.a
        a["line_offset"].append(line_offset), a["line_size"].append(line_size), a["line_no"].append(line_no)
        a["image_shard"].append(shard), a["image_offset"].append(image_offset), a["image_size"].append(image_size)
        a["counts"].extend((n_real, n_long))

    def arrays(self):
        dt = {"q": np.int64, "i": np.int32}
        out = {k: np.frombuffer(v, dtype=dt[v.typecode]) for k, v in self.a.items()}
        out["counts"] = out["counts"].reshape(-1, 2)
        return out


def _save_npy(path, arr):
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def _shard_part_name(source, i):
    key = hashlib.sha256(f"{source['files'][i]}\0{source['sizes'][i]}\0{source['mtimes_ns'][i]}".encode()).hexdigest()
    return f"{i:06d}-{key[:16]}"


def _scan_shard_part(source, i, parts_dir):
    """One shard -> parts_dir/<part>.jsonl (its records as manifest lines) + <part>.npz (image byte
    ranges, line sizes). Written under temp names and renamed: a part that exists is complete."""
    name = _shard_part_name(source, i)
    final = os.path.join(parts_dir, name + ".npz")
    if os.path.exists(final):
        return
    path = source["files"][i]
    offs, sizes, lines = [], [], []
    tmp_jsonl = os.path.join(parts_dir, f"{name}.jsonl.tmp{os.getpid()}")
    with open(tmp_jsonl, "wb") as f:
        for rec in scan_tar_shard(path):
            train_record(rec["image"], rec)  # the manifest's validation, naming shard::member
            line = (json.dumps({k: rec[k] for k in ("image", "captions", "long_captions")}, ensure_ascii=False)
                    + "\n").encode("utf-8")
            f.write(line)
            offs.append(rec["_tar"][1]), sizes.append(rec["_tar"][2]), lines.append(len(line))
    os.replace(tmp_jsonl, os.path.join(parts_dir, name + ".jsonl"))
    tmp = os.path.join(parts_dir, f"{name}.tmp{os.getpid()}.npz")
    np.savez(tmp, image_offset=np.asarray(offs, np.int64), image_size=np.asarray(sizes, np.int64),
             line_size=np.asarray(lines, np.int64))
    os.replace(tmp, final)


def _wait_for(cond, what, log, poll=0.5):
    """Poll until cond() is true (another rank is building); a line every minute says what we wait for."""
    import time
    t0, said = time.time(), 0
    while not cond():
        time.sleep(poll)
        if time.time() - t0 > 60 * (said + 1):
            said += 1
            log(f"still waiting for {what} ({int(time.time() - t0)} s)")


def _read_index_meta(index_dir):
    path = os.path.join(index_dir, INDEX_META)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _index_ready(index_dir, source, check_images):
    meta = _read_index_meta(index_dir)
    return (meta is not None and meta.get("format") == INDEX_FORMAT and meta.get("source") == source
            and (meta.get("images_checked") or not check_images))


def build_train_index(index_dir, manifest=None, image_root=None, shards=None, check_images=True,
                      rank=0, world_size=1, log=print):
    """Build (or reuse) the training index of a manifest or of tar shards in index_dir; return a TrainIndex.

    Every rank calls it with the same arguments. An index whose source files (path, size, mtime) and
    image_root are unchanged is reused at once. Otherwise: a manifest is read once by rank 0 (records
    validated like read_manifest, image files checked to exist when check_images), while the other
    ranks wait; tar shards are scanned once, rank k taking shards k, k + world_size, ... (a part per
    shard, kept if the build is interrupted), and rank 0 merges the parts. Coordination is through
    files, so it needs no process group and no collective timeout covers a long build.
    """
    import time
    if bool(manifest) == bool(shards):
        raise ValueError("build_train_index: give exactly one of manifest and shards")
    source = index_source(manifest, image_root, shards)
    if not _index_ready(index_dir, source, check_images):
        os.makedirs(index_dir, exist_ok=True)
        t0 = time.time()
        if shards:
            parts_dir = os.path.join(index_dir, "parts")
            os.makedirs(parts_dir, exist_ok=True)
            for i in range(rank, len(source["files"]), world_size):
                _scan_shard_part(source, i, parts_dir)
            if rank == 0:
                names = [_shard_part_name(source, i) for i in range(len(source["files"]))]
                _wait_for(lambda: all(os.path.exists(os.path.join(parts_dir, n + ".npz")) for n in names),
                          f"the other ranks' tar shard scans in {parts_dir}", log)
                _merge_index(index_dir, source, names, log)
                log(f"training index: scanned {len(names)} tar shards over {world_size} rank(s) in "
                    f"{time.time() - t0:.1f}s -> {index_dir}")
        elif rank == 0:
            _build_manifest_index(index_dir, source, check_images)
            log(f"training index: read {manifest} in {time.time() - t0:.1f}s -> {index_dir}")
        if rank != 0:
            _wait_for(lambda: _index_ready(index_dir, source, check_images), f"rank 0 to build {index_dir}", log)
    return TrainIndex(index_dir)


def _finish_index(index_dir, source, arrays, text_hash, hashes, records_file, images_checked):
    """Write the arrays, then index_meta.json last (its presence with this source means complete)."""
    counts = arrays["counts"]
    arrays["text_row"] = np.concatenate([[0], np.cumsum(counts.sum(1), dtype=np.int64)]).astype(np.int64)
    arrays["text_hashes"] = np.frombuffer(hashes, dtype=np.uint64)
    if len(counts) == 0:
        raise DataError(f"{', '.join(source['files'][:3])}: no records; expected one image + captions per record")
    meta_path = os.path.join(index_dir, INDEX_META)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for k in INDEX_ARRAYS:
        _save_npy(os.path.join(index_dir, k + ".npy"), arrays[k])
    meta = {"format": INDEX_FORMAT, "source": source, "records_file": records_file, "num_records": len(counts),
            "fields": list(CACHE_FIELDS), "field_texts": counts.sum(0).tolist(), "num_texts": int(counts.sum()),
            "text_hash": text_hash, "images_checked": images_checked}
    tmp = f"{meta_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)


def _build_manifest_index(index_dir, source, check_images):
    import array
    path, root = source["files"][0], source["image_root"]
    b, h, hashes = _IndexBuilder(), hashlib.sha256(), array.array("Q")
    for r, (lineno, off, size, obj) in enumerate(scan_jsonl(path)):
        where = f"{path}:{lineno}"
        image, caps, longs = train_record(where, obj)
        if check_images and not os.path.isfile(os.path.join(root, image)):
            raise DataError(f"{where}: image file not found: {os.path.join(root, image)} (image root {root})")
        hash_record_texts(h, hashes, r, "captions", caps)
        hash_record_texts(h, hashes, r, "long_captions", longs)
        b.add(off, size, lineno, -1, 0, 0, len(caps), len(longs))
    _finish_index(index_dir, source, b.arrays(), h.hexdigest(), hashes, path, check_images)


def _merge_index(index_dir, source, names, log):
    """Rank 0: concatenate the shards' parts into records.jsonl and the arrays, hashing the texts."""
    import array
    parts_dir = os.path.join(index_dir, "parts")
    records_file = os.path.join(index_dir, "records.jsonl")
    b, h, hashes = _IndexBuilder(), hashlib.sha256(), array.array("Q")
    offset, r = 0, 0
    tmp = f"{records_file}.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        for i, name in enumerate(names):
            with np.load(os.path.join(parts_dir, name + ".npz")) as z:
                img_off, img_size = z["image_offset"].tolist(), z["image_size"].tolist()
            with open(os.path.join(parts_dir, name + ".jsonl"), "rb") as f:
                for j, line in enumerate(f):
                    obj = json.loads(line)
                    hash_record_texts(h, hashes, r, "captions", obj["captions"])
                    hash_record_texts(h, hashes, r, "long_captions", obj["long_captions"])
                    b.add(offset, len(line), r + 1, i, img_off[j], img_size[j],
                          len(obj["captions"]), len(obj["long_captions"]))
                    out.write(line)
                    offset += len(line)
                    r += 1
    os.replace(tmp, records_file)
    _finish_index(index_dir, source, b.arrays(), h.hexdigest(), hashes, records_file, True)
    import shutil
    shutil.rmtree(parts_dir, ignore_errors=True)


class TrainIndex:
    """Read a training index (build_train_index): len(index) records; index[r] -> the record as a dict
    like read_manifest's ({"image", "captions", "long_captions"}, plus "_tar" for shards), re-read from
    its line on demand; index.text_row(r) -> its first cache row. Arrays are memory-mapped lazily, once
    per process, and files opened per process, so DataLoader workers (fork or spawn) share the pages."""

    def __init__(self, index_dir):
        self.dir = index_dir
        meta = _read_index_meta(index_dir)
        if meta is None or meta.get("format") != INDEX_FORMAT:
            raise DataError(f"{index_dir}: no complete training index ({INDEX_META} missing or of another format)")
        self.meta = meta
        self.num_records, self.text_hash, self.fields = meta["num_records"], meta["text_hash"], meta["fields"]
        self.records_file = meta["records_file"]
        self.kind, self.files, self.image_root = meta["source"]["kind"], meta["source"]["files"], meta["source"]["image_root"]
        self._mm, self._fds, self._pid = {}, {}, None

    def __getstate__(self):
        return {**self.__dict__, "_mm": {}, "_fds": {}, "_pid": None}

    def _mine(self):
        if self._pid != os.getpid():  # a forked worker: its own mappings and file descriptors
            self._mm, self._fds, self._pid = {}, {}, os.getpid()

    def array(self, name):
        self._mine()
        if name not in self._mm:
            self._mm[name] = np.load(os.path.join(self.dir, name + ".npy"), mmap_mode="r")
        return self._mm[name]

    def _fd(self, path):
        self._mine()
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def __len__(self):
        return self.num_records

    def where(self, r):
        """'file:line' of record r, for messages."""
        return f"{self.records_file}:{int(self.array('line_no')[r])}"

    def __getitem__(self, r):
        r = int(r)
        if not 0 <= r < self.num_records:
            raise IndexError(f"record {r} out of range (0..{self.num_records - 1})")
        line = os.pread(self._fd(self.records_file), int(self.array("line_size")[r]), int(self.array("line_offset")[r]))
        obj = json.loads(line)
        shard = int(self.array("image_shard")[r])
        if shard < 0:
            return {"image": os.path.join(self.image_root, obj["image"]), "captions": obj.get("captions") or [],
                    "long_captions": obj.get("long_captions") or []}
        return {**obj, "_tar": [self.files[shard], int(self.array("image_offset")[r]), int(self.array("image_size")[r])]}

    def text_row(self, r):
        return int(self.array("text_row")[r])

    def cache_row(self, r, record, field, slot):
        """Cache row of (record r, field, slot); `record` is index[r] (its caption counts)."""
        return self.text_row(r) + (len(record["captions"]) if field == "long_captions" else 0) + slot

    def used_fields(self):
        """The caption fields that have any text."""
        return [f for f, n in zip(self.meta["fields"], self.meta["field_texts"]) if n]

    def texts(self, fields):
        """A CacheTexts-like view (counts, text_hashes, lazy texts, where) for describe_text_mismatch."""
        cols = [self.meta["fields"].index(f) for f in fields]
        counts = np.asarray(self.array("counts"))[:, cols]
        view = CacheTexts(self.records_file, list(fields), None, counts, np.asarray(self.array("line_no")),
                          np.asarray(self.array("text_hashes")), self.text_hash)
        view.texts = ManifestTexts(self.records_file, fields, self.array("line_offset"), self.array("line_size"),
                                   view.record_offsets)
        return view


class TrainSamples:
    """Stage-2 training samples: item (epoch, index) -> dict(image, embedding, text, index, bad).

    `records` is a TrainIndex (records re-read on demand, cache rows from the index). The caption is
    chosen by `choose_caption`; its text embedding is the cache row of (record, field, slot) (None for
    text_source="online", where the loop embeds `text`). A bad image raises DataError with its path,
    or with skip_bad_images the next record (index + 1, + 2, ...) takes its place, so every rank keeps
    the same batch size; `bad` lists the skipped images for the end-of-run report.
    """

    def __init__(self, records, transform, cache=None, seed=0, real_caption_ratio=0.5, skip_bad_images=False):
        self.records, self.transform, self.cache = records, transform, cache
        self.seed, self.ratio, self.skip_bad = seed, real_caption_ratio, skip_bad_images

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        epoch, index = item
        bad = []
        n = len(self.records)
        for k in range(n):
            i = (index + k) % n
            rec = self.records[i]
            try:
                img = open_image(rec)
                break
            except DataError as e:
                if not self.skip_bad:
                    raise DataError(f"{e} (set skip_bad_images=True to skip bad images)") from None
                bad.append(rec["image"])
        else:
            raise DataError(f"no readable image among {n} records")
        rng = sample_rng(self.seed, epoch, i)
        field, slot = choose_caption(rec, rng, self.ratio)
        emb = None
        if self.cache is not None:
            row = self.records.cache_row(i, rec, field, slot)
            emb = np.array(self.cache.embeddings[row])
            if not np.isfinite(emb).all():  # would train until the loss is NaN, naming nothing
                raise DataError(f"{os.path.join(self.cache.cache_dir, CACHE_EMBEDDINGS)}: row {row} is not finite: "
                                f"record {i} ({self.records.where(i)}, image {rec['image']}), {field}[{slot}]; "
                                "check it with embed_captions.py --verify_only=True")
        return {"image": self.transform(img, rng), "embedding": emb, "text": rec[field][slot], "index": i, "bad": bad}


def collate_train(samples):
    """Stack a list of TrainSamples items into one batch dict (embedding None when not cached)."""
    import numpy as np
    import torch
    embs = [s["embedding"] for s in samples]
    return {"image": torch.stack([s["image"] for s in samples]),
            "embedding": None if embs[0] is None else torch.from_numpy(np.stack(embs).astype(np.float32)),
            "text": [s["text"] for s in samples], "index": torch.tensor([s["index"] for s in samples]),
            "bad": [b for s in samples for b in s["bad"]]}


class EpochBatchSampler(ResumableBatchSampler):
    """ResumableBatchSampler whose items are (epoch, index), so a sample knows its epoch's seed."""

    def __iter__(self):
        for step, indices in enumerate(super().__iter__(), self.start_step):
            epoch = self.epoch_of(step)
            yield [(epoch, i) for i in indices]



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
