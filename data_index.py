"""Stage-2 training data: tar shards, the training index (built once, memory-mapped by every rank and
worker), the training samples and post_train.py's loader. Imports data.py and cache.py, never the reverse.
"""
import hashlib
import json
import os

import numpy as np

from cache import CACHE_EMBEDDINGS, CACHE_FIELDS, CacheTexts, EmbeddingCache, ManifestTexts, record_text_payload
from data import (DataError, ResumableBatchSampler, TrainTransform, _caption_list, check_format_version,
                  choose_caption, decode_text, open_image, parse_json, sample_rng, scan_jsonl, train_record,
                  unique_images)

# === tar shards (WebDataset / img2dataset layout) ===
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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


def scan_tar_shard(path, skipped=None):
    """Yield the manifest-style records of one WebDataset tar shard (img2dataset output), in member order.

    A sample is the members sharing a key (the name up to the first dot): an image (.jpg/.png/...)
    plus `.txt` (the real caption) and/or `.json` (keys `captions`, `long_captions`, or `caption`).
    Image bytes are not read here: each record keeps the byte range of its image (`_tar`), so any
    rank or worker reads its own samples with a plain seek; open_image checks them when read (a
    member that is not an image is a DataError naming shard::member there, where skip_bad_images
    applies). Records with no caption are an error.
    Integrity: tarfile stops quietly at a truncated header, so every member must lie within the file
    and the archive must end with its end-of-archive blocks; a shard cut anywhere is a DataError naming
    it (never fewer samples). Captions are read by data's text and JSON readers (decode_text,
    parse_json: UTF-8, no NUL, no duplicate keys, no lone surrogates) and validated as manifests are
    (_caption_list), naming `shard::member`. A member name twice, or two images under one key, is a
    DataError naming both (tarfile would keep the last silently).
    Skipped, never silently: samples without an image (img2dataset writes failed downloads as .json
    only), members of other kinds (.cls, .npy, ...), and non-file members; each is counted in
    `skipped` (a dict: reason -> count) when given, which the index build logs.
    """
    import tarfile
    samples, names = {}, set()
    counts = {} if skipped is None else skipped
    size = os.path.getsize(path)
    last = None
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if m.offset_data + m.size > size:
                    raise DataError(f"{path}: truncated tar shard: member {m.name!r} needs bytes up to "
                                    f"{m.offset_data + m.size}, the file has {size}")
                last = m.name
                if not m.isfile():
                    counts["non-file members (folders, links)"] = counts.get("non-file members (folders, links)", 0) + 1
                    continue
                if m.name in names:
                    raise DataError(f"{path}::{m.name}: member name appears twice in the shard; expected each once")
                names.add(m.name)
                d, base = os.path.split(m.name)
                key, _, ext = base.partition(".")
                s = samples.setdefault(os.path.join(d, key), {})
                ext = ext.lower()
                if ext in IMAGE_EXTS:
                    if "image" in s:
                        raise DataError(f"{path}::{m.name}: a second image for sample {key!r} (first "
                                        f"{s['image'].name!r}); expected one image per sample")
                    s["image"] = m
                elif ext in ("txt", "json"):
                    where = f"{path}::{m.name}"
                    s[ext] = (where, decode_text(where, tf.extractfile(m).read()))
                else:
                    counts["members of other kinds"] = counts.get("members of other kinds", 0) + 1
            end = tf.offset  # where the member list stopped: must be two zero blocks (POSIX end of archive)
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read(2 * tarfile.BLOCKSIZE)
        if len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
            raise DataError(f"{path}: truncated or corrupt tar shard: no end-of-archive blocks at byte {end} "
                            f"(file size {size}); samples after that point would be lost")
    except (tarfile.TarError, OSError) as e:
        after = f" after member {last!r}" if last else ""
        raise DataError(f"{path}: cannot read tar shard{after} ({e}); expected a complete tar file") from None
    for key, s in samples.items():
        where = f"{path}::{key}"
        if "image" not in s:
            counts["samples without an image"] = counts.get("samples without an image", 0) + 1
            continue
        meta = {}
        if "json" in s:
            jwhere, text = s["json"]
            meta = parse_json(jwhere, text, what="a JSON object of captions")
            if "caption" in meta and not isinstance(meta["caption"], (str, type(None))):
                raise DataError(f"{jwhere}: 'caption' must be a string, got {meta['caption']!r:.80}")
        jwhere = s["json"][0] if "json" in s else f"{where}.json"
        captions = _caption_list(jwhere, meta, "captions") or (
            [meta["caption"]] if (meta.get("caption") or "").strip() else [])
        if not captions and "txt" in s and s["txt"][1].strip():
            captions = [s["txt"][1].strip()]
        long_captions = _caption_list(jwhere, meta, "long_captions")
        if not captions and not long_captions:
            raise DataError(f"{where}: no caption (expected {key}.txt or captions/long_captions in {key}.json)")
        m = s["image"]
        yield {"image": f"{path}::{m.name}", "captions": captions, "long_captions": long_captions,
               "_tar": [path, m.offset_data, m.size]}


