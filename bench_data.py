"""Scale benchmark of the stage-2 data path: per-rank memory and startup at 10k..1M records.

    python bench_data.py                                      # N = 10k and 100k: a few minutes on 2 cores
    python bench_data.py --sizes=10000,100000,1000000         # + 1M, by hand: ~5 GB of synthetic data

Synthetic training sets of the paper's shape (per record one ~60-char real caption and two 700-1000-char
dense captions), as a manifest (JSONL + image files) and as WebDataset tar shards, each with an embedding
cache whose text hash matches (rows are zeros: only the reader's work is measured, not a model). Each
measurement runs in fresh processes:
- index: the one-time data_index.build_train_index, index_ranks ranks (processes) scanning in parallel (a
  manifest in byte ranges, tar shards by shard), rank 0 merging; per rank: the busiest rank's CPU seconds per
  1M records of its share (index_ranks=1: one rank alone);
- startup: process start -> data_index.train_data + train_loader -> first batch ready, with the index
  already built: 1 rank (0 workers), and 2 ranks x 2 workers (peak RSS per rank, PSS of all 6 processes);
- embed setup: what embed_captions.py does before loading a model (cache.cache_texts(lazy=True), then
  reading every text back in 64k-text pieces, as the length pass does; tokenising is left out).
Memory is each process's peak resident set above its own baseline after imports (VmHWM, reset after
the imports), so torch's ~0.3 GB is not counted; PSS counts shared pages (the index, the page cache of
memory-mapped files) once across processes. The fit over N gives bytes and seconds per record.
"""
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np

import common
from cache import (CACHE_EMBEDDINGS, CACHE_FIELDS, CACHE_FORMAT, CACHE_INDEX, CACHE_META, cache_texts,
                   read_cache_meta, write_cache_meta)
import data_index
from metrics import check_results_path

# -----------------------------------------------------------------------------
# default config (override with --key=value)
sizes = "10000,100000"  # record counts N (1M is ~5 GB of synthetic data and ~15 min: run it by hand)
kinds = "manifest,shards"  # which training-set layouts to measure
work_dir = "/tmp/llm2clip_bench_data"  # synthetic data, caches and indexes; generated once per N and kept
shard_size = 10000  # records per tar shard (img2dataset's default)
dim = 32  # cache width: the reader's cost does not depend on it (4096 only makes embeddings.npy larger)
batch_size = 64  # global batch of the first step
num_workers = 2  # DataLoader workers per rank in the 2-rank measurement
rebuild_index = True  # time the one-time index build (False: reuse an existing one)
index_ranks = 2  # ranks building the index together (separate processes, as under torchrun)
out = ""  # write the results as JSON here ("" = don't)
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and k.islower() and isinstance(v, (int, float, bool, str))]  # not CACHE_*


def _counts(v):
    return [int(x) for x in v.split(",") if x.strip()]


# declared once, checked before any data is generated (common.check_config)
RULES = {"sizes": (lambda v: _counts(v) and min(_counts(v)) > 0, "comma-separated record counts > 0, e.g. 10000,100000"),
         "kinds": (lambda v: v.strip() and {k.strip() for k in v.split(",") if k.strip()} <= {"manifest", "shards"},
                   "'manifest', 'shards' or both, comma-separated"),
         "shard_size": common.positive_int, "dim": common.positive_int, "batch_size": common.positive_int,
         "index_ranks": common.positive_int,
         "num_workers": common.non_negative_int}
PATHS = {"work_dir": "out"}
# -----------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("a the of on in with and near small large red green blue white black wooden metal old young man woman "
         "dog cat street table chair window building tree sky water light shadow left right behind front "
         "standing sitting holding looking wearing under over beside against background foreground").split()


def _pool(seed=0, n_chars=1 << 20):
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=n_chars // 5)
    return " ".join(words)[:n_chars]


def _record_texts(pool, rng, i):
    """One ~60-char real caption and two 700-1000-char dense captions, each unique (record number inside)."""
    def piece(lo, hi):
        n = int(rng.integers(lo, hi))
        o = int(rng.integers(0, len(pool) - n))
        return pool[o:o + n].strip() or "x"
    return [f"{i} {piece(50, 70)}"], [f"{i} {piece(700, 1000)}", f"{i} {piece(700, 1000)}"]


def _png(k):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (k * 37 % 256, k * 91 % 256, k * 53 % 256)).save(buf, format="PNG")
    return buf.getvalue()


