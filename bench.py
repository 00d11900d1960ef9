"""The paper's efficiency claims as measured ratios, side by side in one run (nanoGPT's bench.py idea:
the core of each loop copied out and timed; medians over repeats, variants interleaved so that load
drift on a shared machine hits them alike).

  (a) stage-2 step with text from the on-disk cache (cache reads, adaptor, gathered clip_loss, AdamW)
      vs the bare vision tower forward+backward+AdamW at the same batch: the text side's overhead.
  (b) the same step with the frozen text encoder run online, the text encoder shaped so that its FLOPs
      per caption over the ViT's FLOPs per image are Llama-3-8B's over ViT-L/14-224's at the paper's
      settings (both scaled down by the same, printed, factor).
  (c) caption embedding throughput: length-sorted token-budget batches vs fixed-size batches padded to
      their longest caption in dataset order, on real COCO + DOCCI captions; same embeddings.
  (d) stage-1 peak memory at global batch 256, each variant in a fresh subprocess minus a baseline
      process: gradient caching in chunks of 32 vs plain batch 256 vs plain batch 32.

python bench.py                         # tiny CPU models (a few minutes on 2 cores)
python bench.py config/bench_gpu.py     # ViT-L/14-224 + a Llama-3-8B-shaped text encoder, with MFU
"""
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn

import common
import model as M
import pipeline

# -----------------------------------------------------------------------------
# config: tiny CPU models by default; config/bench_gpu.py has the paper's sizes
benchmarks = "abcd"  # which of (a)-(d) to run
device = "auto"  # cuda if available, else cpu
dtype = "bfloat16"  # autocast dtype on GPU (and the frozen text encoder's weights); CPU always runs float32
threads = 1  # CPU threads: one thread keeps medians steady on a shared machine
seed = 0
repeats = 5  # timed repeats per variant; the table shows medians
warmup = 2  # untimed steps per variant first
steps = 3  # steps per timed repeat
peak_flops = 0.0  # for MFU; 0: bf16 dense peak by device name (H100 989e12, A100 312e12)
# stage 2 (a, b)
batch_size = 32
vision_model = "vit_tiny_patch16_224"  # a timm ViT (width 192); vision_kwargs reshape it: 65 tokens, 4 blocks
vision_kwargs = {"img_size": 32, "patch_size": 4, "depth": 4}
embed_dim = 128  # the shared image-text space (the vision head's size)
adaptor_blocks = 4
cache_rows = 4096  # rows of the on-disk embedding cache that the cached step reads from
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
embed_short = 64  # COCO captions
embed_long = 64  # DOCCI descriptions (1:1, like the real + dense captions of a stage-2 manifest)
embed_layers = 2  # the text encoder above with this many layers (0: all); fewer keeps the CPU run short
embed_repeats = 3
embed_batch_size = 32  # fixed batches
embed_token_budget = 4096  # sorted batches: padded tokens per batch
embed_max_length = 512
vocab_size = 2000  # BPE tokenizer trained offline on the captions
# stage-1 memory (d)
mem_global_batch = 256
mem_chunk = 32
mem_max_length = 128  # long-ish so activations dominate
mem_width = 64
mem_layers = 2
mem_repeats = 2  # subprocesses per variant; medians
# -----------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = {k: v for k, v in globals().items() if k.islower() and isinstance(v, (int, float, str, dict))}


# --- FLOPs (forward, per item): 2 per matmul weight per token + attention's two T x T products

def matmul_params(module):
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def vit_flops(vit):
    """timm VisionTransformer, per image."""
    T = vit.patch_embed.num_patches + vit.num_prefix_tokens
    per_token = matmul_params(vit.blocks) + matmul_params(vit.patch_embed)
    return 2 * per_token * T + 4 * len(vit.blocks) * T * T * vit.embed_dim + 2 * matmul_params(vit.head)


def llm_flops(llm, T):
    """HF decoder (no LM head), per caption of T tokens."""
    c = llm.config
    return 2 * matmul_params(llm) * T + 4 * c.num_hidden_layers * T * T * c.hidden_size


def llama(cfg, vocab, dev="cpu", dtype=None, **shape):
    """A random Llama-shaped model built in place on `dev` (meta: shape only)."""
    from transformers import AutoModel, LlamaConfig
    conf = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, attn_implementation="sdpa", **shape)
    with torch.device(dev):
        return AutoModel.from_config(conf, dtype=dtype) if dtype else AutoModel.from_config(conf)


