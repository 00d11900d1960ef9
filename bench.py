"""The paper's efficiency claims as measured ratios, side by side in one run (nanoGPT's bench.py idea:
the core of each loop, imported from the stage scripts and timed; medians over repeats, variants
interleaved within each repeat so that load drift on a shared machine hits them alike).

  (a) post_train.py's step with text from a real on-disk cache (embed_captions.py output, read through
      cache.EmbeddingCache with the real caption choice; adaptor, clip_loss, AdamW, clip, clamp) vs the
      bare vision tower forward+backward+AdamW at the same batch: the text side's overhead. Both use
      post_train's AdamW (common.adamw: fused where torch has it); each step's phases are also timed.
  (b) the same step with the frozen text encoder online, shaped so that its FLOPs per caption over the
      ViT's FLOPs per image equal Llama-3-8B's over ViT-L/14-224's at the paper's settings, both scaled
      down by the same (printed) factor.
  (c) caption embedding throughput (embed_captions.py's batching): length-sorted token-budget batches vs
      fixed-size batches padded to their longest in dataset order, and vs length-sorted batches of 32
      (sentence-transformers' encode), on real COCO + DOCCI captions (embed_copies: a larger corpus).
  (d) stage-1 peak memory and step time at global batch 256 (loss.grad_cache_step, as cc_finetune.py calls
      it), each variant in a fresh subprocess minus a baseline process: gradient caching in chunks of 32 vs
      plain 256 vs plain 32; and the peak memory of one embed_captions.py rank embedding (c)'s captions.
  (loader, not in the default run) post_train's input path (data_index.train_loader on tar shards or a
      manifest of image files, the training transform) vs webdataset doing the same work (a plain Dataset of
      files for a manifest), images per second at the same num_workers, and our path's per-stage profile.
The run's environment (torch version, threads, load average at start and end) is printed with the table.

python bench.py                         # tiny CPU models (a few minutes on 2 quiet CPU cores)
python bench.py config/bench_gpu.py     # ViT-L/14-224 + a Llama-3-8B-shaped text encoder, with MFU
python bench.py --benchmarks=loader --shards='data/{00000..00099}.tar' --num_workers=8 --image_size=224
"""
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import torch

import common
from cache import EmbeddingCache
import convert
import data
import data_index
import loss as L
import model as M
import pipeline
from zoo import DEVICE_RULE

# -----------------------------------------------------------------------------
# config: tiny CPU models by default; config/bench_gpu.py has the paper's sizes
benchmarks = "abcd"  # which of (a)-(d) to run
device = "auto"  # cuda if available, else cpu
dtype = "auto"  # autocast dtype (and the frozen text encoder's weights on GPU): "auto" = bfloat16 on GPU, float32 on CPU
threads = 1  # CPU threads: one keeps medians steady on a shared machine
clock = "auto"  # "cpu" (process CPU time) or "wall"; auto: cpu for a 1-thread CPU run (the work itself, not the
# share of a shared machine's cores the scheduler gave other tenants meanwhile), wall otherwise (GPU)
seed = 0
repeats = 7  # timed repeats per variant; the table shows medians
warmup = 2  # untimed steps per variant first
steps = 2  # steps per timed repeat
peak_flops = 0.0  # for MFU; 0: bf16 dense peak by device name (H100 989e12, A100 312e12)
fused_adamw = True  # (a, b, d) AdamW through common.adamw, as the stage scripts (fused where torch has it); False: torch's default
# stage 2 (a, b)
batch_size = 32
vision_model = "vit_tiny_patch16_224"  # a timm ViT (width 192); timm_kwargs reshape it: 65 tokens, 4 blocks
timm_kwargs = {"img_size": 32, "patch_size": 4, "depth": 4}
embed_dim = 128  # the shared image-text space (a new vision head of this size)
adaptor_blocks = 4
gradient_checkpointing = False  # on the ViT, for both variants
cache_records = 256  # synthetic records (2 real + 3 long captions each) embedded into the on-disk cache
# the text encoder: a random bidirectional Llama; only its shape matters for speed
text_layers = 6
text_width = 384
text_heads = 6
text_kv_heads = 2
text_ffn = 1024
caption_tokens = 0  # online caption length; 0: solve for the paper's text/vision FLOPs ratio
# the paper's scale, for that ratio: ViT-L/14-224 (257 tokens) vs Llama-3-8B on a padded dense caption
paper_vision = "vit_large_patch14_clip_224"
paper_text = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8}
paper_caption_tokens = 128  # a dense caption padded to its batch's longest, Llama-3 tokens (no instruction)
# caption embedding (c)
embed_short = 200  # COCO captions
embed_long = 200  # DOCCI descriptions, all of them (1:1, like the real + dense captions of a stage-2 manifest)
embed_layers = 1  # the text encoder above with this many layers (0: all); fewer keeps the CPU run short
embed_repeats = 2  # after a warm-up pass
embed_batch_tokens = 0  # 0: embed_captions.py's default (16384 on GPU, 2048 on CPU); fixed batches: this // the longest
embed_sorted_batch = 32  # sentence-transformers' default batch size, for its length-sorted batches
embed_copies = 1  # the caption mix repeated this many times: a larger corpus, so sorted batches pad ~nothing
embed_attn = "sdpa"  # the (c) encoder's attention implementation (all schemes alike)
embed_packed = False  # (c) also padding-free rows (embed_captions.encode_packed): needs embed_attn="flash_attention_2"
embed_max_length = 512
vocab_size = 2000  # BPE tokenizer trained offline on the captions
# stage-1 memory (d)
mem_global_batch = 256
mem_chunk = 32
mem_max_length = 128  # long-ish so activations dominate
mem_width = 32
mem_layers = 2
mem_repeats = 2  # subprocesses per variant; medians
mem_steps = 3  # steps per subprocess: the peak over all, the time of the last ones (the first warms up)
# stage-2 input path (loader): data_index.train_loader vs webdataset doing the same work (not in the default run)
shards = ""  # tar shards (globs, {a..b} ranges, commas); "" with manifest="": built from shared/data's COCO JPEGs
manifest = ""  # instead: a manifest of image files (reference: a plain torch Dataset of the files)
image_root = ""  # the manifest's image folder ("" = the manifest's own folder)
num_workers = 2  # DataLoader worker processes per loader, ours and the reference alike
image_size = 224  # RandomResizedCrop to this size (scale 0.9-1, bicubic), then CLIP's mean/std
loader_batch = 64
loader_batches = 6  # timed batches per repeat, after an untimed one (workers started, prefetch queues full)
loader_repeats = 3
loader_records = 512  # the default data: shared/data's 6 COCO JPEGs as this many records
loader_profile = 64  # samples timed stage by stage in this process (read, decode, transform, collate)
jpeg_draft = False  # ours decodes JPEGs at a reduced DCT scale (still >= the crop): faster, other pixels
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and k.islower() and isinstance(v, (int, float, str, dict))]