def index_tar_shards(paths, skipped=None):
    """Every record of the given tar shards (scan_tar_shard), in shard then member order, as a list;
    `skipped` (a dict), when given, counts what the shards held besides samples."""
    return [rec for path in paths for rec in scan_tar_shard(path, skipped)]


def describe_skipped(skipped):
    """'3 samples without an image, 1 members of other kinds' (what a tar scan skipped), or ''."""
    return ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()) if n)


# --- the training index: what a stage-2 rank needs per record, built once, memory-mapped by everyone
# Built once per training set (post_train.py builds it on first use, ranks sharing the work, and
# reuses it until the manifest or a shard changes), as plain .npy files that every rank and DataLoader
# worker memory-maps read-only. 8 ranks and their workers share one copy through the page cache, there
# is no per-record Python object (forked workers copied those as reference counts changed), and a rank
# touches ~40 bytes of it per sample. Files in the index folder:
#   index_meta.json   format, format_version (absent before versions existed: 1), source (files, sizes,
#                     mtimes; image_root), num_records, fields, num_texts, text_hash (equal to the cache's
#                     for the same texts), images_checked (write_index_meta / read_index_meta)
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
INDEX_FORMAT_VERSION = 1  # index_meta.json's format_version: raise it when an old reader would misread
INDEX_META = "index_meta.json"
INDEX_ARRAYS = ("line_offset", "line_size", "line_no", "image_shard", "image_offset", "image_size", "counts",
                "text_row", "text_hashes")


def _probe(path, n=1 << 16):
    """sha256 of a file's first and last n bytes: an edit in place that keeps the size and the mtime
    (a restore, `cp -p`, a clock) still changes it, at the cost of reading 2n bytes per file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(n))
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - n))
        h.update(f.read(n))
    return h.hexdigest()[:16]


def index_source(manifest=None, image_root=None, shards=None):
    """What a training index is built from: each file with its size, mtime and a probe of its content;
    a changed file rebuilds the index (an index of older code, without probes, is rebuilt once)."""
    files = [os.path.abspath(manifest)] if manifest else [os.path.abspath(p) for p in shards]
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"{f}: file not found")
    stats = [os.stat(f) for f in files]
    root = None
    if manifest:
        root = os.path.abspath(image_root) if image_root else os.path.dirname(files[0])
    return {"kind": "manifest" if manifest else "shards", "files": files, "image_root": root,
            "sizes": [st.st_size for st in stats], "mtimes_ns": [st.st_mtime_ns for st in stats],
            "probes": [_probe(f) for f in files]}


_NPY_HEAD = 128  # bytes of each .npy header: written first as a placeholder, then again with the final shape


def _npy_header(dtype, shape):
    """A .npy (format 1.0) header of exactly _NPY_HEAD bytes, padded with spaces as numpy pads its own."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    return b"\x93NUMPY\x01\x00" + (_NPY_HEAD - 10).to_bytes(2, "little") + text.encode().ljust(_NPY_HEAD - 11) + b"\n"


