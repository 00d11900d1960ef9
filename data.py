"""Data for every stage: caption files, manifests, images, converters, transforms, samplers, synthetic data.

The embedding cache is in cache.py, tar shards and the stage-2 training index in data_index.py (both
build on this module, never the reverse). Plain Python + numpy + PIL; no project imports, so each
stage script reads data the same way.
Every reader names the file and line of bad input and what it expected; nothing is silently dropped.

One reader per input kind, so every rule below holds for every caller by construction:
- Text files (JSONL manifests and caption files, class-name and template files, tar captions) are
  decoded by `decode_text` and read line by line by `scan_lines`:
  a UTF-8 byte-order mark at the start is accepted and stripped; LF and CRLF line ends are accepted;
  whitespace-only lines are not records; bytes that are not UTF-8 are a DataError naming file:line
  ("expected UTF-8"); a NUL character is a DataError (it is never text: a binary or UTF-16 file);
  a file with no non-blank line is a DataError.
- JSON (a JSONL line, a tar sample's .json, a whole converter input) is parsed by `parse_json`:
  a key twice in one object is a DataError (json would keep the last one silently); a string
  holding a lone surrogate (a "\\ud800" escape: tokenizers later fail on it with a raw
  UnicodeEncodeError) or a NUL ("\\u0000") is a DataError naming the field; nesting too deep or
  numbers too long to convert are malformed JSON.
- Records: each reader checks its field types (a caption list of non-empty strings, an image path
  string, ...) naming file:line and the field; a key that identifies a record (an "id", a manifest's
  image) appears once per file (`UniqueKeys`): a repeat is a DataError naming both lines. A manifest
  with one line per caption of the same image is refused, never read as that many images.
- Class folders (`read_class_folder`): hidden entries (".name", "__MACOSX") and files that are not
  images are skipped, counted and logged; a class folder without images is a DataError.
- Images: every image is opened by `open_image`, whose rules are in its docstring; every failure is a
  DataError naming the image, so skip_bad_images (data_index.TrainSamples) covers every one of them.
"""
import json
import os


class DataError(ValueError):
    """Bad input data: the message names the file (and line) and what was expected."""


def atomic_write(path, write):
    """write(tmp) then rename tmp -> path, so a crash never leaves a half-written `path`: the one way every
    file of ours is written. On failure the temp file is removed and an OSError (disk full, ...) names
    `path`; a SIGKILL leaves `{path}.tmp<pid>`, which the next run's start deletes (common.lock_out_dir)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise


def check_format_version(path, meta, supported):
    """The `format_version` of an artefact's metadata (the cache's meta.json, the training index's):
    files written before versions existed have none and are version 1; a newer one than this code reads
    is refused, naming the file, rather than misread."""
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > supported:
        raise DataError(f"{path}: format_version {version!r} is newer than this code reads ({supported}); "
                        "update the code")
    return version


# === the low-level text, line and JSON readers every reader below builds on

_BOM = b"\xef\xbb\xbf"


def decode_text(where, raw, lineno=None):
    """bytes -> str by the text rules of the module docstring (BOM stripped, UTF-8 strictly, no NUL);
    errors name `where` (a file, or shard::member) and the line when given."""
    at = where if lineno is None else f"{where}:{lineno}"
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        hint = " (it starts with a UTF-16 byte-order mark)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(f"{at}: byte {e.start} ({raw[e.start:e.start + 1]!r}) is not UTF-8{hint}; "
                        "expected UTF-8 text") from None
    if "\0" in text:
        raise DataError(f"{at}: NUL character at position {text.index(chr(0))}; expected text (a binary or "
                        "UTF-16 file?)")
    return text


def scan_lines(path, empty="empty file (no non-blank line)", start=0, stop=None, lineno=1):
    """Yield (line_number, byte_offset, byte_size, text) for each non-blank line of a text file: the
    one line reader of every text and JSONL reader. `text` has its line end (LF or CRLF) removed; the
    offset and size cover the line's bytes without a leading BOM, so one pread re-reads exactly it.
    A BOM starting any later line is a DataError (concatenated files). `empty`: the message (a DataError) for a
    file with no non-blank line. A part of a file: the lines starting in bytes [start, stop), from line `lineno`."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    offset, found = start, stop is not None
    with open(path, "rb") as f:
        f.seek(start)
        for lineno, line in enumerate(f, lineno):
            size, start = len(line), offset
            if stop is not None and start >= stop:
                break
            offset += size
            if line.startswith(_BOM):
                if start > 0:
                    raise DataError(f"{path}:{lineno}: a UTF-8 byte-order mark starts this line (files "
                                    "concatenated?); expected one only at the start of the file")
                line, start, size = line[len(_BOM):], start + len(_BOM), size - len(_BOM)
            text = decode_text(path, line, lineno)
            if text and not text.isspace():  # (not text.strip(): no copy of the line)
                found = True
                yield lineno, start, size, text.rstrip("\r\n")
    if not found:
        raise DataError(f"{path}: {empty}")


