"""Embed every caption of a manifest once, offline, with the frozen stage-1 encoder (the embedding cache).

This is the paper's efficiency trick (Table 11): stage 2 reads float16 rows from disk and never loads
the LLM. Single process or `torchrun --nproc_per_node=N embed_captions.py ...`:

    python embed_captions.py --text_model=out/cc --manifest=train.jsonl --out_dir=out/cache

- Fast: all texts are tokenised once for their lengths, sorted longest first, and cut into batches
  of at most `batch_tokens` padded tokens, so padding is small and every batch fills the memory budget
  (16384 on a GPU, 2048 on a CPU); `packed=True`: no padding at all (flash-attention's varlen kernel).
- Sharded and resumable: the length-sorted order is cut into chunks of `chunk_rows` rows (independent
  of the number of ranks); ranks take the unfinished chunks round-robin, write their rows in place
  into the shared embeddings.npy, and append each finished chunk to their own progress file after an
  fsync. A killed run loses at most the chunk in flight; rerunning (any number of ranks) skips the rest
  and yields a byte-identical cache, because every chunk is always batched the same way.
- Not stale: meta.json records the encoder's identity and a hash of the texts; cache.EmbeddingCache
  refuses a cache that does not match its manifest or the requested encoder settings.
The cache format is described in cache.py. Across nodes, out_dir must be on a
shared filesystem (every rank writes its rows into the same file and reads every progress file).
"""
import os
import shutil
import time
import types

import numpy as np
import torch
import torch.distributed as dist

import common
from cache import (CACHE_EMBEDDINGS, CACHE_FORMAT, CACHE_INDEX, CACHE_META, cache_texts,
                   describe_text_mismatch, load_cache_file, model_fingerprint, read_cache_meta, verify_cache,
                   write_cache_meta)
import data
from model import POOLERS, load_text_encoder
import tracking

# -----------------------------------------------------------------------------
# default config (override with config/*.py or --key=value)
text_model = ""  # stage-1 out_dir (cc_finetune.py, has encoder.json) or any HF text model folder
manifest = ""  # JSONL: a stage-2 manifest (image, captions, long_captions) or a caption file (captions)
out_dir = "out/embed"  # the cache directory
fields = "captions,long_captions"  # record fields to embed, in this order; a missing field has no texts
instruction = ""  # captions are documents: no instruction (the official code's choice); recorded in meta
max_length = 512  # tokens per text including special tokens (paper); longer texts are truncated
pooling = ""  # "" = the encoder's own (encoder.json, else mean)
bidirectional = None  # None = the encoder's own (encoder.json, else True); False scores a causal LLM as trained
chat_template = ""  # "" = the encoder's own (encoder.json, else none); "none"; "auto"; "llama3" (official embeddings)
official_extraction = False  # True: the official extraction's layout and truncation, to match its released caches
batch_tokens = None  # padded tokens per batch (rows x longest row), the memory knob; None = 16384 on GPU, 2048 on CPU
packed = False  # padding-free: each batch's texts end to end in one row (encode_packed); fast with
# attn_implementation="flash_attention_2" (variable-length kernel), exact but quadratic with any other attention
chunk_rows = 4096  # rows per committed chunk: a killed run redoes at most this many per rank
dtype = "auto"  # compute dtype: auto = bfloat16 on GPU, float32 on CPU (rows are stored as float16)
attn_implementation = ""  # "" = transformers' default (sdpa)
overwrite = False  # replace an existing cache built from other texts/settings (else refuse)
verify = True  # after embedding: re-hash the manifest, check every row is written and finite
verify_only = False  # only verify an existing cache against the manifest (no model is loaded)
# experiment tracking (rank 0): the throughput goes to metrics.jsonl, and with these on also to W&B / TensorBoard
wandb_log = False  # Weights & Biases (pip install wandb; WANDB_MODE=offline works without a network)
wandb_project = "llm2clip"
wandb_run_name = ""  # "" = W&B's own name
tensorboard_log = False  # TensorBoard event files in out_dir/tensorboard
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()  # the settings above, not the imported CACHE_* constants
               if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str, type(None)))]
# declared once, checked before the model loads (common.check_config)
RULES = {k: common.positive_int for k in ("max_length", "chunk_rows")}
RULES["batch_tokens"] = (lambda v: v is None or type(v) is int and v > 0, "a positive integer (None: 16384 on GPU, "
                          "2048 on CPU)")