class _IndexArrays:
    """The index arrays of records added one by one, appended to their .npy files (temp names) in blocks of 16k
    records and never held whole: a build takes the same memory for 10k records as for 60M. text_row (the running
    text count) and the per-field text counts follow the records; the texts' 8-byte hashes go to `digests`
    (cache.record_text_payload appends there). close() writes the final headers and renames the files into
    `folder` as <prefix><array>.npy."""

    TYPES = {"line_offset": "q", "line_size": "q", "line_no": "q", "image_shard": "i", "image_offset": "q",
             "image_size": "q", "counts": "i", "text_row": "q", "text_hashes": "<u8"}
    COLUMNS = ("line_offset", "line_size", "line_no", "image_shard", "image_offset", "image_size")  # + 2 counts

    def __init__(self, folder, prefix=""):
        self.folder, self.prefix = folder, prefix
        self.tmp = {k: os.path.join(folder, f"{prefix}{k}.npy.tmp{os.getpid()}") for k in INDEX_ARRAYS}
        self.files = {k: open(path, "wb") for k, path in self.tmp.items()}
        for f in self.files.values():
            f.write(b" " * _NPY_HEAD)
        self.files["text_row"].write(np.zeros(1, np.int64).tobytes())
        self.rows, self.digests, self.n, self.texts, self.field_texts = [], bytearray(), 0, 0, [0, 0]

    def add(self, line_offset, line_size, line_no, shard, image_offset, image_size, n_real, n_long):
        self.rows.append((line_offset, line_size, line_no, shard, image_offset, image_size, n_real, n_long))
        if len(self.rows) >= 16384:
            self.flush()

    def flush(self):
        if self.rows:
            a = np.array(self.rows, dtype=np.int64)  # (m, 8): the columns, then the two caption counts
            for j, k in enumerate(self.COLUMNS):
                self.files[k].write(a[:, j].astype(self.TYPES[k]).tobytes())
            counts = a[:, 6:]
            self.files["counts"].write(counts.astype(np.int32).tobytes())
            self.files["text_row"].write((self.texts + np.cumsum(counts.sum(1))).tobytes())
            self.n, self.texts = self.n + len(a), self.texts + int(counts.sum())
            self.field_texts = [x + int(y) for x, y in zip(self.field_texts, counts.sum(0))]
            self.rows = []
        self.files["text_hashes"].write(self.digests)
        del self.digests[:]

    def shapes(self):
        return {**{k: (self.n,) for k in INDEX_ARRAYS}, "counts": (self.n, 2), "text_row": (self.n + 1,),
                "text_hashes": (self.texts,)}

    def close(self):
        self.flush()
        for k, shape in self.shapes().items():
            f = self.files[k]
            f.seek(0)
            f.write(_npy_header(self.TYPES[k], shape))
            f.close()
            os.replace(self.tmp[k], os.path.join(self.folder, f"{self.prefix}{k}.npy"))

    def discard(self):
        for k, f in self.files.items():
            f.close()
            if os.path.exists(self.tmp[k]):
                os.remove(self.tmp[k])


def _shard_part_name(source, i):
    key = hashlib.sha256(f"{source['files'][i]}\0{source['sizes'][i]}\0{source['mtimes_ns'][i]}\0"
                         f"{source['probes'][i]}".encode()).hexdigest()
    return f"{i:06d}-{key[:16]}"


def _scan_shard_part(source, i, parts_dir):
    """One shard -> parts_dir/<part>.jsonl (its records as manifest lines) + <part>.npz (image byte
    ranges, line sizes). Written under temp names and renamed: a part that exists is complete."""
    name = _shard_part_name(source, i)
    final = os.path.join(parts_dir, name + ".npz")
    if os.path.exists(final):
        return
    path = source["files"][i]
    offs, sizes, lines, skipped = [], [], [], {}
    tmp_jsonl = os.path.join(parts_dir, f"{name}.jsonl.tmp{os.getpid()}")
    with open(tmp_jsonl, "wb") as f:
        for rec in scan_tar_shard(path, skipped):
            train_record(rec["image"], rec)  # the manifest's validation, naming shard::member
            line = (json.dumps({k: rec[k] for k in ("image", "captions", "long_captions")}, ensure_ascii=False)
                    + "\n").encode("utf-8")
            f.write(line)
            offs.append(rec["_tar"][1]), sizes.append(rec["_tar"][2]), lines.append(len(line))
    os.replace(tmp_jsonl, os.path.join(parts_dir, name + ".jsonl"))
    tmp = os.path.join(parts_dir, f"{name}.tmp{os.getpid()}.npz")
    np.savez(tmp, image_offset=np.asarray(offs, np.int64), image_size=np.asarray(sizes, np.int64),
             line_size=np.asarray(lines, np.int64), skipped=np.asarray(json.dumps(skipped)))
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


