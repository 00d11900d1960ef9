"""The embedding cache: embed_captions.py writes it, post_train.py (and zoo.py's cached text tower)
read it. Plain numpy; imports data.py for its readers, never the reverse.
"""
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from data import DataError, atomic_write, check_format_version, scan_jsonl, train_record

# A cache directory (format "llm2clip-embedding-cache/1"):
#   embeddings.npy  float16 [count, dim], a plain .npy file, read with np.load(mmap_mode="r")
#   index.npz       record_offsets int64 [num_records + 1] (first row of each record),
#                   counts int32 [num_records, num_fields], text_hashes uint64 [count] (8-byte blake2b
#                   of each text: lets a stale cache say exactly which caption changed)
#   meta.json       format, format_version (absent before versions existed: 1), encoder identity, dim,
#                   dtype, count, num_records, fields, text_hash, manifest, complete, code_version, config
#                   (write_cache_meta / read_cache_meta)
# Texts are enumerated in manifest order: record r (the r-th non-empty line), field f (in `fields`
# order; a missing field has no texts), slot s -> one row, so
#   row(r, f, s) = record_offsets[r] + counts[r, :f].sum() + s.
CACHE_FORMAT = "llm2clip-embedding-cache/1"
CACHE_FORMAT_VERSION = 1  # meta.json's format_version: raise it when an old reader would misread
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
    """The texts of one record field: a list of non-empty strings, the rule data.train_record applies (a
    bare string is refused there too: it is one caption or a typo for a list, and the reader cannot tell)."""
    value = obj.get(field)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise DataError(f"{where}: field {field!r} must be a list of strings, got {json.dumps(value, default=str)[:80]}")
    for s, t in enumerate(value):
        if not t.strip():
            raise DataError(f"{where}: field {field!r} slot {s} is an empty caption")
    return list(value)


def record_text_payload(r, field, values, digests):
    """The bytes record r's texts of one field add to the running text hash (sha256), each text length-prefixed
    so that no text can imitate a record boundary; each text's 8-byte blake2b hash is appended to the bytearray
    `digests` (little-endian uint64). The one definition of a cache's text identity: cache_texts (through
    hash_record_texts) and the training index both build on it, so their hashes agree."""
    out = []
    for s, t in enumerate(values):
        b = t.encode("utf-8")
        out += (f"{r}\0{field}\0{s}\0{len(b)}\0".encode(), b)
        digests += hashlib.blake2b(b, digest_size=8).digest()
    return b"".join(out)


def hash_record_texts(h, hashes, r, field, values):
    """Add record r's texts of one field to the running text hash `h` (sha256) and their blake2b hashes to the
    array('Q') `hashes` (record_text_payload)."""
    d = bytearray()
    h.update(record_text_payload(r, field, values, d))
    hashes.extend(int.from_bytes(d[i:i + 8], "little") for i in range(0, len(d), 8))


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
        if "image" in obj:  # a stage-2 manifest line: also valid as training reads it (its image)
            train_record(where, obj)
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
    if key == "official_extraction":  # absent from caches of older code: False
        return bool(value)
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


def write_cache_meta(cache_dir, meta):
    """meta.json, stamped with the format and this code's format_version, through a temp file and a rename:
    a reader never sees half of it, and a killed writer leaves only `meta.json.tmp<pid>`."""
    path = os.path.join(cache_dir, CACHE_META)
    meta = {"format": CACHE_FORMAT, **meta, "format_version": CACHE_FORMAT_VERSION}
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
    atomic_write(path, write)


def read_cache_meta(cache_dir):
    """meta.json of a cache (any format_version up to this code's; none: 1); DataError naming the file
    when it is missing, corrupt, of another format or of a newer version."""
    path = os.path.join(cache_dir, CACHE_META)
    if not os.path.isfile(path):
        raise DataError(f"{cache_dir}: no {CACHE_META}; not an embedding cache (build one with embed_captions.py)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: corrupt meta.json ({e}); rebuild the cache with embed_captions.py") from None
    if isinstance(meta, dict):
        check_format_version(path, meta, CACHE_FORMAT_VERSION)
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
        if hasattr(manifest, "text_hash"):  # a TrainIndex (stage 2): it hashed the texts once, when it was built
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