class _DuplicateKey(Exception):
    pass


def _unique_pairs(pairs):
    """json object_pairs_hook: a dict, or _DuplicateKey when a key repeats (json keeps the last silently)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _bad_string(obj):
    """(field, problem) of the first string (key or value) in a parsed JSON value holding a lone
    surrogate or a NUL, else None. Iterative, so no nesting json accepts can overflow the stack."""
    stack = [("", obj)]
    while stack:
        name, v = stack.pop()
        if isinstance(v, dict):
            stack += [(f"{name}.{k}" if name else str(k), x) for k, x in reversed(list(v.items()))]
            stack += [(f"{name} key", k) for k in v]
        elif isinstance(v, list):
            stack += [(f"{name}[{i}]", x) for i, x in reversed(list(enumerate(v)))]
        elif isinstance(v, str):
            for i, ch in enumerate(v):
                if "\ud800" <= ch <= "\udfff":
                    return name or "value", (f"lone surrogate U+{ord(ch):04X} at position {i} (a \\u{ord(ch):04x} "
                                             "escape without its pair); expected valid Unicode text")
                if ch == "\0":
                    return name or "value", f"NUL character at position {i}; expected text without NUL"
    return None


_JSON = json.JSONDecoder(object_pairs_hook=_unique_pairs)  # one decoder: json.loads(text, hook) builds one per call


def parse_json(where, text, expect=dict, what="one JSON object per line"):
    """Parse JSON text by the JSON rules of the module docstring; the value must be an `expect`.
    Errors name `where` (file:line, a file, or shard::member) and say what was expected (`what`)."""
    try:
        obj = _JSON.decode(text)
    except _DuplicateKey as e:
        raise DataError(f"{where}: duplicate key {e.args[0]!r} in one JSON object; expected each key once") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno}); expected {what}") from None
    except RecursionError:
        raise DataError(f"{where}: malformed JSON (nested too deeply); expected {what}") from None
    except ValueError as e:  # e.g. an int of more than 4300 digits
        raise DataError(f"{where}: malformed JSON ({str(e)[:80]}); expected {what}") from None
    if "\\u" in text:  # lone surrogates and NULs in strings can only come from \u escapes
        bad = _bad_string(obj)
        if bad:
            raise DataError(f"{where}: field {bad[0]}: {bad[1]}")
    if not isinstance(obj, expect):
        raise DataError(f"{where}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                        f"got {type(obj).__name__}")
    return obj


def read_json(path, expect=dict, what="a JSON object"):
    """A whole JSON file (a converter's input) by the text and JSON rules; errors name the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        return parse_json(path, decode_text(path, f.read()), expect, what)


def scan_jsonl(path, empty="no records (empty file); expected one JSON object per line", **part):
    """Yield (line_number, byte_offset, byte_size, object) for each non-blank line of a JSONL file:
    read_jsonl plus where each line lies, so a reader can come back to one record with one pread.
    Lines come from scan_lines (`part`: its start, stop, lineno) and are parsed by parse_json (module docstring)."""
    for lineno, offset, size, text in scan_lines(path, empty, **part):
        yield lineno, offset, size, parse_json(f"{path}:{lineno}", text)


def read_jsonl(path, empty="no records (empty file); expected one JSON object per line"):
    """Yield (line_number, object) for each non-blank line of a JSONL file, with clear errors."""
    for lineno, _, _, obj in scan_jsonl(path, empty):
        yield lineno, obj


class UniqueKeys:
    """One record per key within a file (a caption record's "id", a manifest's image): add() each
    record's key, then check() once at the end, which raises a DataError naming the key and both
    lines of the first repeat. Keys are kept as 8-byte hashes beside their line numbers (16 bytes a
    record, so a 1M-line training manifest costs 16 MB, not a dict of strings); `key_of(i)` gives
    the i-th added key back (from memory, or by re-reading its line) to name it and rule out a hash
    collision. Checked at the end, so a bad field on a repeated line is reported as that first."""

    def __init__(self, path, what, hint=""):
        import array
        self.path, self.what, self.hint = path, what, hint
        self.hashes, self.lines = array.array("Q"), array.array("q")

    def add(self, key, lineno):
        import hashlib
        self.hashes.append(int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little"))
        self.lines.append(lineno)

    def check(self, key_of):
        import numpy as np
        h = np.frombuffer(self.hashes, dtype=np.uint64)
        order = np.argsort(h, kind="stable")  # equal hashes stay in file order
        same = np.flatnonzero(h[order][1:] == h[order][:-1])
        pairs = sorted((int(order[k + 1]), int(order[k])) for k in same)  # (later, earlier), by the later line
        for later, earlier in pairs:
            key = key_of(later)
            if key == key_of(earlier):
                raise DataError(f"{self.path}:{self.lines[later]}: {self.what} {key!r} again (first on line "
                                f"{self.lines[earlier]}); expected one record per {self.what}{self.hint}")


# === captions and caption pairs (stage 1, c2c eval) ===

def read_caption_records(path):
    """Caption JSONL `{"id": ..., "captions": [>= 2 non-empty strings]}` -> list of {"id", "captions"}.

    Every record must have two or more non-empty captions (stage 1 needs a positive pair, c2c eval a
    query and a gallery caption); anything else is a DataError naming file:line, never a skip.
    A missing "id" becomes "<file>:<line>"; an "id" given twice in the file is a DataError naming both lines.
    """
    records, given, ids = [], [], UniqueKeys(path, "id")
    for lineno, obj in read_jsonl(path, "no records; expected one JSON object with >= 2 captions per line"):
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
        if "id" in obj:
            given.append(records[-1]["id"])
            ids.add(given[-1], lineno)
    ids.check(given.__getitem__)
    return records


def read_text_pairs(path):
    """Pure-text pairs JSONL `{"query": ..., "positive": ...}` -> records whose two captions keep that
    order (`"ordered": True`): the query is always the query side, the positive the positive side.
    Optional per record (E5-style data): "instruction" (the query's own instruction, instead of the
    caption one) and "negative" (its own hard negative). An "id" given twice is a DataError."""
    records, given, ids = [], [], UniqueKeys(path, "id")
    for lineno, obj in read_jsonl(path, "no records; expected one {\"query\": ..., \"positive\": ...} object per line"):
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
        if "id" in obj:
            given.append(rec["id"])
            ids.add(given[-1], lineno)
    ids.check(given.__getitem__)
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
    if "image" in obj and not isinstance(image, str):
        raise DataError(f"{where}: 'image' must be a relative image path string, got {image!r:.80}")
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
    empty manifest are errors, named with file:line, so a bad path fails before any model runs. One
    record per image (unique_images): an image on several lines (one line per caption) is a DataError
    naming both lines, never read as that many images.
    """
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    records, keys, images = [], [], unique_images(path)
    for lineno, obj in read_jsonl(path, "empty manifest (no records); expected one JSON object per image"):
        image, caps, longs = train_record(f"{path}:{lineno}", obj)
        keys.append(os.path.normpath(image))
        images.add(keys[-1], lineno)
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
    images.check(keys.__getitem__)
    return records


def unique_images(path):
    """The one-record-per-image check of a manifest (UniqueKeys over normalised image paths)."""
    return UniqueKeys(path, "image", " with a list of captions (not one line per caption)")


def write_manifest(path, records):
    """Write manifest records (dicts with "image" and caption lists) as JSONL; returns the count."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    atomic_write(path, write)
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


# --- class folders (zero-shot classification, linear probe): ImageNet layout <root>/<class>/<image>
import re  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# ImageNet-1k zero-shot defaults, shipped as data: WordNet id -> class name (the names CLIP's notebooks
# and open_clip use, in sorted-WNID order) and CLIP's 80 prompt templates
IMAGENET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "imagenet")
IMAGENET_CLASSNAMES = os.path.join(IMAGENET_DIR, "classnames.tsv")
IMAGENET_TEMPLATES = os.path.join(IMAGENET_DIR, "templates.txt")


def imagenet_classnames():
    """{wnid: class name} from the shipped config/imagenet/classnames.tsv."""
    names = {}
    for lineno, _, _, line in scan_lines(IMAGENET_CLASSNAMES):
        wnid, tab, name = line.partition("\t")
        if not tab or not name.strip():
            raise DataError(f"{IMAGENET_CLASSNAMES}:{lineno}: expected '<wnid><TAB><class name>'")
        names[wnid] = name
    return names


def read_name_lines(path, what):
    """The stripped non-blank lines of a one-item-per-line text file (class names, prompt templates),
    read by scan_lines (the text rules of the module docstring)."""
    return [line.strip() for _, _, _, line in scan_lines(path, f"no {what}; expected one per line")]


def _read_templates(path):
    templates = read_name_lines(path, "templates")
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise DataError(f"{path}: every template needs a {{}} for the class name; bad: {bad[:3]}")
    return templates


def _hidden(name):
    """Hidden entries of a class folder: dot-files and folders (.DS_Store, .ipynb_checkpoints, ._x.jpg
    resource forks) and macOS archive litter (__MACOSX)."""
    return name.startswith(".") or name == "__MACOSX"


def read_class_folder(root, classnames_file="", templates_file="", allow_empty_classes=False, log=print):
    """ImageNet-style folder: (image paths, labels, class names, templates). Classes are the sorted
    subfolders (torchvision ImageFolder order); names from a file (one per line, same order), else for
    WordNet-id folders (n01440764, ...) the shipped ImageNet names and CLIP's 80 templates, else the
    folder names and "a photo of a {}.".

    Skipped, counted and logged in one line (never silently): hidden entries (_hidden) at both
    levels, files beside the class folders, and files in a class folder that are not images (by
    extension, IMAGE_EXTENSIONS). A class folder with no image is a DataError naming it, unless
    allow_empty_classes (a linear probe's split may lack a class the other split has)."""
    entries = sorted(os.listdir(root)) if os.path.isdir(root) else []
    skipped = {"hidden entries": sum(map(_hidden, entries)), "files beside the class folders": 0,
               "non-image files": 0}
    classes = [d for d in entries if not _hidden(d) and os.path.isdir(os.path.join(root, d))]
    skipped["files beside the class folders"] = len(entries) - skipped["hidden entries"] - len(classes)
    if not classes:
        raise DataError(f"{root}: no class subfolders (expected an ImageNet-style folder: <root>/<class>/<image>)")
    wnid = all(re.fullmatch(r"n\d{8}", c) for c in classes)
    names = [c.replace("_", " ") for c in classes]
    if classnames_file:
        names = read_name_lines(classnames_file, "class names")
        if len(names) != len(classes):
            raise DataError(f"{classnames_file}: {len(names)} class names, but {root} has {len(classes)} class folders")
    elif wnid:
        known = imagenet_classnames()
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise DataError(f"{root}: class folders {unknown[:5]} are WordNet ids but not ImageNet-1k classes "
                            f"({IMAGENET_CLASSNAMES}); pass --classnames=FILE")
        names = [known[c] for c in classes]
    templates = _read_templates(templates_file) if templates_file else (
        _read_templates(IMAGENET_TEMPLATES) if wnid else ["a photo of a {}."])
    paths, labels = [], []
    for c, cls in enumerate(classes):
        files = sorted(os.listdir(os.path.join(root, cls)))
        images = [f for f in files if not _hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)
                  and os.path.isfile(os.path.join(root, cls, f))]
        hidden = sum(map(_hidden, files))
        skipped["hidden entries"] += hidden
        skipped["non-image files"] += len(files) - hidden - len(images)
        if not images and not allow_empty_classes:
            raise DataError(f"{os.path.join(root, cls)}: class {cls!r} has no images ({len(files)} entries, none "
                            f"an image file {'/'.join(IMAGE_EXTENSIONS)}); expected at least one image per class")
        paths += [os.path.join(root, cls, f) for f in images]
        labels += [c] * len(images)
    if not paths:
        raise DataError(f"{root}: no images in the class folders")
    if any(skipped.values()):
        log(f"{root}: skipped " + ", ".join(f"{n} {k}" for k, n in skipped.items() if n)
            + f" (read {len(paths)} images in {len(classes)} classes)")
    return paths, labels, names, templates


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