def write_index_meta(index_dir, meta):
    """index_meta.json, stamped with the format and this code's format_version, through a temp file and a
    rename; the builder writes it last, so its presence (with this source) means the index is complete."""
    path = os.path.join(index_dir, INDEX_META)
    meta = {"format": INDEX_FORMAT, **meta, "format_version": INDEX_FORMAT_VERSION}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def read_index_meta(index_dir):
    """index_meta.json as a dict, or None while there is none (not built yet, or being rebuilt). One of a
    newer format_version than this code reads (none: 1) is a DataError naming it, never rebuilt over."""
    path = os.path.join(index_dir, INDEX_META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(meta, dict):
        check_format_version(path, meta, INDEX_FORMAT_VERSION)
    return meta


def _index_ready(index_dir, source, check_images):
    meta = read_index_meta(index_dir)
    return (meta is not None and meta.get("format") == INDEX_FORMAT and meta.get("source") == source
            and (meta.get("images_checked") or not check_images))


def build_train_index(index_dir, manifest=None, image_root=None, shards=None, check_images=True,
                      rank=0, world_size=1, log=print):
    """Build (or reuse) the training index of a manifest or of tar shards in index_dir; return a TrainIndex.

    Every rank calls it with the same arguments. An index whose source files (path, size, mtime) and
    image_root are unchanged is reused at once. Otherwise the ranks share the scan: a manifest is cut into
    world_size byte ranges at line starts, rank k reading range k (records validated like read_manifest,
    image files checked to exist when check_images); tar shards are scanned rank k taking shards k,
    k + world_size, ... (a part per shard, kept if the build is interrupted). Rank 0 merges the parts.
    Every array is streamed to disk as it grows, so the memory of a build does not grow with the records.
    Coordination is through files, so it needs no process group and no collective timeout covers a long build.
    """
    import time
    if bool(manifest) == bool(shards):
        raise ValueError("build_train_index: give exactly one of manifest and shards")
    source = index_source(manifest, image_root, shards)
    if not _index_ready(index_dir, source, check_images):
        parts_dir = os.path.join(index_dir, "parts")
        os.makedirs(parts_dir, exist_ok=True)
        t0 = time.time()
        if shards:
            for i in range(rank, len(source["files"]), world_size):
                _scan_shard_part(source, i, parts_dir)
            if rank == 0:
                names = [_shard_part_name(source, i) for i in range(len(source["files"]))]
                _wait_for(lambda: all(os.path.exists(os.path.join(parts_dir, n + ".npz")) for n in names),
                          f"the other ranks' tar shard scans in {parts_dir}", log)
                _merge_index(index_dir, source, names, log)
                log(f"training index: scanned {len(names)} tar shards over {world_size} rank(s) in "
                    f"{time.time() - t0:.1f}s -> {index_dir}")
        else:
            names = [_part_name(source, check_images, i, world_size) for i in range(world_size)]
            h = _scan_manifest_part(source, check_images, rank, world_size, parts_dir, names[rank])
            if rank == 0:
                _wait_for(lambda: all(os.path.exists(os.path.join(parts_dir, n + "done.json")) for n in names),
                          f"the other ranks' manifest scans in {parts_dir}", log)
                _merge_manifest_index(index_dir, source, check_images, parts_dir, names, h)
                log(f"training index: read {manifest} over {world_size} rank(s) in {time.time() - t0:.1f}s -> "
                    f"{index_dir}")
        if rank != 0:
            _wait_for(lambda: _index_ready(index_dir, source, check_images), f"rank 0 to build {index_dir}", log)
    return TrainIndex(index_dir)


def _finish_index(index_dir, source, arrays, text_hash, records_file, images_checked, check=None):
    """Put the arrays in place (arrays.close()), run `check` on them, then write index_meta.json last (its
    presence with this source means complete)."""
    arrays.flush()
    if arrays.n == 0:
        arrays.discard()
        raise DataError(f"{', '.join(source['files'][:3])}: no records; expected one image + captions per record")
    meta_path = os.path.join(index_dir, INDEX_META)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    arrays.close()
    if check is not None:
        check()
    write_index_meta(index_dir, {"source": source, "records_file": records_file, "num_records": arrays.n,
                                 "fields": list(CACHE_FIELDS), "field_texts": list(arrays.field_texts),
                                 "num_texts": arrays.texts, "text_hash": text_hash, "images_checked": images_checked})


# --- a manifest's index: world_size parts (byte ranges starting at line starts), one per rank, merged by rank 0

def _part_name(source, check_images, i, k):
    key = hashlib.sha256(json.dumps([source, check_images, k]).encode()).hexdigest()[:16]
    return f"manifest-{key}-{i:05d}of{k:05d}-"


def _part_range(path, i, k):
    """Bytes [start, stop) of part i of k: cut at line starts (a line belongs to the part it starts in)."""
    size = os.path.getsize(path)

    def line_start(x):
        if x <= 0 or x >= size:
            return min(max(x, 0), size)
        with open(path, "rb") as f:
            f.seek(x - 1)
            f.readline()
            return f.tell()
    return line_start(size * i // k), line_start(size * (i + 1) // k)


def _count_before(path, stop, block=1 << 20):
    """(lines, records) in the manifest's bytes [0, stop), stop a line start: where a part starts, in line
    numbers and records. A record is a non-blank line as scan_lines has it (whitespace only, once decoded)."""
    lines = records = 0
    with open(path, "rb") as f:
        carry, left = b"", stop
        while left > 0:
            chunk = f.read(min(block, left))
            left -= len(chunk)
            *full, carry = (carry + chunk).split(b"\n")
            lines += len(full)
            for ln in full:
                s = ln.strip()
                if s and (s[:1] == b"{" or ln.replace(b"\xef\xbb\xbf", b"").decode("utf-8", "replace").strip()):
                    records += 1
    return lines, records


def _captions_ok(v):
    """True if v is what train_record accepts for a caption field: a list of non-blank strings."""
    return type(v) is list and all(type(c) is str and c.strip() for c in v)


def _scan_manifest_part(source, check_images, i, k, parts_dir, name):
    """Part i of k of the manifest -> parts_dir/<name>*: its index arrays (line numbers and byte offsets are the
    file's own), the 8-byte hashes of its images' normalised paths (`keys`), and the bytes its texts add to the
    text hash: the only part (k = 1) feeds them to the sha256 it returns; parts of k > 1 write them (`texts`) for
    rank 0 to hash in order, and a part whose `done.json` (written last) exists is complete and kept."""
    if k > 1 and os.path.exists(os.path.join(parts_dir, name + "done.json")):
        return None
    path, root = source["files"][0], source["image_root"]
    start, stop = _part_range(path, i, k)
    lines, r0 = _count_before(path, start) if i else (0, 0)
    arrays, h = _IndexArrays(parts_dir, name), hashlib.sha256() if k == 1 else None
    tmp = {x: os.path.join(parts_dir, f"{name}{x}.tmp{os.getpid()}") for x in ("keys", "texts")}
    keys, texts = open(tmp["keys"], "wb"), open(tmp["texts"], "wb")
    r, kbuf, isfile, join = r0, bytearray(), os.path.isfile, os.path.join
    part = {"start": start, "stop": stop, "lineno": lines + 1} if k > 1 else {}  # one part: the whole-file checks
    try:
        for lineno, off, size, obj in scan_jsonl(path, **part):
            image, caps, longs = obj.get("image"), obj.get("captions", []), obj.get("long_captions", [])
            if not (type(image) is str and image.strip() and _captions_ok(caps) and _captions_ok(longs)
                    and (caps or longs)):  # the common case checked fast; anything else gets train_record's message
                image, caps, longs = train_record(f"{path}:{lineno}", obj)
            kbuf += hashlib.blake2b(os.path.normpath(image).encode("utf-8"), digest_size=8).digest()
            if check_images and not isfile(join(root, image)):
                raise DataError(f"{path}:{lineno}: image file not found: {join(root, image)} (image root {root})")
            payload = (record_text_payload(r, "captions", caps, arrays.digests)
                       + record_text_payload(r, "long_captions", longs, arrays.digests))
            if h is None:
                texts.write(payload)
            else:
                h.update(payload)
            arrays.add(off, size, lineno, -1, 0, 0, len(caps), len(longs))
            r += 1
            if len(kbuf) >= 1 << 19:
                keys.write(kbuf)
                del kbuf[:]
        keys.write(kbuf)
        keys.close(), texts.close()
        arrays.close()
    except BaseException:
        keys.close(), texts.close()
        arrays.discard()
        for t in tmp.values():
            os.remove(t)
        raise
    for x, t in tmp.items():
        os.replace(t, os.path.join(parts_dir, name + x))
    done = {"r0": r0, "records": arrays.n, "texts": arrays.texts, "field_texts": arrays.field_texts}
    with open(os.path.join(parts_dir, f"{name}done.json.tmp{os.getpid()}"), "w") as f:
        json.dump(done, f)
    os.replace(f.name, os.path.join(parts_dir, name + "done.json"))
    return h


def _read_chunks(path, dtype, chunk=1 << 16, skip=_NPY_HEAD):
    """The data of a .npy file written by _IndexArrays (skip=0: of a raw file), in chunks of `chunk` items, by
    plain reads (no mapping: the pages are not counted in this process's memory)."""
    with open(path, "rb") as f:
        f.seek(skip)
        while True:
            a = np.fromfile(f, dtype=dtype, count=chunk)
            if not len(a):
                return
            yield a


def _merge_manifest_index(index_dir, source, check_images, parts_dir, names, h):
    """Rank 0: the parts' arrays end to end into the index's (text_row offset by the texts before each part), the
    parts' texts into the text hash in order (h: k = 1's, already hashed), then one record per image."""
    import shutil
    done = []
    for name in names:
        with open(os.path.join(parts_dir, name + "done.json")) as f:
            done.append(json.load(f))
    out = _IndexArrays(index_dir)
    try:
        out.n = sum(d["records"] for d in done)
        out.texts = sum(d["texts"] for d in done)
        out.field_texts = [sum(d["field_texts"][j] for d in done) for j in range(2)]
        for k in INDEX_ARRAYS:  # (text_row's first 0 is written)
            dt, offset = np.dtype(_IndexArrays.TYPES[k]), 0
            for name, d in zip(names, done):
                first = True
                for a in _read_chunks(os.path.join(parts_dir, f"{name}{k}.npy"), dt):
                    if k == "text_row":  # each part's starts at 0: drop it, add the texts before the part
                        a = a[1:] + offset if first else a + offset
                    out.files[k].write(a.tobytes())
                    first = False
                offset += d["texts"]
        if h is None:  # k > 1: the parts' texts, in order
            h = hashlib.sha256()
            for name in names:
                with open(os.path.join(parts_dir, name + "texts"), "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
        _finish_index(index_dir, source, out, h.hexdigest(), source["files"][0], check_images,
                      check=lambda: _check_unique_images(index_dir, source["files"][0], parts_dir, names, done))
    except BaseException:
        out.discard()
        raise
    shutil.rmtree(parts_dir, ignore_errors=True)


def _check_unique_images(index_dir, path, parts_dir, names, done):
    """One record per image over the whole manifest (UniqueKeys' rule and message), in bounded memory: the hashes
    of the normalised image paths go to up to 256 bucket files by hash, each bucket is sorted on its own, and
    every repeated hash is confirmed by re-reading both lines (a collision is no repeat); the repeat reported
    is the one whose later line comes first."""
    n = sum(d["records"] for d in done)
    nb = max(1, min(256, -(-n // 65536)))
    rec = np.dtype([("h", "<u8"), ("r", "<i8")])
    buckets = [open(os.path.join(parts_dir, f"bucket{b:03d}"), "wb") for b in range(nb)]
    for name, d in zip(names, done):
        r = d["r0"]
        for hs in _read_chunks(os.path.join(parts_dir, name + "keys"), np.dtype("<u8"), skip=0):
            pairs = np.empty(len(hs), rec)
            pairs["h"], pairs["r"] = hs, np.arange(r, r + len(hs))
            r += len(hs)
            which = (hs % np.uint64(nb)).astype(np.int64)
            order = np.argsort(which, kind="stable")
            cuts = np.searchsorted(which[order], np.arange(nb + 1))
            for b in range(nb):
                buckets[b].write(pairs[order[cuts[b]:cuts[b + 1]]].tobytes())
    candidates = []
    for b, f in enumerate(buckets):
        f.close()
        a = np.fromfile(f.name, rec)
        a = a[np.lexsort((a["r"], a["h"]))]  # by hash, equal hashes in file order
        same = np.flatnonzero(a["h"][1:] == a["h"][:-1])
        candidates += [(int(a["r"][j + 1]), int(a["r"][j])) for j in same]
    if not candidates:
        return
    arrays = {k: np.load(os.path.join(index_dir, k + ".npy"), mmap_mode="r") for k in ("line_offset", "line_size", "line_no")}

    def key_of(r):
        with open(path, "rb") as f:
            f.seek(int(arrays["line_offset"][r]))
            return os.path.normpath(json.loads(f.read(int(arrays["line_size"][r])))["image"])
    u = unique_images(path)
    for later, earlier in sorted(candidates):
        key = key_of(later)
        if key == key_of(earlier):
            raise DataError(f"{path}:{int(arrays['line_no'][later])}: {u.what} {key!r} again (first on line "
                            f"{int(arrays['line_no'][earlier])}); expected one record per {u.what}{u.hint}")


def _merge_index(index_dir, source, names, log):
    """Rank 0: concatenate the shards' parts into records.jsonl and the arrays, hashing the texts."""
    parts_dir = os.path.join(index_dir, "parts")
    records_file = os.path.join(index_dir, "records.jsonl")
    arrays, h = _IndexArrays(index_dir), hashlib.sha256()
    offset, r, skipped = 0, 0, {}
    tmp = f"{records_file}.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        for i, name in enumerate(names):
            with np.load(os.path.join(parts_dir, name + ".npz")) as z:
                img_off, img_size = z["image_offset"].tolist(), z["image_size"].tolist()
                for k, n in (json.loads(str(z["skipped"])) if "skipped" in z.files else {}).items():
                    skipped[k] = skipped.get(k, 0) + n
            with open(os.path.join(parts_dir, name + ".jsonl"), "rb") as f:
                for j, line in enumerate(f):
                    obj = json.loads(line)
                    h.update(record_text_payload(r, "captions", obj["captions"], arrays.digests)
                             + record_text_payload(r, "long_captions", obj["long_captions"], arrays.digests))
                    arrays.add(offset, len(line), r + 1, i, img_off[j], img_size[j],
                               len(obj["captions"]), len(obj["long_captions"]))
                    out.write(line)
                    offset += len(line)
                    r += 1
    os.replace(tmp, records_file)
    if skipped:
        log(f"training index: the tar shards also held (skipped, not samples): {describe_skipped(skipped)}")
    _finish_index(index_dir, source, arrays, h.hexdigest(), records_file, True)
    import shutil
    shutil.rmtree(parts_dir, ignore_errors=True)


class TrainIndex:
    """Read a training index (build_train_index): len(index) records; index[r] -> the record as a dict
    like read_manifest's ({"image", "captions", "long_captions"}, plus "_tar" for shards), re-read from
    its line on demand; index.text_row(r) -> its first cache row. Arrays are memory-mapped lazily, once
    per process, and files opened per process, so DataLoader workers (fork or spawn) share the pages."""

    def __init__(self, index_dir):
        self.dir = index_dir
        meta = read_index_meta(index_dir)
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

    def __init__(self, records, transform, cache=None, seed=0, real_caption_ratio=0.5, skip_bad_images=False,
                 jpeg_draft=False):
        self.records, self.transform, self.cache = records, transform, cache
        self.seed, self.ratio, self.skip_bad = seed, real_caption_ratio, skip_bad_images
        # an option (other pixels): decode JPEGs at a DCT scale still >= the smallest crop (scale 0.9, ratio 3/4)
        self.draft = -(-max(transform.size) * 4 // 3) if jpeg_draft else 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item, out=None):
        epoch, index = item
        bad = []
        n = len(self.records)
        for k in range(n):
            i = (index + k) % n
            rec = self.records[i]
            try:  # open_image turns every way an image can fail into a DataError, so skipping covers all
                img = open_image(rec, self.records.where(i) if hasattr(self.records, "where") else None, self.draft)
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
        image = self.transform(img, rng) if out is None else self.transform(img, rng, out)
        return {"image": image, "embedding": emb, "text": rec[field][slot], "index": i, "bad": bad}

    def __getitems__(self, items):
        """A whole batch (the DataLoader passes the batch sampler's list here): each image is written straight
        into its slot of one (B, 3, H, W) tensor, allocated in shared memory inside a DataLoader worker (as
        torch's default_collate does), so neither collating nor sending the batch to the main process copies
        pixels. The same values as collate_train([self[item] for item in items])."""
        import torch
        if not isinstance(self.transform, TrainTransform):  # another transform: per sample, then stacked
            return collate_train([self[item] for item in items])
        shape = (len(items), 3, *self.transform.size)
        if torch.utils.data.get_worker_info() is None:
            images = torch.empty(shape)
        else:
            images = torch.empty(0).set_(torch.UntypedStorage._new_shared(4 * int(np.prod(shape))), 0, shape)
        return collate_train([self.__getitem__(item, images[k]) for k, item in enumerate(items)], images)


def worker_init(worker_id):
    """DataLoader worker_init_fn: one intra-op thread per worker (common.intra_op_threads gives each a core)."""
    import torch
    torch.set_num_threads(1)


def collate_train(samples, images=None):
    """Stack a list of TrainSamples items into one batch dict (embedding None when not cached); `images`: their
    images already stacked (TrainSamples.__getitems__). A batch dict passes through unchanged."""
    import torch
    if isinstance(samples, dict):
        return samples
    embs = [s["embedding"] for s in samples]
    return {"image": torch.stack([s["image"] for s in samples]) if images is None else images,
            "embedding": None if embs[0] is None else torch.from_numpy(np.stack(embs).astype(np.float32)),
            "text": [s["text"] for s in samples], "index": torch.tensor([s["index"] for s in samples]),
            "bad": [b for s in samples for b in s["bad"]]}


class EpochBatchSampler(ResumableBatchSampler):
    """ResumableBatchSampler whose items are (epoch, index), so a sample knows its epoch's seed."""

    def __iter__(self):
        for step, indices in enumerate(super().__iter__(), self.start_step):
            epoch = self.epoch_of(step)
            yield [(epoch, i) for i in indices]


# --- what identifies the training data in a checkpoint (a resume on other data is refused)

def data_identity(records, cache=None, shards=()):
    """What identifies stage-2 training data, kept in checkpoints so a resume on other data is refused:
    the record count, the cache's text hash, size and encoder, and the shards' names and sizes. Cheap (nothing
    is re-read) and free of paths, so moved files with the same content still resume."""
    ident = {"num_records": len(records)}
    if cache is not None:  # the captions and the encoder that embedded them (the same captions by another
        # encoder are other training data)
        enc = cache.meta.get("encoder", {})
        ident.update(text_hash=cache.meta["text_hash"], count=cache.count, fields=list(cache.fields),
                     encoder={k: enc.get(k) for k in ("fingerprint", "base_model", "pooling", "instruction",
                                                      "max_length", "bidirectional", "chat_template", "dim")})
        if enc.get("official_extraction"):  # only when on: identities from before the switch stay equal
            ident["encoder"]["official_extraction"] = True
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


# --- post_train.py's training data from its config: the index (built once, then reused), the cache
# checked against it, and the resumable loader

def train_index_dir(cfg):
    """Where the training index lives: train_index if set; else beside the cache, one folder per source
    (every run on that cache reuses it); else in out_dir."""
    if cfg["train_index"]:
        return cfg["train_index"]
    if not cfg["cache_dir"]:
        return os.path.join(cfg["out_dir"], "train_index")
    if cfg["train_manifest"]:
        src = [os.path.abspath(cfg["train_manifest"]), os.path.abspath(cfg["image_root"]) if cfg["image_root"] else ""]
    else:
        src = [os.path.abspath(p) for p in expand_shards(cfg["train_shards"])]
    return os.path.join(cfg["cache_dir"], "train_index-" + hashlib.sha256("\0".join(src).encode()).hexdigest()[:12])


def train_data(cfg, rank, world_size, log, uses_llm=True):
    """-> (TrainIndex, EmbeddingCache or None). Builds the index on first use (ranks share the
    work; the manifest's image files are checked then, unless bad ones are to be skipped at load time),
    then refuses a cache of other captions (naming the first differing record) or of another encoder."""
    shards = expand_shards(cfg["train_shards"]) if cfg["train_shards"] else None
    index = build_train_index(train_index_dir(cfg), manifest=cfg["train_manifest"] or None,
                              image_root=cfg["image_root"] or None, shards=shards,
                              check_images=not cfg["skip_bad_images"], rank=rank, world_size=world_size, log=log)
    cache = None
    if cfg["cache_dir"]:
        cache = EmbeddingCache(cfg["cache_dir"], manifest=index, fields=index.used_fields(),
                               expect={"model": cfg["text_model"]} if cfg["text_model"] else None)
    elif cfg["text_source"] == "cache" and uses_llm:
        raise ValueError(f"text_source='cache' needs cache_dir: run embed_captions.py --manifest={index.records_file}")
    return index, cache


def batches(loader):
    """Iterate a DataLoader; a worker's input error (torch re-raises it with the worker's traceback as its
    message) comes out as the same error class with the original one-line message."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (ValueError, OSError) as e:
            text = str(e).strip()
            if "Original Traceback" not in text:
                raise
            raise type(e)(text.splitlines()[-1].split(": ", 1)[-1]) from None
        yield batch


def train_loader(cfg, index, cache, data_config, rank, world_size, step, pin_memory=False):
    """The DataLoader of this rank's batches from global step `step` on (the sampler's order is a function
    of the step only: an exact resume)."""
    import torch
    train_set = TrainSamples(index, TrainTransform(data_config, tuple(cfg["crop_scale"])),
                             cache if cfg["text_source"] == "cache" else None, cfg["seed"],
                             cfg["real_caption_ratio"], cfg["skip_bad_images"], cfg.get("jpeg_draft", False))
    sampler = EpochBatchSampler(len(index), cfg["batch_size"], rank, world_size, cfg["seed"], True,
                                start_step=step, max_steps=max(0, cfg["max_steps"] - step))
    # its own generator: building the iterator must not draw from the global stream a resume restored
    return torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg["num_workers"],
                                       collate_fn=collate_train, pin_memory=pin_memory, worker_init_fn=worker_init,
                                       generator=torch.Generator().manual_seed(cfg["seed"] + rank))