def make_manifest(d, n, images=256):
    """d/train.jsonl with n records over `images` distinct 32x32 PNG files: record i's image is
    img_<i // images>/<i % images>.png, each img_<j> a symlink to img/ (a manifest names each image once)."""
    path = os.path.join(d, "train.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.join(d, "img"), exist_ok=True)
    for k in range(images):
        with open(os.path.join(d, "img", f"{k}.png"), "wb") as f:
            f.write(_png(k))
    for j in range(-(-n // images)):
        if not os.path.lexists(os.path.join(d, f"img_{j}")):
            os.symlink("img", os.path.join(d, f"img_{j}"))
    pool, rng = _pool(), np.random.default_rng(n)
    with open(path + ".tmp", "w") as f:
        for i in range(n):
            caps, longs = _record_texts(pool, rng, i)
            f.write(json.dumps({"image": f"img_{i // images}/{i % images}.png", "captions": caps, "long_captions": longs}) + "\n")
    os.replace(path + ".tmp", path)
    return path


def make_shards(d, n, per_shard):
    """d/shards/NNNNN.tar: img2dataset layout, key.png + key.json ({"captions", "long_captions"})."""
    sd = os.path.join(d, "shards")
    count = -(-n // per_shard)
    spec = os.path.join(sd, "{%05d..%05d}.tar" % (0, count - 1))
    if os.path.exists(os.path.join(sd, "done")):
        return spec
    os.makedirs(sd, exist_ok=True)
    pool, rng, pngs = _pool(), np.random.default_rng(n + 1), [_png(k) for k in range(256)]
    for s in range(count):
        with tarfile.open(os.path.join(sd, f"{s:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                caps, longs = _record_texts(pool, rng, i)
                for name, payload in ((f"{i:09d}.png", pngs[i % 256]),
                                      (f"{i:09d}.json", json.dumps({"captions": caps, "long_captions": longs}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    open(os.path.join(sd, "done"), "w").close()
    return spec


def fake_cache(cache_dir, index, width):
    """A complete cache for the index's texts: meta + index.npz as embed_captions.py writes them, and a
    sparse zero embeddings.npy (the reader does not look at the values)."""
    if os.path.exists(os.path.join(cache_dir, CACHE_META)) and \
            read_cache_meta(cache_dir)["text_hash"] == index.text_hash:
        return
    os.makedirs(cache_dir, exist_ok=True)
    count = index.meta["num_texts"]
    np.lib.format.open_memmap(os.path.join(cache_dir, CACHE_EMBEDDINGS), mode="w+", dtype=np.float16,
                              shape=(count, width)).flush()
    np.savez(os.path.join(cache_dir, CACHE_INDEX), record_offsets=index.array("text_row"),
             counts=index.array("counts"), text_hashes=index.array("text_hashes"))
    meta = {"format": CACHE_FORMAT, "encoder": {"model": "synthetic"}, "dim": width, "dtype": "float16",
            "count": count, "num_records": len(index), "fields": list(CACHE_FIELDS),
            "text_hash": index.text_hash, "complete": True}
    write_cache_meta(cache_dir, meta)


# -----------------------------------------------------------------------------
# measurements, each in a fresh process (children print one JSON line)

def _status_kib(key, pid="self"):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def _pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def child(task, args):
    """Run one measurement in this (fresh) process; print a JSON line."""
    import torch
    import torchvision.transforms.functional  # noqa: F401  (imported by the first batch: not per-record memory)
    from PIL import Image, PngImagePlugin  # noqa: F401
    import post_train
    torch.set_num_threads(1)
    t_imports = time.time() - args["t0"]
    base = _reset_peak()
    cpu0 = time.process_time()
    res = {"task": task, "rank": args.get("rank", 0), "imports_s": t_imports, "baseline_mib": base / 1024}
    quiet = lambda *a: None  # noqa: E731
    if task == "index":
        t = time.time()
        kw = {"manifest": args["manifest"]} if args.get("manifest") else {"shards": data_index.expand_shards(args["shards"])}
        data_index.build_train_index(args["index_dir"], rank=args["rank"], world_size=args["world"], log=quiet, **kw)
        res["seconds"] = time.time() - t
    elif task == "embed_setup":
        t = time.time()
        texts = cache_texts(args["manifest"], CACHE_FIELDS, lazy=True)
        n, chars = len(texts.texts), 0
        for a in range(0, n, 65536):  # the length pass reads every text once, in pieces
            chars += sum(len(x) for x in texts.texts[a:min(a + 65536, n)])
        res.update(seconds=time.time() - t, texts=n, chars=chars)
    elif task == "startup":
        cfg = {k: getattr(post_train, k) for k in post_train.config_keys}
        cfg.update(train_manifest=args.get("manifest") or "", train_shards=args.get("shards") or "",
                   cache_dir=args["cache_dir"], train_index=args["index_dir"], batch_size=args["batch_size"],
                   num_workers=args["workers"], max_steps=10, out_dir=args["index_dir"] + "_run")
        index, cache = data_index.train_data(cfg, args["rank"], args["world"], quiet)
        dc = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        loader = data_index.train_loader(cfg, index, cache, dc, args["rank"], args["world"], 0)
        batches = iter(loader)
        batch = next(batches)
        res["seconds"] = time.time() - args["t0"]  # from before this process was started
        assert batch["embedding"].shape == (args["batch_size"] // args["world"], cache.dim)
        workers = _children(os.getpid())
        res["workers_pss_mib"] = sum(_pss_kib(p) for p in workers) / 1024
        res["pss_mib"] = _pss_kib(os.getpid()) / 1024
        time.sleep(args.get("hold", 0))  # let the other rank read its PSS while this one is alive
        del batches
    res["peak_growth_mib"] = (_status_kib("VmHWM") - base) / 1024
    res["cpu_s"] = time.process_time() - cpu0  # this process's CPU time after imports: load-independent
    print("RESULT " + json.dumps(res), flush=True)


def run_children(task, arg_list):
    """Start one process per args dict at once; return their results (raise with stderr on failure)."""
    t0 = time.time()
    procs = []
    for a in arg_list:
        code = "import sys, json, bench_data; bench_data.child(sys.argv[1], json.loads(sys.argv[2]))"
        procs.append(subprocess.Popen([sys.executable, "-c", code, task, json.dumps({**a, "t0": t0})], cwd=HERE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}))
    out = []
    for p in procs:
        so, se = p.communicate()
        if p.returncode:
            raise RuntimeError(f"bench_data child {task} failed:\n{se[-3000:]}")
        out.append(json.loads(so.split("RESULT ")[-1]))
    return out


def fit(xs, ys):
    """Least-squares (slope, intercept)."""
    if len(xs) < 2:
        return float("nan"), float("nan")
    s, c = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(s), float(c)


def measure(cfg, kind, n, log):
    d = os.path.join(cfg["work_dir"], f"n{n}")
    os.makedirs(d, exist_ok=True)
    t = time.time()
    src = {"manifest": make_manifest(d, n)} if kind == "manifest" else {"shards": make_shards(d, n, cfg["shard_size"])}
    log(f"  {kind} N={n}: data ready ({time.time() - t:.0f}s)")
    index_dir, cache_dir = os.path.join(d, f"index_{kind}"), os.path.join(d, f"cache_{kind}")
    row = {"kind": kind, "n": n}
    if cfg["rebuild_index"] or not os.path.exists(os.path.join(index_dir, data_index.INDEX_META)):
        if os.path.exists(os.path.join(index_dir, data_index.INDEX_META)):
            os.remove(os.path.join(index_dir, data_index.INDEX_META))
        world = row["index_ranks"] = cfg["index_ranks"]
        r = run_children("index", [{**src, "index_dir": index_dir, "rank": k, "world": world} for k in range(world)])
        row["index_s"] = max(x["seconds"] for x in r)
        row["index_cpu_s"] = sum(x["cpu_s"] for x in r)
        row["index_rank_cpu_s"] = max(x["cpu_s"] for x in r)  # the busiest rank (rank 0: its share + the merge)
        row["index_peak_mib"] = max(x["peak_growth_mib"] for x in r)
        log(f"  {kind} N={n}: one-time index {row['index_s']:.1f}s over {world} rank(s) ({row['index_cpu_s']:.1f} CPU s; "
            f"busiest rank {row['index_rank_cpu_s']:.1f} CPU s = {1e6 * world * row['index_rank_cpu_s'] / n:.1f} s per 1M "
            f"records per rank), builder peak +{row['index_peak_mib']:.0f} MiB")
    index = data_index.TrainIndex(index_dir)
    row["index_bytes"] = sum(os.path.getsize(os.path.join(index_dir, k + ".npy")) for k in data_index.INDEX_ARRAYS)
    fake_cache(cache_dir, index, cfg["dim"])
    common_args = {**src, "index_dir": index_dir, "cache_dir": cache_dir, "batch_size": cfg["batch_size"]}
    (one,) = run_children("startup", [{**common_args, "rank": 0, "world": 1, "workers": 0}])
    row.update(startup_1_s=one["seconds"], imports_s=one["imports_s"], rank_peak_1_mib=one["peak_growth_mib"],
               startup_1_cpu_s=one["cpu_s"])
    two = run_children("startup", [{**common_args, "rank": k, "world": 2, "workers": cfg["num_workers"], "hold": 2}
                                   for k in range(2)])
    row.update(startup_2_s=max(x["seconds"] for x in two), rank_peak_2_mib=max(x["peak_growth_mib"] for x in two),
               pss_sum_2x2_mib=sum(x["pss_mib"] + x["workers_pss_mib"] for x in two))
    log(f"  {kind} N={n}: startup 1 rank {row['startup_1_s']:.2f}s (imports {row['imports_s']:.2f}s), "
        f"{row['startup_1_cpu_s']:.2f} CPU s after imports, +{row['rank_peak_1_mib']:.1f} MiB; 2 ranks x {cfg['num_workers']} workers {row['startup_2_s']:.2f}s, "
        f"rank peak +{row['rank_peak_2_mib']:.1f} MiB, PSS sum {row['pss_sum_2x2_mib']:.0f} MiB")
    if kind == "manifest":
        (e,) = run_children("embed_setup", [{**src}])
        row.update(embed_setup_s=e["seconds"], embed_cpu_s=e["cpu_s"], embed_peak_mib=e["peak_growth_mib"])
        log(f"  {kind} N={n}: embed_captions setup {e['seconds']:.1f}s ({e['cpu_s']:.1f} CPU s), +{e['peak_growth_mib']:.1f} MiB")
    return row


def report(rows, log):
    """Fitted bytes and seconds per record per kind, and the extrapolation to 15M and 60M per node."""
    fits = {}
    for kind in sorted({r["kind"] for r in rows}):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        f = {k: fit(ns, [r[k] for r in rs if k in r]) if all(k in r for r in rs) else (float("nan"),) * 2
             for k in ("rank_peak_1_mib", "rank_peak_2_mib", "pss_sum_2x2_mib", "startup_1_s", "startup_2_s",
                       "index_s", "index_cpu_s", "index_rank_cpu_s", "startup_1_cpu_s", "index_peak_mib", "embed_setup_s", "embed_cpu_s", "embed_peak_mib", "index_bytes")}
        fits[kind] = f
        mib = 2 ** 20
        log(f"\n{kind}: per record (fitted over N = {', '.join(map(str, ns))})")
        log(f"  rank peak RSS growth: 1 rank {f['rank_peak_1_mib'][0] * mib:.1f} B, 2-rank run {f['rank_peak_2_mib'][0] * mib:.1f} B"
            f"  (floor <= 64 B)")
        log(f"  PSS sum, 2 ranks x 2 workers: {f['pss_sum_2x2_mib'][0] * mib:.1f} B")
        log(f"  startup: {f['startup_1_s'][0] * 1e6:.3f} us/record + {f['startup_1_s'][1]:.2f} s (1 rank; CPU after "
            f"imports {f['startup_1_cpu_s'][0] * 1e6:.3f} us/record + {f['startup_1_cpu_s'][1]:.2f} s)")
        ranks = rs[0].get("index_ranks", 1)
        log(f"  one-time index ({ranks} ranks): {f['index_s'][0] * 1e6:.1f} us/record wall, "
            f"{f['index_cpu_s'][0] * 1e6:.1f} CPU us/record; per rank {f['index_rank_cpu_s'][0] * 1e6 * ranks:.1f} "
            f"CPU s per 1M records of its share; builder {f['index_peak_mib'][0] * mib:.0f} B; "
            f"index files {f['index_bytes'][0]:.0f} B")
        if kind == "manifest":
            log(f"  embed_captions setup: {f['embed_setup_s'][0] * 1e6:.1f} us/record wall, {f['embed_cpu_s'][0] * 1e6:.1f} CPU, "
                f"{f['embed_peak_mib'][0] * mib:.0f} B")
        for big in (15_000_000, 60_000_000):
            rank_gb = 8 * f["rank_peak_2_mib"][0] * mib * big / 2 ** 30  # 8 ranks' own growth
            shared_gb = f["index_bytes"][0] * big / 2 ** 30  # page cache, shared by all 72 processes
            after_imports = f["startup_1_cpu_s"][1] + f["startup_1_cpu_s"][0] * big  # wall here is mostly load
            log(f"  {big // 1_000_000}M records per node (8 ranks x 8 workers): ranks' own growth {rank_gb:.2f} GB + "
                f"index files {shared_gb:.1f} GB (page cache, shared); data startup after imports ~{after_imports:.1f} CPU s; "
                f"one-time index ~{f['index_cpu_s'][0] * big / 60:.0f} CPU min (split over the ranks for shards)")
    return fits


def main(argv=None):
    cfg = common.configure({k: globals()[k] for k in config_keys}, argv, __doc__)
    common.check_config(cfg, RULES, paths=PATHS)
    if cfg["out"]:
        check_results_path(cfg["out"])
    load = os.getloadavg()
    print(f"bench_data: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    rows = []
    for n in _counts(cfg["sizes"]):
        for kind in [k.strip() for k in cfg["kinds"].split(",") if k.strip()]:
            rows.append(measure(cfg, kind, n, lambda *m: print(*m, flush=True)))
    fits = report(rows, lambda *m: print(*m, flush=True))
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    res = {"rows": rows, "fits": fits, "config": cfg}
    if cfg["out"]:
        common.atomic_write_text(cfg["out"], json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    common.run_main(main)