# === stage-2 training data: caption choice, training transforms, images (tar shards: data_index.py) ===
# Each sample's caption choice and crop come from its own numpy generator seeded by (seed, epoch,
# record), never from a global RNG: the same step gives the same batch whatever the number of
# workers or ranks, and a resumed run replays the uninterrupted one exactly.


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
    """RandomResizedCrop(scale) to the model's input size, bicubic, then the model's mean/std: torchvision's
    resized_crop + to_tensor + normalize bit for bit (tested), with fewer copies, in place into `out` (a batch slot).
    `data_config` is the vision model's timm preprocessing config (input_size, mean, std)."""

    def __init__(self, data_config, scale=(0.9, 1.0)):
        self.size = tuple(data_config["input_size"][-2:])  # (H, W)
        self.mean, self.std, self.scale = list(data_config["mean"]), list(data_config["std"]), scale

    def __call__(self, img, rng, out=None):
        import torch
        from PIL import Image
        top, left, h, w = random_resized_crop_params(img.width, img.height, rng, self.scale)
        img = img.crop((left, top, left + w, top + h)).resize(self.size[::-1], Image.BICUBIC)
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(*self.size, 3)  # (H, W, 3)
        out = (torch.empty(3, *self.size) if out is None else out).copy_(pixels.permute(2, 0, 1))
        mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (self.mean, self.std))
        return out.div_(255).sub_(mean).div_(std)  # to_tensor's x / 255, then normalize's (x - mean) / std