def chosen(benchmarks):
    """'abcd,loader' -> ('abcd', True): the letters of (a)-(d), and whether the loader benchmark runs."""
    items = [x.strip() for x in benchmarks.split(",") if x.strip()]
    return "".join(x for x in items if x != "loader"), "loader" in items


# declared once, checked before anything is built or timed (common.check_config)
RULES = {"benchmarks": (lambda v: chosen(v) != ("", False) and set(chosen(v)[0]) <= set("abcd"),
                        "one or more of the letters a, b, c, d, and/or 'loader' (comma-separated: abcd,loader)"),
         "shards": (lambda v: not v or data_index.expand_shards(v), "existing tar shards (globs, {a..b} ranges or "
                    "a comma list)"),
         "device": DEVICE_RULE, "dtype": common.one_of("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto"),
         "clock": common.one_of("auto", "cpu", "wall"), "peak_flops": common.non_negative,
         "embed_attn": common.one_of("sdpa", "eager", "flash_attention_2"),
         **{k: common.positive_int for k in ("threads", "repeats", "steps", "batch_size", "embed_dim", "cache_records",
                                  "text_layers", "text_width", "text_heads", "text_kv_heads", "text_ffn",
                                  "paper_caption_tokens", "embed_repeats", "embed_sorted_batch",
                                  "embed_copies", "embed_max_length", "vocab_size", "mem_global_batch", "mem_chunk",
                                  "mem_max_length", "mem_width", "mem_layers", "mem_repeats", "mem_steps",
                                  "image_size", "loader_batch", "loader_batches", "loader_repeats", "loader_records")},
         **{k: common.non_negative_int for k in ("warmup", "adaptor_blocks", "caption_tokens", "embed_short", "embed_long",
                                  "embed_layers", "num_workers", "loader_profile", "embed_batch_tokens")}}
RELATIONS = [(lambda c: not set("ab") & set(chosen(c["benchmarks"])[0]) or c["cache_records"] >= c["batch_size"],
              lambda c: f"cache_records={c['cache_records']}: expected >= batch_size={c['batch_size']} "
                        "(benchmarks a and b draw one full batch from the cache)"),
             (lambda c: not c["embed_packed"] or c["embed_attn"] == "flash_attention_2",
              "embed_packed=True needs embed_attn='flash_attention_2' (a variable-length kernel)"),
             (lambda c: not (c["shards"] and c["manifest"]), "shards, manifest: give one of them (or neither: the "
              "loader benchmark builds its own from shared/data)")]
PATHS = {"manifest": "file", "image_root": "dir"}
HERE = os.path.dirname(os.path.abspath(__file__))


# --- models and data

def text_encoder(tokenizer, shape, dev="cpu", dtype=None, lora=False, attn="sdpa"):
    """A random bidirectional Llama of `shape` (LlamaConfig kwargs) as a TextEncoder; dev="meta": shape only."""
    from transformers import AutoModel, LlamaConfig
    conf = LlamaConfig(vocab_size=len(tokenizer) + 32, max_position_embeddings=4096, attn_implementation=attn, **shape)
    with torch.device(dev):
        llm = AutoModel.from_config(conf, **({"dtype": dtype} if dtype else {}))
    llm = M.enable_bidirectional(llm, verify=dev != "meta")
    return M.TextEncoder(M.attach_lora(llm) if lora else llm, tokenizer)


def text_shape(cfg, layers=0):
    return dict(hidden_size=cfg["text_width"], intermediate_size=cfg["text_ffn"], num_attention_heads=cfg["text_heads"],
                num_hidden_layers=layers or cfg["text_layers"], num_key_value_heads=cfg["text_kv_heads"])


def shared_data():
    """The shared real-data folder (shared/data beside or above the repo), or None."""
    d, root = HERE, None
    while root is None and d != os.path.dirname(d):
        root = os.path.join(d, "shared", "data") if os.path.isdir(os.path.join(d, "shared", "data")) else None
        d = os.path.dirname(d)
    return root


def caption_mix(cfg):
    """Short COCO captions + long DOCCI descriptions from shared/data (synthetic lengths if absent), shuffled."""
    rng, root = random.Random(cfg["seed"]), shared_data()
    if root:
        def read(rel):
            return [c for _, r in data.read_jsonl(os.path.join(root, rel)) for c in r["captions"]]
        short, long = read("captions/coco_dev.jsonl"), read("long_captions/docci_test100.jsonl")
        source = "COCO captions + DOCCI descriptions (shared/data)"
    else:  # word counts like COCO's (~11) and DOCCI's (~160)
        words = "a the red dog man street table two of on with near small large white blue and is".split()
        short = [" ".join(rng.choices(words, k=max(3, int(rng.gauss(11, 3))))) for _ in range(cfg["embed_short"])]
        long = [" ".join(rng.choices(words, k=max(40, int(rng.gauss(160, 70))))) for _ in range(cfg["embed_long"])]
        source = "synthetic lengths (shared/data not found)"
    texts = short[:cfg["embed_short"]] + long[:cfg["embed_long"]]
    rng.shuffle(texts)
    return texts, source