def text_shape(cfg, prefix="text", layers=0):
    if prefix == "mem":
        w = cfg["mem_width"]
        return dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=cfg["mem_layers"],
                    num_attention_heads=4, num_key_value_heads=2)
    return dict(hidden_size=cfg["text_width"], intermediate_size=cfg["text_ffn"], num_hidden_layers=layers or cfg["text_layers"],
                num_attention_heads=cfg["text_heads"], num_key_value_heads=cfg["text_kv_heads"])


def text_encoder(cfg, tokenizer, dev, dtype=None, prefix="text", layers=0):
    llm = llama(cfg, len(tokenizer) + 32, dev, dtype, **text_shape(cfg, prefix, layers))
    return M.TextEncoder(M.enable_bidirectional(llm), tokenizer)


# --- data

def caption_mix(cfg):
    """Short COCO captions + long DOCCI descriptions from shared/data (synthetic lengths if absent), shuffled."""
    rng = random.Random(cfg["seed"])
    d, root = HERE, None
    while d != os.path.dirname(d) and root is None:
        root = os.path.join(d, "shared", "data") if os.path.isdir(os.path.join(d, "shared", "data")) else None
        d = os.path.dirname(d)
    if root:
        def read(rel):
            with open(os.path.join(root, rel)) as f:
                return [c for line in f if line.strip() for c in json.loads(line)["captions"]]
        short, long = read("captions/coco_dev.jsonl"), read("long_captions/docci_test100.jsonl")
        source = "COCO captions + DOCCI descriptions (shared/data)"
    else:  # word counts like COCO (~11) and DOCCI (~160)
        words = "a the red dog man street table two of on with near small large white blue and is".split()
        short = [" ".join(rng.choices(words, k=max(3, int(rng.gauss(11, 3))))) for _ in range(cfg["embed_short"])]
        long = [" ".join(rng.choices(words, k=max(40, int(rng.gauss(160, 70))))) for _ in range(cfg["embed_long"])]
        source = "synthetic lengths (shared/data not found)"
    texts = short[:cfg["embed_short"]] + long[:cfg["embed_long"]]
    rng.shuffle(texts)
    return texts, source