def to_rgb(img):
    """Any PIL mode -> 8-bit RGB, one rule per mode (open_image applies it to every image):
    - transparency (an alpha band: RGBA, LA, PA, RGBa, La; or a palette/"transparency" entry: P, L, RGB)
      is composited on white, so transparent pixels are the white of a page, never the arbitrary
      colour (often black) stored under alpha 0;
    - 16- and 32-bit integers (I;16, I;16B, I;16L, I;16N, I: 16-bit PNG/TIFF) are read as 0..65535,
      clipped, and divided by 257 (65535 -> 255), not clipped at 255 (PIL's convert makes most of them
      white); their transparency entry, if any, is ignored;
    - 32-bit float (F) is read as 0..1, clipped, times 255;
    - everything else (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX) by PIL's own convert("RGB").
    Of an animated or multi-page file, the first frame."""
    import numpy as np
    from PIL import Image
    if img.mode == "RGB" and "transparency" not in img.info:
        return img  # already what convert("RGB") would copy
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if img.mode == "F" else a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")  # PIL has no La -> RGBA
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def open_image(record, where=None, draft=0):
    """PIL RGB image of a manifest record (read_manifest resolves its path) or a tar-shard record (byte range):
    the one function that opens every image (eval datasets, zoo, training samples); draft > 0 (other pixels):
    a JPEG decodes at the smallest DCT scale (1/2, 1/4, 1/8) keeping both sides >= draft pixels (faster).

    Modes become RGB by to_rgb's rules. Every failure is a DataError naming the image (and `where`, e.g.
    the manifest's file:line, or read_manifest's "line"), so skip_bad_images covers all of them: a missing file,
    an empty (0-byte) file or tar member, an unreadable one (permissions, a folder), a byte range
    past the shard's end, bytes PIL cannot identify or decode (a truncated or corrupt file: PIL is
    not told to load truncated images), a zero-width or zero-height image, one of more pixels than
    PIL's decompression-bomb limit Image.MAX_IMAGE_PIXELS (PIL itself only warns below twice that and
    would decode it; its DecompressionBombError, and the warning when turned into an error, are caught
    too), and any other exception PIL raises while decoding."""
    import io
    from PIL import Image
    tar = record.get("_tar")
    name = record["image"]
    where = where or (f"manifest line {record['line']}" if "line" in record else None)
    at = f"{name}{f' ({where})' if where else ''}"
    try:
        if tar:
            path, offset, size = tar
            with open(path, "rb") as f:
                f.seek(offset)
                raw = f.read(size)
            if len(raw) != size:
                raise DataError(f"{at}: truncated: {len(raw)} of its {size} bytes in {path}")
            src = io.BytesIO(raw)
        else:
            src, size = name, os.path.getsize(name)
        if size == 0:
            raise DataError(f"{at}: empty image file (0 bytes); expected an image")
        with Image.open(src) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:  # PIL only warns below twice its limit, then decodes
                raise DataError(f"{at}: image too large ({img.width}x{img.height} = {img.width * img.height} "
                                f"pixels); expected at most Image.MAX_IMAGE_PIXELS={limit} pixels")
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
            if img.width == 0 or img.height == 0:
                raise DataError(f"{at}: image of size {img.width}x{img.height}; expected a non-empty image")
            return to_rgb(img)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{at}: image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{at}: image too large ({e}); expected at most Image.MAX_IMAGE_PIXELS="
                        f"{Image.MAX_IMAGE_PIXELS} pixels") from None
    except Exception as e:  # PIL.UnidentifiedImageError, truncated data, and whatever a corrupt file makes PIL raise
        raise DataError(f"{at}: cannot read image ({type(e).__name__}: {str(e)[:200]}); expected a readable "
                        "image file") from None


# === synthetic image-caption data (the tiny pipeline) ===
# Coloured shapes on a plain background: a retrieval task that a tiny ViT learns in a few hundred CPU
# steps, yet needs colour, shape, size and position to tell ~200 held-out images apart. The closed,
# small vocabulary (synthetic_vocabulary) lets a tokenizer be trained offline from these captions.
import random  # noqa: E402  (kept in this section: only the synthetic generator needs it)

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