def build_cache(cfg, tmp):
    """Synthetic manifest + a real embed_captions.py cache of width text_width (a 1-layer model suffices:
    stage 2 reads rows, whatever wrote them) -> (records, cache.EmbeddingCache)."""
    import embed_captions
    records = data.make_synthetic_dataset(tmp, cfg["cache_records"], seed=cfg["seed"], image_size=16)
    texts = [c for r in records for c in r["captions"] + r["long_captions"]]
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):  # their logs are not ours
        pipeline.build_tiny_text_model(f"{tmp}/llm", texts=texts, hidden_size=cfg["text_width"], num_layers=1,
                                       num_heads=cfg["text_heads"], intermediate_size=cfg["text_ffn"])
        embed_captions.main([f"--text_model={tmp}/llm", f"--manifest={tmp}/train.jsonl", f"--out_dir={tmp}/cache"])
    torch.set_num_threads(cfg["threads"])  # bench's own, whatever the command-line main set for that stage
    return records, EmbeddingCache(f"{tmp}/cache")


def timed(fns, cfg, sync):
    """fns: name -> step(). Median seconds per step over `repeats`, the variants interleaved in each repeat:
    {"wall": {name: s}, "cpu": {name: s}} (process CPU time)."""
    for f in fns.values():
        for _ in range(cfg["warmup"]):
            f()
    times, names = {k: [] for k in fns}, list(fns)
    for r in range(cfg["repeats"]):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotated: none always follows the same one
            f = fns[k]
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(cfg["steps"]):
                f()
            sync()
            times[k].append(((time.perf_counter() - t0) / cfg["steps"], (time.process_time() - c0) / cfg["steps"]))
    return {c: {k: statistics.median(x[i] for x in v) for k, v in times.items()} for i, c in enumerate(("wall", "cpu"))}


def timed_phases(phases, cfg, sync, clock):
    """phases: name -> [(phase, fn)]. Median ms of each phase over `repeats` steps on `clock`, synchronised around
    each phase (so a GPU's queue does not move time between them): where a step's time goes."""
    times = {k: {p: [] for p, _ in ph} for k, ph in phases.items()}
    for _ in range(cfg["repeats"]):
        for k, ph in phases.items():
            for p, f in ph:
                sync()
                t0 = clock()
                f()
                sync()
                times[k][p].append(clock() - t0)
    return {k: {p: 1e3 * statistics.median(v) for p, v in ph.items()} for k, ph in times.items()}


# --- stage-1 memory (d): one variant per fresh process