def token_budget_batches(lengths, budget):
    """Index lists, longest first, each with len(batch) * its longest length <= budget (at least one item)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + [cur] if cur else batches


# --- timing

def timed(fns, cfg, sync):
    """fns: name -> step(). Median seconds per step over `repeats`, variants interleaved per repeat."""
    for f in fns.values():
        for _ in range(cfg["warmup"]):
            f()
    times = {k: [] for k in fns}
    for _ in range(cfg["repeats"]):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(cfg["steps"]):
                f()
            sync()
            times[k].append((time.perf_counter() - t0) / cfg["steps"])
    return {k: statistics.median(v) for k, v in times.items()}


# --- stage-1 memory (d): one variant per fresh process

def grad_cache_step(encode, q_ids, d_ids, loss_fn, chunk):
    """Gradient caching (GradCache): embed the global batch in chunks without a graph, take the loss and its
    gradient w.r.t. the embeddings, then re-run each chunk with a graph and backpropagate that gradient.
    Same gradient as the plain step, with the activations of one chunk."""
    with torch.no_grad():
        q = torch.cat([encode(x) for x in q_ids.split(chunk)])
        d = torch.cat([encode(x) for x in d_ids.split(chunk)])
    q.requires_grad_(True)
    d.requires_grad_(True)
    loss = loss_fn(q, d)
    loss.backward()
    for ids, g in ((q_ids, q.grad), (d_ids, d.grad)):
        for x, gx in zip(ids.split(chunk), g.split(chunk)):
            encode(x).backward(gx)
    return loss.detach()


def memory_child(variant, cfg):
    """Build the stage-1 model, run two steps of `variant`, print the peak memory in MiB (max RSS on CPU)."""
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    dev = cfg["device"]
    tok = pipeline.train_tokenizer(["a red circle on a white background", "two dogs near the street"] * 4, 256)
    enc = text_encoder(cfg, tok, dev, prefix="mem").train()
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-4)
    G, T = cfg["mem_global_batch"], cfg["mem_max_length"]
    ids = torch.randint(10, len(tok), (2, G, T), device=dev)  # queries, positives: full-length captions
    ones = torch.ones(T, dtype=torch.long, device=dev)

    def encode(x):
        return enc(x, ones.expand_as(x), ones.expand_as(x))

    def plain(b):
        M.caption_contrastive_loss(encode(ids[0, :b]), encode(ids[1, :b])).backward()

    run = {"baseline": lambda: plain(1), "plain_global": lambda: plain(G), "plain_chunk": lambda: plain(cfg["mem_chunk"]),
           "grad_cache": lambda: grad_cache_step(encode, ids[0], ids[1], M.caption_contrastive_loss, cfg["mem_chunk"])}[variant]
    for _ in range(2):
        run()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"PEAK_MIB {peak:.2f}")


def peak_mib(variant, cfg):
    code = "import sys, json, bench; bench.memory_child(sys.argv[1], json.loads(sys.argv[2]))"
    r = subprocess.run([sys.executable, "-c", code, variant, json.dumps(cfg)], cwd=HERE, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"memory subprocess {variant} failed:\n{r.stderr[-2000:]}")
    return float(r.stdout.split("PEAK_MIB")[-1])


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = common.configure(DEFAULTS, argv, __doc__)
    dev = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cfg["device"] = dev
    cuda = dev.startswith("cuda")
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    amp_dtype = M._resolve_dtype(cfg["dtype"]) if cuda else torch.float32
    ctx = torch.autocast("cuda", dtype=amp_dtype) if cuda and amp_dtype != torch.float32 else nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = cfg["peak_flops"] or ({"H100": 989e12, "A100": 312e12}.get(next(
        (k for k in ("H100", "A100") if cuda and k in torch.cuda.get_device_name()), ""), 0.0))
    rows, info = [], {"device": dev, "threads": cfg["threads"]}

    def row(bench, name, value, unit, flops=None):
        mfu = flops / value / peak if (flops and peak and unit == "ms/step") else None
        rows.append(dict(bench=bench, name=name, median=value * (1e3 if unit == "ms/step" else 1), unit=unit, mfu=mfu,
                         ratios=[]))

    def ratio(what, num, den, floor, cmp):  # attached to the last row
        r = num / den
        rows[-1]["ratios"].append(dict(ratio=r, of=what, floor=f"{cmp} {floor}",
                                       ok=bool(r <= floor if cmp == "<=" else r >= floor)))

    # --- the caption mix + tokenizer (c), the text encoder (b, c)
    texts, info["captions"] = caption_mix(cfg)
    tok = pipeline.train_tokenizer(texts, cfg["vocab_size"])
    tok.pad_token = tok.eos_token
    text_dtype = amp_dtype if cuda else None
    enc = text_encoder(cfg, tok, dev, text_dtype).eval().requires_grad_(False) if "b" in cfg["benchmarks"] else None

    if "a" in cfg["benchmarks"] or "b" in cfg["benchmarks"]:
        # --- FLOPs: the paper's text/vision ratio, and the caption length that reproduces it here
        with torch.device("meta"):
            paper_vit = M.VisionTower(cfg["paper_vision"], embed_dim=768).model
        paper_llm = llama(cfg, 32, "meta", **cfg["paper_text"])
        pv, pt = vit_flops(paper_vit), llm_flops(paper_llm, cfg["paper_caption_tokens"])
        vision = M.VisionTower(cfg["vision_model"], embed_dim=cfg["embed_dim"], **cfg["vision_kwargs"]).to(dev)
        fv = vit_flops(vision.model)
        T = cfg["caption_tokens"] or (min(range(1, 4097), key=lambda t: abs(llm_flops(enc.model, t) / fv - pt / pv))
                                      if enc is not None else 0)
        ft = llm_flops(enc.model, T) if enc is not None else 0.0
        info.update(paper_vision_gflops=pv / 1e9, paper_text_gflops=pt / 1e9, paper_ratio=pt / pv, vision_gflops=fv / 1e9,
                    text_gflops=ft / 1e9, ratio=ft / fv, caption_tokens=T, scale=pv / fv,
                    text_params_m=matmul_params(enc.model) / 1e6 if enc is not None else 0)

        # --- the two models, optimizers, inputs, and the on-disk cache
        clip = M.LLM2CLIP(vision, cfg["text_width"], cfg["adaptor_blocks"]).to(dev)
        opt_v = torch.optim.AdamW(vision.parameters(), lr=1e-5, weight_decay=0.05, fused=True)
        opt_c = torch.optim.AdamW(clip.parameters(), lr=1e-5, weight_decay=0.05, fused=True)
        B, size = cfg["batch_size"], vision.model.patch_embed.img_size
        images = torch.randn(B, 3, *size, device=dev)  # image loading is the same for every variant: left out
        tmp = tempfile.TemporaryDirectory()
        path = os.path.join(tmp.name, "embeddings.npy")
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(cfg["cache_rows"], cfg["text_width"]))
        arr[:] = np.random.default_rng(0).standard_normal(arr.shape).astype(np.float16)
        arr.flush()
        del arr
        cache = np.load(path, mmap_mode="r")
        rng = np.random.default_rng(cfg["seed"])
        ids = torch.randint(10, len(tok), (B, max(T, 1)), device=dev)
        ones = torch.ones_like(ids)

        def vision_step():
            with ctx:
                loss = vision(images).float().square().mean()
            loss.backward()
            opt_v.step()
            opt_v.zero_grad(set_to_none=True)

        def clip_step(text):
            with ctx:
                img, txt, scale = clip(images, text)
                loss = M.clip_loss(img, txt, scale)
            loss.backward()
            opt_c.step()
            opt_c.zero_grad(set_to_none=True)
            with torch.no_grad():
                clip.logit_scale.clamp_(max=math.log(100))

        def cached_step():
            rows_ = rng.integers(0, cfg["cache_rows"], B)  # a sampler's records x caption choice -> cache rows
            clip_step(torch.from_numpy(cache[rows_].astype(np.float32)).to(dev, non_blocking=True))

        def online_step():
            with torch.no_grad(), ctx:
                text = enc(ids, ones, ones)
            clip_step(text)

        fns = {"vision": vision_step, "cache": cached_step}
        if "b" in cfg["benchmarks"]:
            fns["online"] = online_step
        t = timed(fns, cfg, sync)
        fa = sum(2 * p.numel() for p in clip.adaptor.parameters() if p.dim() > 1)
        row("a", "vision tower alone: fwd+bwd+AdamW", t["vision"], "ms/step", 3 * fv * B)
        row("a", "stage-2 step, text from the cache", t["cache"], "ms/step", 3 * (fv + fa) * B)
        ratio("cache / vision", t["cache"], t["vision"], 1.10, "<=")
        if "b" in cfg["benchmarks"]:
            row("b", "stage-2 step, text encoder online", t["online"], "ms/step", (3 * (fv + fa) + ft) * B)
            ratio("online / cache", t["online"], t["cache"], 3, ">=")
        tmp.cleanup()

    if "c" in cfg["benchmarks"]:
        # --- embedding throughput: fixed batches padded in dataset order vs token-budget length-sorted batches
        L, outs = cfg["embed_max_length"], {}
        enc = text_encoder(cfg, tok, dev, text_dtype, layers=cfg["embed_layers"]).eval().requires_grad_(False)

        def embed(batches, name):
            out = torch.empty(len(texts), enc.dim)
            for idx in batches:
                b = {k: v.to(dev) for k, v in enc.tokenize([texts[i] for i in idx], max_length=L).items()}
                with torch.no_grad(), ctx:
                    out[idx] = enc(**b).float().cpu()
            outs[name] = out

        def fixed():
            n = cfg["embed_batch_size"]
            embed([list(range(i, min(i + n, len(texts)))) for i in range(0, len(texts), n)], "fixed")

        def budget():  # lengths are part of its cost
            lengths = [min(len(x) + 1, L) for x in tok(texts, add_special_tokens=False)["input_ids"]]  # + BOS
            embed(token_budget_batches(lengths, cfg["embed_token_budget"]), "budget")

        t = timed({"fixed": fixed, "budget": budget}, {**cfg, "warmup": 0, "steps": 1, "repeats": cfg["embed_repeats"]}, sync)
        diff = (outs["fixed"] - outs["budget"]).abs().max().item()
        lengths = [len(x) + 1 for x in tok(texts, add_special_tokens=False)["input_ids"]]
        info.update(embed_n=len(texts), embed_layers=enc.model.config.num_hidden_layers, embed_mean_tokens=statistics.mean(lengths), embed_max_tokens=max(lengths),
                    embed_max_abs_diff=diff)
        row("c", f"embed, fixed batches of {cfg['embed_batch_size']}, padded", len(texts) / t["fixed"], "captions/s")
        row("c", f"embed, length-sorted, {cfg['embed_token_budget']}-token budget", len(texts) / t["budget"], "captions/s")
        ratio("sorted / fixed", len(texts) / t["budget"], len(texts) / t["fixed"], 2, ">=")

    if "d" in cfg["benchmarks"]:
        # --- stage-1 peak memory above a baseline process (imports, model, optimizer, a 1-pair step)
        G, C = cfg["mem_global_batch"], cfg["mem_chunk"]
        variants = ["baseline", "plain_chunk", "plain_global", "grad_cache"]
        mib = {v: [] for v in variants}
        for _ in range(cfg["mem_repeats"]):
            for v in variants:
                mib[v].append(peak_mib(v, cfg))
        base = statistics.median(mib["baseline"])
        m = {v: statistics.median(x) - base for v, x in mib.items()}
        info["mem_baseline_mib"] = base
        row("d", f"stage 1, plain batch {C}", m["plain_chunk"], "MiB")
        row("d", f"stage 1, plain batch {G}", m["plain_global"], "MiB")
        row("d", f"stage 1, batch {G}, grad cache (chunks of {C})", m["grad_cache"], "MiB")
        ratio(f"grad cache / plain {G}", m["grad_cache"], m["plain_global"], 0.5, "<=")
        ratio(f"grad cache / plain {C}", m["grad_cache"], m["plain_chunk"], 1.5, "<=")

    print_report(rows, info, cfg, peak)
    return {"rows": rows, "info": info}


def print_report(rows, info, cfg, peak):
    print(f"device {info['device']}, {info['threads']} CPU thread(s); medians of {cfg['repeats']} repeats")
    if "scale" in info:
        print(f"paper: ViT-L/14-224 {info['paper_vision_gflops']:.1f} GFLOPs/image, Llama-3-8B-shaped "
              f"{info['paper_text_gflops']:.0f} GFLOPs/caption ({cfg['paper_caption_tokens']} tokens): text/vision "
              f"{info['paper_ratio']:.2f}")
        print(f"here:  vision {info['vision_gflops']:.3f} GFLOPs/image, text ({info['text_params_m']:.1f}M matmul params, "
              f"{info['caption_tokens']} tokens) {info['text_gflops']:.3f} GFLOPs/caption: text/vision "
              f"{info['ratio']:.2f}; scaled down {info['scale']:.0f}x")
    if "embed_n" in info:
        print(f"captions: {info['embed_n']} from {info['captions']}, {info['embed_layers']}-layer text encoder; tokens mean {info['embed_mean_tokens']:.0f}, "
              f"max {info['embed_max_tokens']}; sorted vs fixed embeddings max |diff| {info['embed_max_abs_diff']:.1e}")
    if "mem_baseline_mib" in info:
        print(f"memory: peak {'CUDA allocated' if info['device'].startswith('cuda') else 'RSS'} above a baseline "
              f"process of {info['mem_baseline_mib']:.0f} MiB; width {cfg['mem_width']}, {cfg['mem_layers']} layers, "
              f"{cfg['mem_max_length']} tokens")
    print(f"{'':4}{'':46}{'median':>10} {'unit':<11}{'ratio':>7}  {'of':<22}{'floor':<9}{'':4}" + ("  MFU" if peak else ""))
    for r in rows:
        rats = [f"{x['ratio']:6.2f}x  {x['of']:<22}{x['floor']:<9}{'ok' if x['ok'] else 'MISS':<4}"
                for x in r["ratios"]] or [" " * 45]
        mfu = f"  {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        print(f"({r['bench']}) {r['name']:<46}{r['median']:10.1f} {r['unit']:<11}{rats[0]}{mfu}")
        for x in rats[1:]:
            print(" " * 73 + x)


if __name__ == "__main__":
    main()