RULES["dtype"] = (lambda v: v in ("auto", "float32", "bfloat16", "float16"), "'auto', 'float32', 'bfloat16' or 'float16'")
RULES["pooling"] = (lambda v: v in ("", "mean", "eos"), "'' (the encoder's own), 'mean' or 'eos'")
RULES["chat_template"] = common.chat_template
RELATIONS = [(lambda c: c["manifest"] and c["out_dir"] and (c["text_model"] or c["verify_only"]),
              "text_model, manifest, out_dir: --text_model, --manifest and --out_dir are required "
              "(--verify_only needs no text_model)"),
             (lambda c: [f for f in c["fields"].split(",") if f.strip()], "fields: expected one or more field names"),
             (lambda c: not (c["official_extraction"] and c["pooling"] == "eos"),
              "official_extraction=True: the official extraction pools the mean; drop pooling='eos'"),
             *tracking.RELATIONS]
PATHS = {"text_model": "model", "manifest": "file", "out_dir": "out"}


# -----------------------------------------------------------------------------
# Batching (importable: bench.py times these against each other)

def token_budget_batches(lengths, batch_tokens):
    """Length-sorted batches whose padded size (rows x longest row) stays within `batch_tokens`.

    Returns index arrays into `lengths`, longest texts first (an OOM shows in the first batch, not
    the last); ties keep their input order. A text longer than the budget gets a batch of its own.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches, i = [], 0
    while i < len(order):
        n = max(1, batch_tokens // int(lengths[order[i]]))  # the first is the longest of its batch
        batches.append(order[i:i + n])
        i += n
    return batches


def default_batch_tokens(device):
    """batch_tokens=None: 16384 padded tokens on a GPU (wide batches keep it busy), 2048 on a CPU, where narrow batches
    stay in the caches: on MiniLM (1 thread) 2048 ran 1.3x faster than length-sorted batches of 32 (what
    sentence-transformers' encode runs) and 2.1x faster than 16384 (docs/performance.md)."""
    return 16384 if "cuda" in str(device) else 2048


def fixed_size_batches(lengths, batch_size):
    """The naive alternative: `batch_size` texts at a time in input order, each batch padded to its longest."""
    return [np.arange(i, min(i + batch_size, len(lengths))) for i in range(0, len(lengths), batch_size)]


def sorted_fixed_batches(lengths, batch_size):
    """What sentence-transformers' encode does: `batch_size` texts at a time in length order (longest
    first; it sorts by characters, this by tokens), each batch padded to its longest."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def packed_batches(lengths, batch_tokens):
    """Padding-free batches: texts (longest first) laid end to end in one row of at most `batch_tokens`
    tokens each (encode_packed); a text longer than the budget gets a row of its own."""
    lengths = np.asarray(lengths, dtype=np.int64)
    batches, cur, n = [], [], 0
    for i in np.argsort(-lengths, kind="stable"):
        if cur and n + lengths[i] > batch_tokens:
            batches.append(np.array(cur))
            cur, n = [], 0
        cur.append(i)
        n += int(lengths[i])
    return batches + ([np.array(cur)] if cur else [])


def padded_tokens(batches, lengths):
    """Tokens the model actually processes (each batch padded to its longest)."""
    lengths = np.asarray(lengths)
    return int(sum(len(b) * lengths[b].max() for b in batches if len(b)))


def text_lengths(encoder, texts, instruction=None, max_length=512, batch_size=4096):
    """Tokenised length of each text exactly as encoder.tokenize lays it out (special tokens,
    instruction, chat template, truncation), without building padded tensors."""
    out = np.empty(len(texts), dtype=np.int64)
    for i in range(0, len(texts), batch_size):
        part = encoder.lengths(texts[i:i + batch_size], instruction, max_length)
        out[i:i + len(part)] = part
    return out


@torch.no_grad()
def encode_batches(encoder, texts, batches, instruction=None, max_length=512):
    """Yield (indices, (n, dim) float32 CPU embeddings) per batch, through encoder.tokenize + forward
    (the code path stage 1 trained and evaluate.py uses)."""
    device = encoder.device
    for idx in batches:
        batch = encoder.tokenize([texts[i] for i in idx], instruction, max_length)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        yield idx, encoder(**batch).float().cpu()


@torch.no_grad()
def encode_packed(encoder, texts, batches, instruction=None, max_length=512):
    """Like encode_batches, but each batch's texts run as one unpadded row (1, N): position ids restart at
    every text, and the attention must keep the texts apart. flash_attention_2 finds the boundaries in the
    position ids (transformers calls its variable-length kernel: no padding anywhere); any other attention
    gets a block-diagonal mask, which is exact but still costs N^2 attention (correctness checks only)."""
    device = encoder.device
    varlen = getattr(encoder.model.config, "_attn_implementation", "") == "flash_attention_2"
    for idx in batches:
        b = encoder.tokenize([texts[i] for i in idx], instruction, max_length)
        keep = b["attention_mask"].bool()  # (n, T)
        lens = keep.sum(1)
        seg = torch.repeat_interleave(torch.arange(len(idx)), lens)  # (N,) text of each token
        pos = torch.cat([torch.arange(int(n)) for n in lens])[None]  # (1, N)
        kw = {} if varlen else {"attention_mask": (seg[:, None] == seg[None, :])[None, None].to(device)}
        out = encoder.model(input_ids=b["input_ids"][keep][None].to(device), position_ids=pos.to(device), **kw)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (1, N, C)
        padded = hidden.new_zeros(*keep.shape, hidden.shape[-1])  # back to (n, T, C) for the encoder's pooling
        padded[keep.to(device)] = hidden[0]
        pooled = POOLERS[encoder.pooling](padded, (b["embed_mask"] * b["attention_mask"]).to(device))
        yield idx, (pooled if encoder.adaptor is None else encoder.adaptor(pooled)).float().cpu()  # as encoder.forward


def compare_batching(encoder, texts, batch_tokens=4096, max_length=512, repeats=3, sorted_batch_size=0,
                     packed=False):
    """Time token-budget batching against fixed-size batches in input order on the same texts, and
    (sorted_batch_size > 0) against length-sorted fixed batches of that size (sentence-transformers'),
    and (packed) against padding-free rows of batch_tokens tokens (encode_packed: for flash_attention_2).

    The naive batch size is what fits the same memory budget at the longest text (batch_tokens //
    longest). Rounds interleave the schemes, so load changes on a shared machine hit them alike. Returns
    medians (wall and process CPU seconds; on CPU with one thread the CPU time is the work, on GPU
    read the wall time), padded tokens, and the largest relative difference of each scheme's rows
    from the fixed batches' rows."""
    lengths = text_lengths(encoder, texts, None, max_length)
    schemes = {"sorted": token_budget_batches(lengths, batch_tokens),
               "fixed": fixed_size_batches(lengths, max(1, batch_tokens // int(lengths.max())))}
    if sorted_batch_size > 0:
        schemes["sorted_fixed"] = sorted_fixed_batches(lengths, sorted_batch_size)
    if packed:
        schemes["packed"] = packed_batches(lengths, batch_tokens)
    times = {k: [] for k in schemes}
    outs = {}
    for rep in range(repeats + 1):  # the first round warms up
        names = list(schemes)[rep % len(schemes):] + list(schemes)[:rep % len(schemes)]  # none always first
        for k in names:
            batches = schemes[k]
            out = torch.empty(len(texts), encoder.dim)
            w, c = time.perf_counter(), time.process_time()
            run = encode_packed if k == "packed" else encode_batches
            for idx, e in run(encoder, texts, batches, None, max_length):
                out[torch.as_tensor(idx)] = e
            if rep:
                times[k].append((time.perf_counter() - w, time.process_time() - c))
            outs[k] = out
    med = {k: np.median(np.array(v), axis=0) for k, v in times.items()}
    diff = {k: float(((o - outs["fixed"]).norm(dim=1) / outs["fixed"].norm(dim=1)).max()) for k, o in outs.items()}
    return {"wall_ratio": med["fixed"][0] / med["sorted"][0], "cpu_ratio": med["fixed"][1] / med["sorted"][1],
            "wall": {k: float(v[0]) for k, v in med.items()}, "cpu": {k: float(v[1]) for k, v in med.items()},
            "padded": {k: int(lengths.sum()) if k == "packed" else padded_tokens(b, lengths) for k, b in schemes.items()},
            "tokens": int(lengths.sum()), "max_rel_diff": max(diff.values()), "rel_diff": diff}


# -----------------------------------------------------------------------------
# Progress: one append-only file per rank, one finished chunk per line

def read_progress(progress_dir):
    """Chunk ids finished by any rank of any run. A torn last line (killed mid-write) is ignored."""
    done = set()
    if os.path.isdir(progress_dir):
        for name in sorted(os.listdir(progress_dir)):
            with open(os.path.join(progress_dir, name)) as f:
                done.update(int(line) for line in f.read().split("\n")[:-1] if line.strip())
    return done


def commit_chunk(data_fd, progress_path, chunk_id):
    """Make a chunk's rows durable, then record it: after a crash a chunk is either fully on disk
    and listed, or unlisted (and redone)."""
    os.fsync(data_fd)
    with open(progress_path, "a") as f:
        f.write(f"{chunk_id}\n")
        f.flush()
        os.fsync(f.fileno())


def build_meta(cfg, enc, texts, complete):
    return {"format": CACHE_FORMAT, "encoder": enc, "dim": enc["dim"], "dtype": "float16",
            "count": len(texts.texts), "num_records": len(texts.counts), "fields": texts.fields,
            "text_hash": texts.text_hash, "manifest": os.path.abspath(cfg["manifest"]), "complete": complete,
            "chunk_rows": cfg["chunk_rows"], "code_version": common.code_version(), "config": cfg}


def _embeddings_ok(path, count, dim):
    try:
        emb = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return emb.shape == (count, dim) and emb.dtype == np.float16


def plan_mismatch(old, new):
    """Keys (other than bookkeeping) where an existing cache's meta differs from this run's."""
    keys = ("format", "encoder", "dim", "dtype", "count", "num_records", "fields", "text_hash", "chunk_rows")
    return [f"{k}: existing {old.get(k)!r}, now {new[k]!r}" for k in keys if k != "text_hash" and old.get(k) != new[k]]


def check_config(cfg):
    common.check_config(cfg, RULES, RELATIONS, PATHS)


def load_encoder(cfg, device, log):
    """The frozen encoder (bf16 on GPU by default) and its identity, as meta.json records it."""
    compute_dtype = cfg["dtype"] if cfg["dtype"] != "auto" else ("bfloat16" if "cuda" in device else "float32")
    enc_kwargs = common.text_encoder_kwargs(cfg)
    encoder = load_text_encoder(cfg["text_model"], dtype=compute_dtype, device=device,
                                attn_implementation=cfg["attn_implementation"] or None, **enc_kwargs)
    encoder.eval().requires_grad_(False)
    log(common.describe_text_encoder(encoder, enc_kwargs) + f", instruction={cfg['instruction']!r}, "
        f"max_length={cfg['max_length']}")
    s = encoder.settings
    model_path = os.path.abspath(cfg["text_model"]) if os.path.exists(cfg["text_model"]) else cfg["text_model"]
    enc = {"model": model_path, "fingerprint": model_fingerprint(model_path),  # differs if retrained in place
           "adapter": os.path.join(model_path, s["adapter_subdir"]) if s.get("adapter_subdir") else None,
           "base_model": s.get("base_model"), "pooling": encoder.pooling,
           "instruction": cfg["instruction"], "max_length": cfg["max_length"], "bidirectional": s["bidirectional"],
           "chat_template": encoder.chat_template, "official_extraction": encoder.official_extraction,
           "dim": encoder.dim, "compute_dtype": compute_dtype}
    return encoder, enc


CACHE_FILES = {CACHE_META, CACHE_EMBEDDINGS, CACHE_INDEX, "progress", "embed.log", "run_embed_captions.json", ".lock",
               "metrics.jsonl", "tensorboard", "wandb", "wandb_run.json"}  # the throughput record (tracking.MetricsLog)


def output_state(cfg, out, meta, texts, field_list, dim):
    """What out_dir holds: "new" (nothing usable), "resume" (this cache, unfinished) or "complete";
    a cache of other texts or settings, or files that are no cache's, is refused unless overwrite
    (every rank decides the same)."""
    # stage 2 keeps its training index beside the cache (train_index-<hash>/): part of the cache's folder
    foreign = sorted(n for n in (os.listdir(out) if os.path.isdir(out) else [])
                     if n not in CACHE_FILES and not n.startswith("train_index-"))
    if foreign:  # never mixed into, never deleted: --overwrite replaces a cache, not other results
        raise data.DataError(f"out_dir={out!r} holds files that are not this cache's ({', '.join(foreign[:4])}"
                             f"{', ...' if len(foreign) > 4 else ''}); expected an empty folder or a cache: choose "
                             "another --out_dir")
    if not os.path.isfile(os.path.join(out, CACHE_META)):
        return "new"
    try:
        old = read_cache_meta(out)
    except data.DataError as e:  # a corrupt meta.json: named, and only --overwrite replaces it
        if not cfg["overwrite"]:
            raise data.DataError(f"{e}; pass --overwrite=True to replace the cache") from None
        old = {}
    diff = plan_mismatch(old, meta)
    if old and old.get("text_hash") != texts.text_hash and old.get("fields") == field_list:
        idx = load_cache_file(out, CACHE_INDEX)
        diff.append("texts: " + describe_text_mismatch(idx["counts"], idx["text_hashes"], field_list, texts))
    if diff and not cfg["overwrite"]:
        raise data.DataError(f"{out} holds a cache of other texts or settings ({'; '.join(diff)}); "
                             "pass --overwrite=True to replace it, or choose another --out_dir")
    state = "new" if diff else ("complete" if old.get("complete") else "resume")
    emb_path = os.path.join(out, CACHE_EMBEDDINGS)
    if state != "new" and not _embeddings_ok(emb_path, len(texts.texts), dim):
        if state == "complete":
            raise data.DataError(f"{emb_path} is missing or not float16 {(len(texts.texts), dim)} although meta.json "
                                 "says complete; pass --overwrite=True to rebuild")
        state = "new"  # nothing usable to resume
    return state


def start_new_cache(out, meta, texts, dim):
    """Empty progress, a sparse embeddings.npy (untouched rows take no disk and read back as zeros, which
    verify catches), the index of record offsets and text hashes, and meta.json (complete=False)."""
    progress_dir, meta_path = os.path.join(out, "progress"), os.path.join(out, CACHE_META)
    shutil.rmtree(progress_dir, ignore_errors=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    os.makedirs(progress_dir, exist_ok=True)
    try:  # numpy's own OSError (a full disk, a file-size limit) names no file
        np.lib.format.open_memmap(os.path.join(out, CACHE_EMBEDDINGS), mode="w+", dtype=np.float16,
                                  shape=(len(texts.texts), dim)).flush()
        np.savez(os.path.join(out, CACHE_INDEX), record_offsets=texts.record_offsets,
                 counts=texts.counts, text_hashes=texts.text_hashes)
    except OSError as e:
        raise OSError(f"cannot write the cache in {out} ({e.strerror or e}); is the disk full?") from None
    write_cache_meta(out, meta)


def plan_chunks(cfg, encoder, texts, run):
    """Every text's token count (each rank tokenises a slice; all-gathered), the length-sorted order cut
    into chunks of chunk_rows -> (lengths, chunks)."""
    n = len(texts.texts)
    shard = -(-n // run.world_size)
    lo, hi, step = min(run.rank * shard, n), min((run.rank + 1) * shard, n), 65536  # read in pieces: bounded memory
    mine = np.concatenate([np.zeros(0, np.int64)] + [
        text_lengths(encoder, texts.texts[a:min(a + step, hi)], cfg["instruction"], cfg["max_length"])
        for a in range(lo, hi, step)])
    if run.ddp:
        buf = torch.zeros(shard, dtype=torch.long, device=run.device)
        buf[:len(mine)] = torch.from_numpy(mine)
        parts = [torch.zeros_like(buf) for _ in range(run.world_size)]
        dist.all_gather(parts, buf)
        lengths = torch.cat(parts).cpu().numpy()[:n]
    else:
        lengths = mine
    order = np.argsort(-lengths, kind="stable")
    return lengths, [order[i:i + cfg["chunk_rows"]] for i in range(0, n, cfg["chunk_rows"])]


def embed_chunks(cfg, encoder, texts, lengths, chunks, my_chunks, out, run):
    """Embed this rank's chunks, each row pwritten into the shared file, each finished chunk committed.
    Returns the (texts, tokens, padded tokens) counts."""
    from tqdm import tqdm
    stats = torch.zeros(3, dtype=torch.float64)
    if not my_chunks:
        return stats
    emb_path = os.path.join(out, CACHE_EMBEDDINGS)
    fd = os.open(emb_path, os.O_RDWR)
    offset = np.load(emb_path, mmap_mode="r").offset  # .npy header size
    row_bytes = encoder.dim * 2
    progress_path = os.path.join(out, "progress", f"rank{run.rank:05d}.txt")
    bar = tqdm(total=sum(len(chunks[c]) for c in my_chunks), unit="text", disable=not run.master,
               desc=f"embed (rank 0 of {run.world_size})")
    t_start = time.time()
    plan, encode = (packed_batches, encode_packed) if cfg["packed"] else (token_budget_batches, encode_batches)
    for c in my_chunks:
        batches = [chunks[c][b] for b in plan(lengths[chunks[c]], cfg["batch_tokens"])]
        for idx, emb in encode(encoder, texts.texts, batches, cfg["instruction"], cfg["max_length"]):
            rows16 = emb.numpy().astype(np.float16)
            for i, r in enumerate(idx.tolist()):  # pwrite: exact bytes, safe beside other ranks' rows
                os.pwrite(fd, rows16[i].tobytes(), offset + r * row_bytes)
            lens = lengths[idx]
            padded = lens.sum() if cfg["packed"] else len(idx) * lens.max()
            stats += torch.tensor([len(idx), lens.sum(), padded], dtype=torch.float64)
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{stats[1].item() / max(time.time() - t_start, 1e-9):.0f}", refresh=False)
        commit_chunk(fd, progress_path, c)
    bar.close()
    os.close(fd)
    return stats


def log_throughput(stats, elapsed, encoder, cfg, run, log):
    """Texts, tokens and padding per second over all ranks (the slowest rank's time), and truncation."""
    elapsed = torch.tensor([elapsed], dtype=torch.float64)
    t = encoder.pop_truncation()
    trunc = torch.tensor([t["texts"], t["truncated"], t["tokens_cut"], t["max_cut"]], dtype=torch.float64)
    if run.ddp:  # totals over ranks; the time is the slowest rank's
        stats, elapsed, trunc = stats.to(run.device), elapsed.to(run.device), trunc.to(run.device)
        dist.all_reduce(stats)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        dist.all_reduce(trunc[:3])
        dist.all_reduce(trunc[3:], op=dist.ReduceOp.MAX)
    (texts_done, tokens, padded), elapsed = stats.tolist(), max(elapsed.item(), 1e-9)
    if texts_done:
        log(f"embedded {int(texts_done)} texts, {int(tokens)} tokens ({int(padded)} padded; padding "
            f"{1 - tokens / padded:.1%}) in {elapsed:.1f}s: {texts_done / elapsed:.1f} texts/s, "
            f"{tokens / elapsed:.0f} tokens/s")
        run.metrics.write({"step": int(texts_done), "texts_per_s": texts_done / elapsed, "tokens_per_s": tokens / elapsed,
                           "padding": 1 - tokens / padded, "seconds": elapsed, "truncated": int(trunc[1].item())})
        log(common.describe_truncation(dict(zip(("texts", "truncated", "tokens_cut", "max_cut"),
                                                map(int, trunc.tolist()))), cfg["max_length"]))


def verify_ranks(cfg, out, n, run, log):
    """Ranks scan a slice of the rows each; rank 0 also re-hashes the manifest. -> every problem found."""
    share = -(-n // run.world_size)
    mine = verify_cache(out, cfg["manifest"] if run.master else None,
                        row_range=(min(run.rank * share, n), min((run.rank + 1) * share, n)))
    problems = list(dict.fromkeys(p for part in common.per_rank(mine, run.ddp, run.world_size) for p in part))
    log("verify: ok (texts unchanged, every row written and finite)" if not problems else
        "\n".join(f"verify: PROBLEM: {p}" for p in problems))
    return problems


def main(argv=None):
    cfg = common.configure({k: globals()[k] for k in config_keys}, argv, __doc__)
    check_config(cfg)
    field_list = [f.strip() for f in cfg["fields"].split(",") if f.strip()]
    out = cfg["out_dir"]
    progress_dir = os.path.join(out, "progress")

    # --- distributed; one writer per cache dir (verify_only only reads); a killed run's temp files go
    ddp, rank, local_rank, world_size, device = common.setup_distributed()
    cfg["batch_tokens"] = cfg["batch_tokens"] or default_batch_tokens(device)  # as run (and recorded in meta.json)
    run = types.SimpleNamespace(ddp=ddp, rank=rank, world_size=world_size, device=device, master=rank == 0)
    stale = common.lock_out_dir(out) if run.master and not cfg["verify_only"] else []
    log = common.Logger(out, "embed", run.master)
    if stale:
        log(f"removed {len(stale)} temp file(s) of a killed run: {', '.join(stale)}")

    def barrier():
        if ddp:
            dist.barrier()

    def finish(problems):  # every rank exits with rank 0's verdict
        flag = torch.tensor([len(problems)], device=device)
        if ddp:
            dist.broadcast(flag, 0)
        if run.master:
            common.unlock_out_dir(out)
        common.cleanup_distributed(ddp)
        if flag.item():
            raise SystemExit(1)

    if cfg["verify_only"]:
        problems = verify_cache(out, cfg["manifest"]) if run.master else []
        for p in problems:
            log("verify: PROBLEM:", p)
        log("verify: ok" if not problems else f"verify: {len(problems)} problem(s)")
        return finish(problems)

    # --- texts, in cache row order: counts and hashes only; each text is re-read from the manifest when
    # its chunk is embedded (a rank holds the texts of one chunk, not of the whole manifest)
    t0 = time.time()
    texts = cache_texts(cfg["manifest"], field_list, lazy=True)
    n = len(texts.texts)
    if n == 0:
        raise data.DataError(f"{cfg['manifest']}: no texts in fields {field_list}")
    log(f"{cfg['manifest']}: {len(texts.counts)} records, {n} texts in fields {field_list} "
        f"(per field: {dict(zip(field_list, texts.counts.sum(0).tolist()))})")

    # --- model, then the output: new, resume, already complete, or refuse a mismatch
    encoder, enc = load_encoder(cfg, device, log)
    state = output_state(cfg, out, build_meta(cfg, enc, texts, complete=False), texts, field_list, encoder.dim)
    barrier()
    if run.master and state == "new":
        start_new_cache(out, build_meta(cfg, enc, texts, complete=False), texts, encoder.dim)
    if run.master:
        common.save_run_info(out, cfg, __file__, extra={"world_size": world_size})
    barrier()

    # --- plan: length-sorted order cut into chunks; ranks take the unfinished ones round-robin
    done, chunks, lengths, my_chunks = read_progress(progress_dir), [], None, []
    if state != "complete":
        lengths, chunks = plan_chunks(cfg, encoder, texts, run)
        todo = [c for c in range(len(chunks)) if c not in done]
        skipped = sum(len(chunks[c]) for c in range(len(chunks)) if c in done)
        if done:
            log(f"resuming: {len(done)}/{len(chunks)} chunks ({skipped} of {n} rows) already done, skipping them")
        log(f"{n} texts, {int(lengths.sum())} tokens (mean {lengths.mean():.1f}, max {lengths.max()}); "
            f"{len(chunks)} chunks of {cfg['chunk_rows']} rows over {world_size} rank(s); batch_tokens "
            f"{cfg['batch_tokens']}; {len(texts.texts) - skipped} rows to embed; setup {time.time() - t0:.1f}s")
        my_chunks = todo[rank::world_size]
    else:
        log(f"{out} already holds the complete cache of these {n} texts; skipped all {n} rows")

    # --- embed
    encoder.pop_truncation()
    run.metrics = tracking.MetricsLog(out, cfg, run.master, None, log)  # the throughput (+ W&B, TensorBoard)
    t_start = time.time()
    stats = embed_chunks(cfg, encoder, texts, lengths, chunks, my_chunks, out, run)
    log_throughput(stats, time.time() - t_start, encoder, cfg, run, log)
    run.metrics.close()

    # --- finish: rank 0 marks the cache complete once every chunk of every rank is on disk
    barrier()
    problems = []
    if run.master and state != "complete":
        missing = len(chunks) - len(read_progress(progress_dir) & set(range(len(chunks))))
        if missing:
            problems.append(f"{missing} chunks are not finished")
        else:
            write_cache_meta(out, build_meta(cfg, enc, texts, True))
            log(f"cache complete: {out} ({n} x {encoder.dim} float16)")
    barrier()
    if cfg["verify"]:
        problems += [p for p in verify_ranks(cfg, out, n, run, log) if p not in problems]
    finish(problems)


if __name__ == "__main__":
    common.run_main(main)