def rss_high_water(reset=False):
    """This process's own peak resident set (VmHWM) in MiB; reset=True restarts it at the current RSS.
    Not ru_maxrss: a subprocess's ru_maxrss starts at its parent's peak (Linux carries the pre-exec
    high-water mark over), so a child of a big bench process would report the parent's memory."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def memory_child(variant, cfg):
    """Build the stage-1 model (tiny LoRA decoder) and inputs, restart the high-water mark, run mem_steps steps of
    `variant` through loss.grad_cache_step (queries and positives, as cc_finetune.py calls it), print the peak
    memory in MiB (RSS on CPU, allocated on CUDA) and the median time of the steps after the first."""
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    dev, G, C, T = cfg["device"], cfg["mem_global_batch"], cfg["mem_chunk"], cfg["mem_max_length"]
    tok = pipeline.train_tokenizer(["a red circle on a white background", "two dogs near the street"] * 4, 256)
    shape = dict(hidden_size=cfg["mem_width"], intermediate_size=4 * cfg["mem_width"],
                 num_hidden_layers=cfg["mem_layers"], num_attention_heads=4, num_key_value_heads=2)
    enc = text_encoder(tok, shape, dev, lora=True).train()
    opt = common.adamw([p for p in enc.parameters() if p.requires_grad], lr=1e-4,
                       fused=None if cfg["fused_adamw"] else False)
    ids = torch.randint(10, len(tok), (2, G, T), device=dev)  # queries, positives: full-length captions
    n, chunk = {"baseline": (1, 1), "plain_global": (G, G), "plain_chunk": (C, C), "grad_cache": (G, C)}[variant]

    def side(x):
        return [{"input_ids": c, "attention_mask": torch.ones_like(c), "embed_mask": torch.ones_like(c)}
                for c in x[:n].split(chunk)]

    cuda = dev.startswith("cuda")
    torch.cuda.reset_peak_memory_stats() if cuda else rss_high_water(reset=True)
    times, clock = [], time.process_time if cfg["clock"] == "cpu" else time.perf_counter
    for _ in range(cfg["mem_steps"]):
        t0 = clock()
        L.grad_cache_step(lambda c: enc(**c), [side(ids[0]), side(ids[1])], lambda q, d: L.caption_contrastive_loss(q, d))
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize() if cuda else None
        times.append(clock() - t0)
    print(f"STEP_S {statistics.median(times[1:] or times):.6f}")
    print(f"PEAK_MIB {torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_high_water():.2f}")


def embed_memory_child(cfg, model_dir, manifest, out_dir):
    """One embed_captions.py rank (this process) embedding `manifest`. A first run on the manifest's first line
    loads the lazily imported libraries; then the high-water mark restarts and the real run's peak above it is
    printed in MiB (RSS on CPU: the encoder, the batches, the rows; allocated on CUDA), with the process total."""
    import embed_captions
    torch.set_num_threads(cfg["threads"])
    cuda = cfg["device"].startswith("cuda")
    with open(manifest) as f:
        first = f.readline()
    with open(f"{manifest}.first", "w") as f:
        f.write(first)
    args = [f"--text_model={model_dir}", f"--batch_tokens={cfg['embed_batch_tokens']}",
            f"--max_length={cfg['embed_max_length']}"]
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
        embed_captions.main(args + [f"--manifest={manifest}.first", f"--out_dir={out_dir}.first"])
        torch.cuda.reset_peak_memory_stats() if cuda else None
        before = torch.cuda.memory_allocated() / 2**20 if cuda else rss_high_water(reset=True)
        embed_captions.main(args + [f"--manifest={manifest}", f"--out_dir={out_dir}"])
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_high_water()
    print(f"PEAK_MIB {peak - before:.2f}\nTOTAL_MIB {peak:.2f}")


def child(code, *args):
    """Run `code` (python, after `import sys, json, bench`) in a fresh process -> its printed {KEY: float}."""
    r = subprocess.run([sys.executable, "-c", "import sys, json, bench; " + code, *args], cwd=HERE,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"bench subprocess {args[:1]} failed:\n{r.stderr[-3000:]}")
    return {k: float(v) for k, v in re.findall(r"^(PEAK_MIB|TOTAL_MIB|STEP_S) (\S+)$", r.stdout, re.M)}


def peak_mib(variant, cfg):
    return child("bench.memory_child(sys.argv[1], json.loads(sys.argv[2]))", variant, json.dumps(cfg))


def environment():
    """What a reader needs to judge the numbers: versions, CPU, threads, and the machine's load at the start."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else "?"
    return {"torch": torch.__version__, "python": sys.version.split()[0], "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_start": os.getloadavg(),
            "start": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# --- the stage-2 input path (loader): our DataLoader vs the usual way of doing the same work

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def loader_data(cfg):
    """-> (kind, source, image_root): the given shards or manifest; else shared/data's 6 COCO JPEGs as loader_records
    records (folders of links to them: a manifest names each image once), written once as a manifest and as tar
    shards (convert.write_tar_shards) into the temp folder, and kept (printed: rerun with --manifest=...)."""
    if cfg["shards"]:
        return "shards", data_index.expand_shards(cfg["shards"]), None
    if cfg["manifest"]:
        return "manifest", cfg["manifest"], cfg["image_root"] or None
    n, count = cfg["loader_records"], max(4, cfg["num_workers"])  # webdataset splits shards over its workers
    d = os.path.join(tempfile.gettempdir(), f"llm2clip_bench_loader_{n}x{count}")
    if not os.path.exists(os.path.join(d, "done")):
        root = shared_data() and os.path.join(shared_data(), "images", "coco6")
        if root and os.path.isfile(os.path.join(root, "manifest.jsonl")):
            base = [r for _, r in data.read_jsonl(os.path.join(root, "manifest.jsonl"))]
        else:  # synthetic shapes (PNG), where shared/data is missing
            root = os.path.join(d, "synthetic")
            base = data.make_synthetic_dataset(root, 16, seed=cfg["seed"], image_size=256)
        records = []
        for j in range(-(-n // len(base))):
            if not os.path.lexists(os.path.join(d, f"img_{j}")):
                os.makedirs(d, exist_ok=True)
                os.symlink(os.path.abspath(root), os.path.join(d, f"img_{j}"))
            records += [{"image": f"img_{j}/{r['image']}", "captions": r["captions"]} for r in base]
        data.write_manifest(os.path.join(d, "train.jsonl"), records[:n])
        convert.write_tar_shards(data.read_manifest(os.path.join(d, "train.jsonl")),
                                    os.path.join(d, "shards", "{:05d}.tar"), -(-n // count))
        open(os.path.join(d, "done"), "w").close()
    return "shards", data_index.expand_shards(os.path.join(d, "shards", "*.tar")), None


class FileImages(torch.utils.data.Dataset):
    """The plain PyTorch way for a list of image files: PIL open, convert to RGB, a torchvision transform."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def loaders(cfg, kind, source, image_root, index_dir):
    """-> (reference name, {name: make() -> an iterable of batches}, our TrainSamples). Ours is post_train's loader
    (data_index.train_loader: the training index, TrainSamples, the training transform) at post_train's defaults;
    the reference does the same work the usual way: webdataset for tar shards (tar -> PIL -> torchvision's
    RandomResizedCrop, ToTensor, Normalize -> batches), a plain Dataset of files for a manifest."""
    import post_train
    import torchvision.transforms as T
    S, B, W = cfg["image_size"], cfg["loader_batch"], cfg["num_workers"]
    index = data_index.build_train_index(index_dir, **({"shards": source} if kind == "shards" else {
        "manifest": source, "image_root": image_root}), log=lambda *a: None)
    pcfg = {k: getattr(post_train, k) for k in post_train.config_keys}
    pcfg.update(batch_size=B, num_workers=W, seed=cfg["seed"], max_steps=10 ** 9, crop_scale=(0.9, 1.0),
                text_source="online", jpeg_draft=cfg["jpeg_draft"])
    dc = {"input_size": (3, S, S), "mean": CLIP_MEAN, "std": CLIP_STD}
    tfm = T.Compose([T.RandomResizedCrop(S, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                     T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    if kind == "shards":
        import webdataset as wds  # only here: a reference, not a dependency
        if len(source) < W:
            raise ValueError(f"shards: {len(source)} tar shards for num_workers={W}: webdataset gives each worker "
                             "whole shards; expected at least one shard per worker")
        name = "webdataset"

        def ref():
            ds = (wds.WebDataset(source, shardshuffle=False, empty_check=False).repeat().decode("pil")
                  .to_tuple("jpg;jpeg;png;webp", "json").map_tuple(tfm, lambda x: x).batched(B, partial=False))
            return wds.WebLoader(ds, batch_size=None, num_workers=W)
    else:
        name, files = "plain Dataset", FileImages([r["image"] for r in data.read_manifest(source, image_root)], tfm)

        def ref():
            return torch.utils.data.DataLoader(files, B, sampler=torch.utils.data.RandomSampler(files, True, 10 ** 9),
                                               num_workers=W, drop_last=True)
    samples = data_index.TrainSamples(index, data.TrainTransform(dc, (0.9, 1.0)),
                                      **({"jpeg_draft": True} if cfg["jpeg_draft"] else {}))
    return name, {name: ref, "ours": lambda: data_index.train_loader(pcfg, index, None, dc, 0, 1, 0)}, samples


def children_cpu():
    """{pid: CPU seconds (user + system)} of this process's child processes (DataLoader workers), from /proc."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def loader_rate(make, cfg):
    """Images per second of one loader over loader_batches batches, after an untimed first one (workers started,
    prefetch queues full): {"wall": ..., "cpu": ...}, the CPU time of this process and of its workers together
    (the work, whatever share of the cores other tenants took meanwhile)."""
    it = iter(make())
    next(it)
    k0, t0, c0 = children_cpu(), time.perf_counter(), time.process_time()
    for _ in range(cfg["loader_batches"]):
        next(it)
    wall, cpu, k1 = time.perf_counter() - t0, time.process_time() - c0, children_cpu()
    cpu += sum(k1[p] - k0[p] for p in k0 if p in k1)
    del it  # its workers exit now, before the next loader starts
    n = cfg["loader_batches"] * cfg["loader_batch"]
    return {"wall": n / wall, "cpu": n / max(cpu, 1e-9)}


def profile_loader(samples, cfg, clock):
    """Our path stage by stage in this process, ms per sample (medians over loader_profile samples): read (the
    record's index line and the image's bytes), decode (data.open_image less that read: PIL, RGB), transform
    (caption choice, crop, resize, tensor, normalise), collate (the batch / batch size: the images are already in
    it when TrainSamples.__getitems__ builds the batch, so what is left is allocating it and the other fields)."""
    draft = getattr(samples, "draft", 0)
    t = {k: [] for k in ("read", "decode", "transform", "collate")}
    n = min(cfg["loader_profile"], len(samples))
    batch = []
    for i in range(n):
        t0 = clock()
        rec = samples.records[i]
        path, offset, size = rec.get("_tar") or (rec["image"], 0, -1)
        with open(path, "rb") as f:
            f.seek(offset)
            f.read(size)
        t1 = clock()
        img = data.open_image(rec, None, draft) if draft else data.open_image(rec)
        t2 = clock()
        rng = data.sample_rng(cfg["seed"], 0, i)
        field, slot = data.choose_caption(rec, rng, samples.ratio)
        image = samples.transform(img, rng)
        t3 = clock()
        t["read"].append(t1 - t0), t["decode"].append(t2 - t1 - (t1 - t0)), t["transform"].append(t3 - t2)
        batch.append({"image": image, "embedding": None, "text": rec[field][slot], "index": i, "bad": []})
        if len(batch) == cfg["loader_batch"] or i == n - 1:
            t0 = clock()
            if hasattr(samples, "__getitems__"):  # the images are written into the batch as they are made
                data_index.collate_train(batch, torch.empty(len(batch), *batch[0]["image"].shape))
            else:
                data_index.collate_train(batch)
            t["collate"] += [(clock() - t0) / len(batch)] * len(batch)
            batch = []
    return {k: 1e3 * statistics.median(v) for k, v in t.items()}


def loader_bench(cfg, row, ratio, info):
    """The loader rows: ours and the reference at num_workers, medians over loader_repeats (interleaved), and our
    stage profile; the data is set up (and the training index built) before anything is timed."""
    kind, source, image_root = loader_data(cfg)
    clock = time.process_time if cfg["clock"] == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        ref, makers, samples = loaders(cfg, kind, source, image_root, os.path.join(tmp, "index"))
        runs = {k: [] for k in makers}
        for r in range(cfg["loader_repeats"]):
            for k in (list(makers) if r % 2 == 0 else list(makers)[::-1]):
                runs[k].append(loader_rate(makers[k], cfg))
        profile = profile_loader(samples, cfg, clock)
    med = {k: {c: statistics.median(x[c] for x in v) for c in ("wall", "cpu")} for k, v in runs.items()}
    W = cfg["num_workers"]
    what = "webdataset: tar->PIL->torchvision" if kind == "shards" else "Dataset: files->PIL->torchvision"
    row("loader", f"{what}, {W} workers", med[ref][cfg["clock"]], "img/s")
    row("loader", f"ours: data_index.train_loader, {W} workers", med["ours"][cfg["clock"]], "img/s")
    ratio(f"ours / {ref}", med["ours"][cfg["clock"]], med[ref][cfg["clock"]], 1.0, ">=")
    info["loader"] = {"kind": kind, "source": source if kind == "manifest" else f"{len(source)} tar shards "
                      f"({os.path.dirname(source[0])})", "ref": ref, "rates": med, "profile": profile,
                      "runs": runs, "samples": len(samples)}


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = common.configure({k: globals()[k] for k in config_keys}, argv, __doc__)
    common.check_config(cfg, RULES, RELATIONS, PATHS)
    letters, run_loader = chosen(cfg["benchmarks"])
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    dev = cfg["device"]
    cuda = dev.startswith("cuda")
    if not cfg["embed_batch_tokens"]:
        import embed_captions
        cfg["embed_batch_tokens"] = embed_captions.default_batch_tokens(dev)
    if cfg["clock"] == "auto":
        cfg["clock"] = "cpu" if not cuda and cfg["threads"] == 1 else "wall"
    if cfg["clock"] not in ("cpu", "wall"):
        raise ValueError(f"clock={cfg['clock']!r}; expected 'auto', 'cpu' or 'wall'")
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    amp, ctx = common.resolve_dtype(cfg["dtype"], dev)  # post_train's reading: "auto" is float32 on CPU
    text_dtype = amp if cuda else None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else ""
    peak = cfg["peak_flops"] or next((v for k, v in (("H100", 989e12), ("A100", 312e12)) if k in name), 0.0)
    rows, info = [], {"device": f"{dev} {name}".strip(), "threads": cfg["threads"], "env": environment()}

    def row(bench, label, value, unit, flops=None):
        mfu = flops / value / peak if flops and peak else None
        rows.append(dict(bench=bench, name=label, median=value * 1e3 if unit == "ms/step" else value, unit=unit,
                         mfu=mfu, ratios=[]))

    def ratio(what, num, den, floor=None, cmp=None):  # attached to the last row; floor None: a finding, no floor
        r = num / den
        ok = None if floor is None else bool(r <= floor if cmp == "<=" else r >= floor)
        rows[-1]["ratios"].append(dict(ratio=r, of=what, floor="" if floor is None else f"{cmp} {floor}", ok=ok))

    if letters:
        texts, info["captions"] = caption_mix(cfg)
        tok = pipeline.train_tokenizer(texts, cfg["vocab_size"])
        tok.pad_token = tok.eos_token

    if "a" in letters or "b" in letters:
        import post_train
        # --- FLOPs: the paper's text/vision ratio, and the caption length that reproduces it here
        with torch.device("meta"):
            paper_vit = M.VisionTower(cfg["paper_vision"], embed_dim=768).model
            pa = 2 * common.matmul_params(M.Adaptor(cfg["paper_text"]["hidden_size"], 768, 4, 2))  # the adaptor, per caption
        pv = common.vit_flops(paper_vit)
        pt = common.llm_flops(text_encoder(tok, cfg["paper_text"], "meta").model, cfg["paper_caption_tokens"])
        vision = M.VisionTower(cfg["vision_model"], embed_dim=cfg["embed_dim"],
                               gradient_checkpointing=cfg["gradient_checkpointing"], timm_kwargs=cfg["timm_kwargs"]).to(dev)
        fv = common.vit_flops(vision.model)
        enc = text_encoder(tok, text_shape(cfg), dev, text_dtype).eval().requires_grad_(False)
        p = common.matmul_params(enc.model)
        T = cfg["caption_tokens"] or min(range(1, 4097), key=lambda t: abs(common.llm_flops(enc.model, t, p) / fv - pt / pv))
        ft = common.llm_flops(enc.model, T, p)
        info.update(paper_vision_gflops=pv / 1e9, paper_text_gflops=pt / 1e9, paper_ratio=pt / pv,
                    vision_gflops=fv / 1e9, text_gflops=ft / 1e9, ratio=ft / fv, caption_tokens=T, scale=pv / fv,
                    text_params_m=p / 1e6)

        # --- post_train's model, optimizer (layer decay groups) and step; the bare vision tower's
        clip = M.LLM2CLIP(vision, cfg["text_width"], cfg["adaptor_blocks"]).to(dev)
        pcfg = {k: getattr(post_train, k) for k in post_train.config_keys}  # post_train's defaults, every key
        adamw = dict(lr=pcfg["learning_rate"], betas=(pcfg["beta1"], pcfg["beta2"]), eps=pcfg["adam_eps"],
                     fused=None if cfg["fused_adamw"] else False)
        opt_c = common.adamw(post_train.param_groups(clip, pcfg), **adamw)
        from timm.optim import param_groups_layer_decay
        opt_v = common.adamw(param_groups_layer_decay(vision.model, pcfg["weight_decay"],
                                                      layer_decay=pcfg["layer_decay"]), **adamw)
        info["adamw"] = "fused" if opt_c.param_groups[0]["fused"] else "torch's default kernel"
        B = cfg["batch_size"]
        images = torch.randn(B, 3, *vision.model.patch_embed.img_size, device=dev)  # loading images: same for all
        ids = torch.randint(10, len(tok), (B, T), device=dev)
        ones = torch.ones_like(ids)
        tmp = tempfile.TemporaryDirectory()
        records, cache = build_cache(cfg, tmp.name)
        sampler = iter(data.ResumableBatchSampler(len(records), B, seed=cfg["seed"]))

        st = {}  # the text embeddings, from one phase to the next

        def vision_fwd_bwd():
            with ctx:
                loss = vision(images).float().square().mean()
            loss.backward()

        def cache_rows():  # the sampler's records -> caption choice -> cache rows, as data_index.TrainSamples does
            rows_ = []
            for i in next(sampler):
                rng = data.sample_rng(cfg["seed"], 0, i)
                field, slot = data.choose_caption(records[i], rng, pcfg["real_caption_ratio"])
                rows_.append(cache.row(i, field, slot))
            st["text"] = torch.from_numpy(cache.take(rows_).astype(np.float32)).to(dev, non_blocking=True)

        def online_text():
            with torch.no_grad(), ctx:
                st["text"] = enc(ids, ones, ones)

        def clip_fwd_bwd():
            L.grad_cache_step(lambda c: clip(*c), [[(images, st["text"])]],
                              lambda out: L.clip_loss(out["image"], out["llm"], out["logit_scale"]), autocast=ctx)

        def update(model, opt):  # post_train's order: clip, AdamW, zero the grads
            return [("grad clip", lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), pcfg["grad_clip"])),
                    ("AdamW", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))]

        def clamp():
            with torch.no_grad():
                clip.logit_scale.clamp_(max=pcfg["max_logit_scale"])

        phases = {"vision": [("fwd+bwd", vision_fwd_bwd)] + update(vision, opt_v),
                  "cache": [("cache rows", cache_rows), ("fwd+bwd", clip_fwd_bwd)] + update(clip, opt_c)
                  + [("clamp", clamp)],
                  "online": [("text encoder", online_text), ("fwd+bwd", clip_fwd_bwd)] + update(clip, opt_c)
                  + [("clamp", clamp)]}
        if "b" not in letters:
            del phases["online"]
        fns = {k: (lambda ph=ph: [f() for _, f in ph]) for k, ph in phases.items()}
        both = timed(fns, cfg, sync)
        t, info["a_wall"] = both[cfg["clock"]], both["wall"]
        info["phases"] = timed_phases({k: phases[k] for k in ("vision", "cache")}, cfg, sync,
                                      time.process_time if cfg["clock"] == "cpu" else time.perf_counter)
        fa = 2 * common.matmul_params(clip.adaptor)
        # what (a) and (b) would be if time followed FLOPs (training = 3x forward; the text encoder only forward)
        info.update(flops_a=(fv + fa) / fv, flops_b=(3 * (fv + fa) + ft) / (3 * (fv + fa)),
                    paper_flops_a=(pv + pa) / pv, paper_flops_b=(3 * (pv + pa) + pt) / (3 * (pv + pa)))
        row("a", "vision tower alone: fwd+bwd+AdamW", t["vision"], "ms/step", 3 * fv * B)
        row("a", "stage-2 step, text from the cache", t["cache"], "ms/step", 3 * (fv + fa) * B)
        ratio("cache / vision", t["cache"], t["vision"], 1.05, "<=")
        if "b" in letters:
            row("b", "stage-2 step, text encoder online", t["online"], "ms/step", (3 * (fv + fa) + ft) * B)
            ratio("online / cache", t["online"], t["cache"], 3, ">=")
        del enc
        tmp.cleanup()

    if "c" in letters:
        # --- embedding throughput: embed_captions.compare_batching times its token-budget batches against fixed
        # batches in input order, as many as fit the same budget at the longest caption (same memory), and against
        # length-sorted batches of 32 (sentence-transformers' encode); embed_copies repeats the mix (a larger corpus)
        import embed_captions
        if cfg["embed_packed"] and cfg["embed_attn"] != "flash_attention_2":
            raise ValueError("embed_packed=True needs embed_attn='flash_attention_2' (a variable-length kernel); "
                             f"with {cfg['embed_attn']!r} a packed row would pay full attention over all its texts")
        enc = text_encoder(tok, text_shape(cfg, cfg["embed_layers"]), dev, text_dtype,
                           attn=cfg["embed_attn"]).eval().requires_grad_(False)
        corpus = texts * cfg["embed_copies"]
        with ctx:
            c = embed_captions.compare_batching(enc, corpus, cfg["embed_batch_tokens"], cfg["embed_max_length"],
                                                cfg["embed_repeats"], cfg["embed_sorted_batch"], cfg["embed_packed"])
        n = embed_captions.text_lengths(enc, corpus, max_length=cfg["embed_max_length"])
        info.update(embed_n=len(corpus), embed_layers=enc.model.config.num_hidden_layers, embed_mean=n.mean(),
                    embed_max=n.max(), embed_diff=c["max_rel_diff"], embed_padded=c["padded"], embed_tokens=c["tokens"],
                    embed_fixed_batch=max(1, cfg["embed_batch_tokens"] // int(n.max())))
        w, info["embed_wall"] = c[cfg["clock"]], c["wall"]
        row("c", f"embed: fixed batches of {info['embed_fixed_batch']}, in order", len(corpus) / w["fixed"], "captions/s")
        row("c", f"embed: length-sorted batches of {cfg['embed_sorted_batch']}", len(corpus) / w["sorted_fixed"],
            "captions/s")
        row("c", f"embed: length-sorted, {cfg['embed_batch_tokens']}-token batches", len(corpus) / w["sorted"],
            "captions/s")
        ratio("sorted / fixed", w["fixed"], w["sorted"], 2, ">=")
        ratio(f"sorted / sorted {cfg['embed_sorted_batch']}", w["sorted_fixed"], w["sorted"])
        if cfg["embed_packed"]:
            row("c", f"embed: packed, {cfg['embed_batch_tokens']}-token rows, varlen", len(corpus) / w["packed"],
                "captions/s")
            ratio("packed / sorted", w["sorted"], w["packed"])
        del enc

    if "d" in letters:
        # --- stage-1 peak memory and step time, minus the memory of a baseline process doing a 1-pair step
        G, C = cfg["mem_global_batch"], cfg["mem_chunk"]
        runs = {v: [] for v in ("baseline", "plain_chunk", "plain_global", "grad_cache")}
        for _ in range(cfg["mem_repeats"]):
            for v in runs:
                runs[v].append(peak_mib(v, cfg))
        info["mem_baseline"] = base = statistics.median(r["PEAK_MIB"] for r in runs["baseline"])
        m = {v: statistics.median(r["PEAK_MIB"] for r in x) - base for v, x in runs.items()}
        s_ = {v: statistics.median(r["STEP_S"] for r in x) for v, x in runs.items()}
        info["mem_step_ms"] = {v: 1e3 * x for v, x in s_.items()}
        row("d", f"stage 1: plain batch {C}", m["plain_chunk"], "MiB")
        row("d", f"stage 1: plain batch {G}", m["plain_global"], "MiB")
        row("d", f"stage 1: batch {G}, grad cache, chunks of {C}", m["grad_cache"], "MiB")
        ratio(f"grad cache / plain {G}", m["grad_cache"], m["plain_global"], 0.5, "<=")
        ratio(f"grad cache / plain {C}", m["grad_cache"], m["plain_chunk"], 1.5, "<=")
        row("d", f"stage 1: plain batch {G}, step time", s_["plain_global"], "ms/step")
        row("d", f"stage 1: batch {G}, grad cache, step time", s_["grad_cache"], "ms/step")
        ratio(f"grad cache / plain {G}", s_["grad_cache"], s_["plain_global"])  # the extra forward: ~4/3 by FLOPs
        # --- one embed_captions.py rank embedding (c)'s captions (a width-text_width 1-layer model), peak memory
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
                pipeline.build_tiny_text_model(f"{tmp}/llm", texts=texts, hidden_size=cfg["text_width"], num_layers=1,
                                               num_heads=cfg["text_heads"], intermediate_size=cfg["text_ffn"])
            data.write_manifest(f"{tmp}/captions.jsonl", [{"id": str(i), "captions": [t]} for i, t in enumerate(texts)])
            e = [child("bench.embed_memory_child(json.loads(sys.argv[1]), *sys.argv[2:])", json.dumps(cfg),
                       f"{tmp}/llm", f"{tmp}/captions.jsonl", f"{tmp}/cache{r}") for r in range(cfg["mem_repeats"])]
        info["embed_total_mib"] = statistics.median(x["TOTAL_MIB"] for x in e)
        row("d", f"embed_captions.py, one rank, {len(texts)} captions", statistics.median(x["PEAK_MIB"] for x in e),
            "MiB")

    if run_loader:
        loader_bench(cfg, row, ratio, info)

    info["env"]["load_end"] = os.getloadavg()
    info["env"]["end"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print_report(rows, info, cfg, peak)
    return {"rows": rows, "info": info, "config": cfg}


def print_report(rows, info, cfg, peak):
    e = info["env"]
    print(f"device {info['device']}, {info['threads']} CPU thread(s) (torch.get_num_threads() {e['torch_threads']}) "
          f"of {e['cores']} cores ({e['cpu']}); torch {e['torch']}, python {e['python']}")
    print(f"load average (1, 5, 15 min) at start {' '.join(f'{x:.2f}' for x in e['load_start'])} ({e['start']}), at "
          f"end {' '.join(f'{x:.2f}' for x in e.get('load_end', ()))} ({e.get('end', '?')})")
    if chosen(cfg["benchmarks"])[0]:
        print(f"medians of {cfg['repeats']} repeats x {cfg['steps']} steps (a, b), {cfg['embed_repeats']} passes (c), "
              f"{cfg['mem_repeats']} processes per variant (d); times (a-d) in {cfg['clock']} time"
              + ("" if cfg["clock"] == "wall" else " (process CPU seconds: the work, not the other tenants' share)"))
    if "a_wall" in info and cfg["clock"] != "wall":
        print("wall ms/step (a, b): " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in info["a_wall"].items())
              + (f"; wall captions/s (c): " + ", ".join(f"{k} {info['embed_n'] / v:.1f}" for k, v in
                                                       info["embed_wall"].items()) if "embed_wall" in info else ""))
    if "scale" in info:
        print(f"paper: ViT-L/14-224 {info['paper_vision_gflops']:.1f} GFLOPs/image, Llama-3-8B-shaped "
              f"{info['paper_text_gflops']:.0f} GFLOPs/caption ({cfg['paper_caption_tokens']} tokens): text/vision "
              f"{info['paper_ratio']:.2f}")
        print(f"here:  ViT {info['vision_gflops']:.3f} GFLOPs/image, text ({info['text_params_m']:.2f}M matmul "
              f"params, {info['caption_tokens']} tokens) {info['text_gflops']:.3f} GFLOPs/caption: text/vision "
              f"{info['ratio']:.2f}; both scaled down {info['scale']:.0f}x; batch {cfg['batch_size']}")
        print(f"if time followed FLOPs: cache/vision {info['flops_a']:.3f}x here, {info['paper_flops_a']:.3f}x at "
              f"the paper's scale; online/cache {info['flops_b']:.2f}x here, {info['paper_flops_b']:.2f}x there")
        print(f"(a) phases, ms (each synchronised; AdamW {info['adamw']}): " + "; ".join(
            f"{k}: " + ", ".join(f"{p} {v:.2f}" for p, v in ph.items()) for k, ph in info["phases"].items()))
    if "embed_n" in info:
        p, n = info["embed_padded"], info["embed_tokens"]
        print(f"embed: {info['embed_n']} captions ({cfg['embed_copies']} x the mix), {info['captions']}; "
              f"{info['embed_layers']}-layer text encoder; tokens mean {info['embed_mean']:.0f}, max {info['embed_max']}; "
              f"padded tokens / unpadded: fixed {p['fixed'] / n:.2f}x, sorted {cfg['embed_sorted_batch']} "
              f"{p['sorted_fixed'] / n:.2f}x, token-budget {p['sorted'] / n:.2f}x; {cfg['embed_attn']}; embeddings max relative "
              f"difference {info['embed_diff']:.1e}")
    if "mem_baseline" in info:
        kind = "CUDA allocated" if info["device"].startswith("cuda") else "RSS"
        print(f"memory: peak {kind} above a baseline process of {info['mem_baseline']:.0f} MiB; LoRA decoder width "
              f"{cfg['mem_width']}, {cfg['mem_layers']} layers, {cfg['mem_max_length']} tokens; step ms (median of "
              f"steps 2..{cfg['mem_steps']}): " + ", ".join(f"{k} {v:.1f}" for k, v in info["mem_step_ms"].items()))
        print(f"embed_captions.py: peak above the process after a 1-line warm-up run (libraries loaded); the "
              f"process's whole peak {kind} {info['embed_total_mib']:.0f} MiB; text_width {cfg['text_width']}, 1 layer, "
              f"{cfg['embed_batch_tokens']}-token batches")
    if "loader" in info:
        lo, c = info["loader"], cfg["clock"]
        ours, ref = lo["rates"]["ours"], lo["rates"][lo["ref"]]
        print(f"loader: {ours[c]:.1f} img/s, {lo['ref']}: {ref[c]:.1f} img/s, ours / {lo['ref']} {ours[c] / ref[c]:.2f}x "
              f"({c} clock{': images per CPU second of the loader and its workers' if c == 'cpu' else ''}; wall: "
              f"{ours['wall']:.1f} vs {ref['wall']:.1f} img/s); {lo['samples']} records, {lo['source']}; "
              f"image_size {cfg['image_size']}, batch {cfg['loader_batch']}, {cfg['num_workers']} workers, "
              f"{cfg['loader_batches']} batches x {cfg['loader_repeats']} repeats, jpeg_draft={cfg['jpeg_draft']}")
        print(f"loader profile (ours, one process, {c} ms per sample): "
              + ", ".join(f"{k} {v:.3f}" for k, v in lo["profile"].items()) + f"; sum {sum(lo['profile'].values()):.3f}")
    head = f"    {'':47}{'median':>10} {'unit':<11}{'ratio':>7}  {'of':<24}{'floor':<13}{'MFU' if peak else ''}"
    print(head.rstrip())
    for r in rows:
        rats = [f"{x['ratio']:6.2f}x  {x['of']:<24}{x['floor']:<9}{({True: 'ok', False: 'MISS'}.get(x['ok'], '')):<4}"
                for x in r["ratios"]] or [" " * 46]
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else ""
        print(f"({r['bench']}) {r['name']:<47}{r['median']:10.1f} {r['unit']:<11}{rats[0]}{mfu}".rstrip())
        for x in rats[1:]:
            print((" " * 74 + x).rstrip())


if __name__ == "__main__":
    common.run_main(main)
