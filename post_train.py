"""Stage 2 of LLM2CLIP: post-train a CLIP vision tower against cached LLM caption embeddings.

The vision tower is fully trainable; the text side is the stage-1 LLM's embedding of each caption,
read from the embed_captions.py cache (or computed online by the frozen LLM, text_source="online"),
passed through a small trainable adaptor. Loss: CLIP's symmetric InfoNCE over the whole global batch
(features gathered across ranks with gradient; gradient caching when a rank's share of the batch does
not fit one forward pass).

    python post_train.py config/post_tiny_cpu.py
    torchrun --nproc_per_node=8 post_train.py config/post_clip_vitl14_224.py --cache_dir=... --out_dir=...

Outputs in out_dir: checkpoints/step_*.pt (exact resume with resume=True), vision_tower.pt (timm state
dict), adaptor.pt, llm2clip.json (read by model.load_llm2clip), metrics.jsonl, post_train.log,
run_post_train.json (config + code version). The training index (data.build_train_index: built on first
use, then reused) lives beside the cache, or in out_dir/train_index, or where --train_index says.
"""
import contextlib
import glob
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import common
import data
import evaluate
import model as M

# -----------------------------------------------------------------------------
# default config (override with config/*.py files and --key=value)
# I/O
out_dir = "out/post"
train_manifest = ""  # JSONL: {"image": rel/path, "captions": [...], "long_captions": [...]} per line
image_root = ""  # folder the manifest's image paths are relative to ("" = the manifest's folder)
train_shards = ""  # instead of a manifest: WebDataset tar shards, "dir/{00000..00099}.tar" or globs
cache_dir = ""  # embed_captions.py output for the training records (same records, same order)
train_index = ""  # training index folder (data.build_train_index): "" = beside the cache, else in out_dir
val_manifest = ""  # held-out manifest for the periodic retrieval eval ("" = no eval)
val_image_root = ""  # "" = the val manifest's folder
val_cache_dir = ""  # cache of the val captions; "" = embed them once at start with the frozen LLM
eval_field = "captions"  # caption field scored in the eval: "captions" (short) or "long_captions"
eval_interval = 1000  # steps between evals (also at the end)
eval_batch_size = 256
# text side
text_source = "cache"  # "cache" (the paper's offline trick) or "online" (frozen LLM in the loop, Table 11)
text_model = ""  # stage-1 encoder (cc_finetune out_dir); "" = the one recorded in the cache
# how captions are embedded (online and for the val captions): unset = the cache's record, else the
# encoder's own (encoder.json, else bidirectional, mean, no instruction/template, 512). A value that
# differs from the cache's record is refused with text_source="cache" (the rows were made otherwise).
bidirectional = None  # None = as recorded; False keeps a decoder causal (Table 11 rows with a raw LLM)
pooling = ""  # "mean" | "eos"
instruction = ""  # captions are documents: none unless the cache used one
max_length = 0  # 0 = as recorded, else 512
chat_template = ""  # "none" | "llama3" (the official embedding extraction's wrapping)
# model
vision_model = "vit_large_patch14_clip_224.openai"  # any timm name
pretrained = True  # timm's pretrained weights (when the machine has them)
vision_weights = ""  # local state dict file instead of hub weights
timm_kwargs = {}  # extra timm.create_model kwargs (img_size, depth, ...), recorded for reloading
embed_dim = 1280  # new projection head of this size (official code: 1280); -1 keeps the model's own head
adaptor = "linear"  # "linear": MLP adaptor on the pooled embedding; "transformer": over token states (online only, Table 8)
adaptor_blocks = 4  # residual MLP blocks in the adaptor (Table 8: 0, 1, 2, 4); transformer: its layers (x1 in Table 8)
adaptor_expansion = 2  # MLP width / input width (the transformer's paper-sized MLP: 4)
# ablations of the text side (Tables 10, 11): which text towers train against the images
losses = "a"  # a: LLM only (default) | direct: CLIP-T only | b: LLM + CLIP-T | c: b + CL(CLIP-T, LLM) | d: Cat head
clip_text = ""  # CLIP/SigLIP folder or hub name, or open_clip:NAME/PRETRAINED: its text tower (CLIP-T) joins stage 2
clip_text_trainable = True  # CLIP-T fine-tunes at learning_rate; False keeps it frozen
text_lora_r = 0  # > 0: trainable LoRA of this rank on the stage-1 LLM (text_source="online" only, Table 11)
text_lora_lr = 1e-4  # the LoRA's own peak learning rate (same schedule)
# the pretrained CLIP's own logit scale (OpenAI and EVA02-CLIP: ln(100), at the clamp): the official run
# loads it with the checkpoint, but timm's vision-only weights lack it, so it is set here (presets too);
# ln(1/0.07) (x14.3, CLIP's init) only for a tower trained from scratch
logit_scale_init = math.log(100)
max_logit_scale = math.log(100)  # clamp after each step, like CLIP
logit_scale_lr = 0.0  # the scale's own peak lr (same warm-up/cosine schedule); 0 = learning_rate (official)
gradient_checkpointing = True  # recompute ViT activations in backward: larger batches per GPU
compile = False  # torch.compile the model
# data
real_caption_ratio = 0.5  # probability of the real caption; else one of the long captions (Table 7)
crop_scale = (0.9, 1.0)  # RandomResizedCrop scale range (mild: captions describe the whole image)
batch_size = 4096  # global batch (all ranks): the number of in-batch negatives
micro_batch_size = 0  # images per forward pass per rank; < per-rank batch -> gradient caching. 0 = all
num_workers = 8  # data loader processes per rank
skip_bad_images = False  # False: a missing/corrupt image stops the run naming it; True: skip + count
# optimisation
learning_rate = 1e-5
min_lr = 0.0  # cosine decays to this
weight_decay = 0.05  # not on the logit scale, biases, norms, position/class embeddings
beta1, beta2, adam_eps = 0.9, 0.98, 1e-6  # CLIP/EVA-CLIP values
layer_decay = 0.85  # ViT block i gets lr * layer_decay ** (depth - i); embeddings the least
warmup_steps = 500
max_steps = 10000
grad_clip = 5.0  # 0 = off
dtype = "bfloat16"  # autocast dtype on CUDA ("float32" = off); CPU always runs float32
seed = 0
# checkpoints and logging
save_interval = 1000  # steps between checkpoints (also at the end)
keep_checkpoints = 2  # newest checkpoints kept (0 = all)
resume = False  # continue from the newest checkpoint in out_dir/checkpoints
log_interval = 10
peak_flops = 989e12  # per GPU, for the MFU estimate (H100 bf16 dense)
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, dict, type(None)))]
# keys that may change on resume without changing the trajectory
RESUME_FREE_KEYS = {"out_dir", "resume", "max_steps", "save_interval", "keep_checkpoints", "log_interval",
                     "eval_interval", "eval_batch_size", "val_manifest", "val_image_root", "val_cache_dir",
                     "eval_field", "num_workers", "compile", "peak_flops", "image_root", "train_manifest",
                     "train_shards", "cache_dir", "text_model", "text_source", "train_index"}
# -----------------------------------------------------------------------------


def get_lr(it, cfg):
    """Linear warm-up to learning_rate, then cosine down to min_lr at max_steps."""
    if it < cfg["warmup_steps"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_steps"] + 1)
    progress = min(1.0, (it - cfg["warmup_steps"]) / max(1, cfg["max_steps"] - cfg["warmup_steps"]))
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg["learning_rate"] - cfg["min_lr"])


def param_groups(orig_model, cfg):
    """AdamW groups: layer-wise lr decay over the ViT (timm's block grouping), no weight decay on 1-d
    params (biases, norms), embeddings timm lists in no_weight_decay(), and the logit scale."""
    from timm.optim import param_groups_layer_decay
    vit = orig_model.vision.model
    nwd = set(getattr(vit, "no_weight_decay", lambda: set())())
    groups = param_groups_layer_decay(vit, cfg["weight_decay"], nwd, layer_decay=cfg["layer_decay"])
    heads = [p for m in (orig_model.adaptor, orig_model.cat_head, orig_model.clip_text) if m is not None
             for p in m.parameters() if p.requires_grad]  # CLIP-T: when clip_text_trainable
    groups.append({"params": [p for p in heads if p.ndim >= 2], "weight_decay": cfg["weight_decay"], "lr_scale": 1.0})
    groups.append({"params": [p for p in heads if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0})
    # the logit scale: its own lr (logit_scale_lr) through lr_scale, so it follows the same schedule
    lr = cfg.get("learning_rate")
    groups.append({"params": [orig_model.logit_scale], "weight_decay": 0.0,
                   "lr_scale": (cfg.get("logit_scale_lr") or lr) / lr if lr else 1.0})
    if orig_model.text_encoder is not None:  # the LLM's LoRA (text_lora_r > 0), at its own lr
        lora = [p for p in orig_model.text_encoder.parameters() if p.requires_grad]
        groups.append({"params": lora, "weight_decay": 0.0, "lr_scale": cfg["text_lora_lr"] / cfg["learning_rate"]})
    return [g for g in groups if g["params"]]


def optimizer_step(orig_model, optimizer, cfg):
    """Clip the gradient norm, step, zero the gradients, clamp the logit scale to max_logit_scale (CLIP)."""
    if cfg["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(orig_model.parameters(), cfg["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        orig_model.logit_scale.clamp_(max=cfg["max_logit_scale"])


@torch.no_grad()
def embed_images(orig_model, records, data_config, device, batch_size, autocast):
    """L2-normalised image features of `records` with the eval preprocessing (in order)."""
    tf = data.eval_transform(data_config)
    feats = []
    orig_model.eval()
    for s in range(0, len(records), batch_size):
        x = torch.stack([tf(data.open_image(r)) for r in records[s:s + batch_size]]).to(device)
        with autocast:
            feats.append(orig_model.encode_image(x).float())
    orig_model.train()
    return torch.cat(feats)


def save_checkpoint(path, state):
    """Atomic write (temp + rename) with a sha256 sidecar: a run killed mid-save leaves the previous
    checkpoint intact, and a corrupt one is caught at resume (common.load_newest_checkpoint)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    common.save_checkpoint(state, path)


def checkpoint_paths(out_dir):
    """Checkpoints in out_dir, oldest first (zero-padded step numbers sort)."""
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*.pt")))


def checkpoint(out_dir, orig_model, optimizer, step, cfg, bad_images, world_size, master, ddp, keep, data_id):
    """Save everything an exact resume needs (plain types only), on rank 0; prune old ones; barrier."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    per_rank = [None] * world_size
    if ddp:
        dist.all_gather_object(per_rank, (rng, bad_images))
    else:
        per_rank = [(rng, bad_images)]
    path = os.path.join(out_dir, "checkpoints", f"step_{step:08d}.pt")
    if master:
        save_checkpoint(path, {
            "model": orig_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "config": common.jsonable(cfg), "world_size": world_size,
            "rng": {"torch": [r["torch"] for r, _ in per_rank], "cuda": [r["cuda"] for r, _ in per_rank]},
            "bad_images": [list(b) for _, b in per_rank],  # per rank
            "data": data_id, "code_version": common.code_version()})
        for old in checkpoint_paths(out_dir)[:-keep] if keep > 0 else []:
            common.remove_checkpoint(old)
    if ddp:
        dist.barrier()
    return path


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
        src = [os.path.abspath(p) for p in data.expand_shards(cfg["train_shards"])]
    return os.path.join(cfg["cache_dir"], "train_index-" + hashlib.sha256("\0".join(src).encode()).hexdigest()[:12])


def train_data(cfg, rank, world_size, log, uses_llm=True):
    """-> (data.TrainIndex, data.EmbeddingCache or None). Builds the index on first use (ranks share the
    work; the manifest's image files are checked then, unless bad ones are to be skipped at load time),
    then refuses a cache of other captions (naming the first differing record) or of another encoder."""
    shards = data.expand_shards(cfg["train_shards"]) if cfg["train_shards"] else None
    index = data.build_train_index(train_index_dir(cfg), manifest=cfg["train_manifest"] or None,
                                   image_root=cfg["image_root"] or None, shards=shards,
                                   check_images=not cfg["skip_bad_images"], rank=rank, world_size=world_size, log=log)
    cache = None
    if cfg["cache_dir"]:
        cache = data.EmbeddingCache(cfg["cache_dir"], manifest=index, fields=index.used_fields(),
                                    expect={"model": cfg["text_model"]} if cfg["text_model"] else None)
    elif cfg["text_source"] == "cache" and uses_llm:
        raise ValueError(f"text_source='cache' needs cache_dir: run embed_captions.py --manifest={index.records_file}")
    return index, cache


def train_loader(cfg, index, cache, data_config, rank, world_size, step, pin_memory=False):
    """The DataLoader of this rank's batches from global step `step` on (the sampler's order is a function
    of the step only: an exact resume)."""
    train_set = data.TrainSamples(index, data.TrainTransform(data_config, tuple(cfg["crop_scale"])),
                                  cache if cfg["text_source"] == "cache" else None, cfg["seed"],
                                  cfg["real_caption_ratio"], cfg["skip_bad_images"])
    sampler = data.EpochBatchSampler(len(index), cfg["batch_size"], rank, world_size, cfg["seed"], True,
                                     start_step=step, max_steps=max(0, cfg["max_steps"] - step))
    # its own generator: building the iterator must not draw from the global stream a resume restored
    return torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg["num_workers"],
                                       collate_fn=data.collate_train, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(cfg["seed"] + rank))


TEXT_KEYS = ("bidirectional", "pooling", "chat_template", "instruction", "max_length")


def text_settings(cfg, cache):
    """The stage-1 encoder and how the captions are embedded: the cache's record, overridden by the
    text-encoder keys that are set (an override the cache contradicts is an error with text_source=cache)."""
    enc = dict(cache.meta["encoder"]) if cache is not None else {}
    model_path = cfg["text_model"] or enc.get("model") or ""
    if not model_path and cfg["text_source"] == "online":
        raise ValueError("text_source='online' needs text_model (the stage-1 encoder) or a cache_dir that names it")
    out = {"model": os.path.abspath(model_path) if os.path.exists(model_path) else model_path,
           **{k: enc.get(k) for k in TEXT_KEYS}}
    given = {**common.text_encoder_kwargs(cfg), "instruction": cfg["instruction"] or None,
             "max_length": cfg["max_length"] or None}
    for k, v in given.items():
        if v is None:
            continue
        if cache is not None and cfg["text_source"] == "cache" and k in enc and data.encoder_mismatch(enc, {k: v}):
            raise ValueError(f"{k}={v!r}, but the cache {cfg['cache_dir']} was embedded with {k}={enc[k]!r}; "
                             f"rebuild it with embed_captions.py --{k}={v} or drop --{k}")
        out[k] = v
    out["instruction"] = out["instruction"] or None
    out["max_length"] = int(out["max_length"] or 512)
    return out


def load_text_model(text_cfg, device, lora=None):
    """The stage-1 encoder with the settings in text_cfg (None = the encoder's own); lora: see load_text_encoder."""
    return M.load_text_encoder(text_cfg["model"], pooling=text_cfg["pooling"], bidirectional=text_cfg["bidirectional"],
                               chat_template=text_cfg["chat_template"], device=device, lora=lora)


def load_val(cfg, text_cfg, text_encoder, device, need_embeddings=True):
    """(records, texts, their LLM embeddings (N_txt, C) on device or None, text_to_image) for the held-out eval."""
    path, field = cfg["val_manifest"], cfg["eval_field"]
    records = data.read_manifest(path, cfg["val_image_root"] or None, field=field)
    texts = [t for rec in records for t in rec[field]]
    t2i = [r for r, rec in enumerate(records) for _ in rec[field]]
    if not need_embeddings:  # CLIP-T only, or the LLM runs in the model's text side (LoRA, token-level adaptor)
        return records, texts, None, t2i
    if cfg["val_cache_dir"]:
        same = {k: text_cfg[k] for k in ("model",) + TEXT_KEYS if text_cfg[k] is not None}
        vc = data.EmbeddingCache(cfg["val_cache_dir"], manifest=path, fields=[field], expect=same)
        emb = torch.from_numpy(np.concatenate([np.asarray(vc.rows(r, field), np.float32) for r in range(len(records))]))
    else:  # embed once with the frozen stage-1 encoder, then free it
        enc = text_encoder or load_text_model(text_cfg, device)
        emb = enc.encode(texts, text_cfg["instruction"], text_cfg["max_length"])
        del enc
    return records, texts, emb.to(device), t2i


def write_metrics(out_dir, rec):
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def export(out_dir, orig_model, cfg, text_cfg):
    """vision_tower.pt (timm state dict), adaptor.pt, clip_text/ (HF folder), cat_head.pt, text_lora/ (peft
    adapter) as the variant has them, and llm2clip.json, as model.load_llm2clip reads them."""
    vision, adaptor = orig_model.vision, orig_model.adaptor
    common.atomic_torch_save(vision.model.state_dict(), os.path.join(out_dir, "vision_tower.pt"))
    meta = {"vision": {"model_name": vision.model_name, "timm_kwargs": vision.timm_kwargs, "file": "vision_tower.pt"},
            "text_encoders": list(orig_model.text_names), "losses": orig_model.losses,
            "logit_scale": orig_model.logit_scale.exp().item(), "code_version": common.code_version()}
    if adaptor is not None:
        common.atomic_torch_save(adaptor.state_dict(), os.path.join(out_dir, "adaptor.pt"))
        meta["adaptor"] = {**M.adaptor_spec(adaptor), "file": "adaptor.pt"}
        meta["text"] = {"model": text_cfg["model"], **{k: text_cfg.get(k) for k in TEXT_KEYS}}
    if orig_model.text_encoder is not None:  # the LLM's stage-2 LoRA, loaded on top of the stage-1 encoder
        orig_model.text_encoder.model.save_pretrained(os.path.join(out_dir, "text_lora"))
        meta["text"]["lora"] = "text_lora"
    if orig_model.clip_text is not None:
        orig_model.clip_text.save_pretrained(os.path.join(out_dir, "clip_text"))
        meta["clip_text"] = {"dir": "clip_text", "source": cfg["clip_text"]}
    if orig_model.cat_head is not None:
        h = orig_model.cat_head
        common.atomic_torch_save(h.state_dict(), os.path.join(out_dir, "cat_head.pt"))
        meta["cat_head"] = {"llm_dim": h.llm_dim, "clip_dim": h.clip_dim, "out_dim": h.out_dim, "file": "cat_head.pt"}
    common.atomic_write_text(os.path.join(out_dir, M.LLM2CLIP_CONFIG), json.dumps(common.jsonable(meta), indent=2) + "\n")


def main(argv=None):
    # -------------------------------------------------------------------------
    # config, distributed init, run record
    cfg = common.configure({k: globals()[k] for k in config_keys}, argv, __doc__)
    pos = (lambda v: v > 0, "a positive integer")
    common.check_config(cfg, {  # before any data or model is read
        "text_source": (lambda v: v in ("cache", "online"), "'cache' or 'online'"),
        "dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "'float32', 'bfloat16' or 'float16'"),
        "batch_size": pos, "max_steps": (lambda v: v >= 0, "an integer >= 0"), "save_interval": pos,
        "log_interval": pos, "eval_interval": pos, "eval_batch_size": pos,
        "micro_batch_size": (lambda v: v >= 0, "an integer >= 0 (0 = the whole per-rank batch)"),
        "num_workers": (lambda v: v >= 0, "an integer >= 0"),
        "crop_scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "(min, max) with 0 < min <= max <= 1"),
        "real_caption_ratio": (lambda v: 0 <= v <= 1, "a probability in [0, 1]")})
    if (cfg["losses"] != "a") != bool(cfg["clip_text"]):
        raise ValueError(f"losses={cfg['losses']!r} with clip_text={cfg['clip_text']!r}: every variant but 'a' "
                         "trains CLIP's own text tower, so clip_text must name it exactly when losses is not 'a'")
    if cfg["text_source"] == "cache" and (cfg["adaptor"] == "transformer" or cfg["text_lora_r"] > 0) \
            and cfg["losses"] != "direct":
        raise ValueError(f"adaptor={cfg['adaptor']!r}, text_lora_r={cfg['text_lora_r']} need text_source='online': "
                         "a cache holds one pooled embedding per caption, not the token states a transformer adaptor "
                         "reads (T x d values: 4 MiB per caption at 4096-d x 512 tokens in fp16) nor a trainable LLM")
    uses_llm = cfg["losses"] != "direct"  # direct: the LLM side is off (plain CLIP fine-tuning)
    if bool(cfg["train_manifest"]) == bool(cfg["train_shards"]):
        raise ValueError("set exactly one of train_manifest (JSONL + image_root) and train_shards (tar shards)")
    ddp, rank, local_rank, world_size, device = common.setup_distributed()
    master = rank == 0
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if cfg["batch_size"] % world_size:
        raise ValueError(f"batch_size={cfg['batch_size']} is not divisible by the {world_size} ranks")
    local_batch = cfg["batch_size"] // world_size
    micro = cfg["micro_batch_size"] if 0 < cfg["micro_batch_size"] < local_batch else local_batch
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    autocast = (torch.autocast(device_type="cuda", dtype=ptdtype) if device_type == "cuda" and ptdtype != torch.float32
                else contextlib.nullcontext())
    out = cfg["out_dir"]
    stale = common.lock_out_dir(out) if master else []  # one run per out_dir; a killed run's temp files go
    log = common.Logger(out, "post_train", master)
    if master:
        common.save_run_info(out, cfg, __file__, extra={"world_size": world_size})
    if stale:
        log(f"removed {len(stale)} temp file(s) of a killed run: {', '.join(stale)}")
    log(f"world size {world_size}, global batch {cfg['batch_size']} = {world_size} ranks x {local_batch}"
        f" ({local_batch // micro if local_batch % micro == 0 else math.ceil(local_batch / micro)} forward chunks of {micro})")

    # -------------------------------------------------------------------------
    # data: the training index (built once, memory-mapped), the cache checked against it
    index, cache = train_data(cfg, rank, world_size, log, uses_llm)
    text_cfg = text_settings(cfg, cache) if uses_llm else None
    data_id = data.data_identity(index, cache, data.expand_shards(cfg["train_shards"]) if cfg["train_shards"] else ())
    llm_args = (text_cfg["instruction"], text_cfg["max_length"]) if uses_llm else (None, 512)
    log(f"{len(index)} training records, {len(index) // cfg['batch_size']} steps per epoch; losses "
        f"{cfg['losses']}: " + " + ".join(f"CL({a}, {b})" for a, b in M.LOSS_TERMS[cfg["losses"]])
        + (f"; LLM: {text_cfg['model']} ({cfg['text_source']})" if uses_llm else "")
        + (f"; CLIP-T: {cfg['clip_text']}" if cfg["clip_text"] else ""))

    # -------------------------------------------------------------------------
    # model: same init on every rank (seed), then per-rank seeds for dropout/drop-path
    torch.manual_seed(cfg["seed"])
    vision = M.VisionTower(cfg["vision_model"], pretrained=cfg["pretrained"], weights=cfg["vision_weights"] or None,
                           embed_dim=None if cfg["embed_dim"] < 0 else cfg["embed_dim"],
                           gradient_checkpointing=cfg["gradient_checkpointing"], timm_kwargs=cfg["timm_kwargs"])
    data_config = vision.data_config  # the model's own preprocessing: size, interpolation, mean/std
    text_dim = cache.dim if cache is not None else None
    text_encoder = lora_encoder = None  # the frozen LLM (online) | the LLM with trainable LoRA, part of the model
    if uses_llm and cfg["text_source"] == "online":
        r = cfg["text_lora_r"]
        enc = load_text_model(text_cfg, device, lora=dict(r=r, alpha=2 * r) if r > 0 else None)
        text_dim = enc.dim
        text_cfg.update(bidirectional=enc.settings["bidirectional"], pooling=enc.pooling,
                        chat_template=enc.chat_template)  # resolved: recorded in llm2clip.json
        log(common.describe_text_encoder(enc, text_cfg) + f", instruction={text_cfg['instruction']!r}, "
            f"max_length={text_cfg['max_length']}")
        if r > 0:
            lora_encoder = enc
            if cfg["gradient_checkpointing"]:
                enc.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            text_encoder = enc.eval().requires_grad_(False)
    clip_text = None
    if cfg["clip_text"]:
        # transformers' CLIP/SigLIP text towers, or open_clip:NAME/PRETRAINED (optional package; EVA02-CLIP)
        clip_text = evaluate.load_open_clip_text(cfg["clip_text"]).requires_grad_(cfg["clip_text_trainable"])
    orig_model = M.LLM2CLIP(vision, text_dim, cfg["adaptor_blocks"], cfg["adaptor_expansion"], cfg["logit_scale_init"],
                            losses=cfg["losses"], clip_text=clip_text, adaptor=cfg["adaptor"],
                            text_encoder=lora_encoder).to(device)
    torch.manual_seed(cfg["seed"] + rank)
    n_params = sum(p.numel() for p in vision.parameters())
    log(f"vision {cfg['vision_model']}: {n_params / 1e6:.2f}M params, input {data_config['input_size']}, "
        f"output dim {vision.output_dim}; " + (f"{cfg['adaptor']} adaptor {text_dim} -> {vision.output_dim}, "
        f"{cfg['adaptor_blocks']} blocks, {sum(p.numel() for p in orig_model.adaptor.parameters()) / 1e6:.2f}M params"
        if uses_llm else "no LLM side") + f"; logit scale starts at x{math.exp(cfg['logit_scale_init']):.1f} "
        f"(logit_scale_init), lr {cfg['logit_scale_lr'] or cfg['learning_rate']:.3g}, "
        f"clamped at x{math.exp(cfg['max_logit_scale']):.1f}")

    # -------------------------------------------------------------------------
    # optimizer, then resume (model, optimizer, step, RNG) from the newest checkpoint
    optimizer = common.adamw(param_groups(orig_model, cfg), lr=cfg["learning_rate"],  # fused where torch can
                             betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["adam_eps"])
    step, bad_images = 0, []
    last_ckpt = None
    ckpts = checkpoint_paths(out) if cfg["resume"] else []
    if ckpts:
        last_ckpt, ck = common.load_newest_checkpoint(ckpts, log)  # a corrupt newest one: the one before
        other_data = data.identity_mismatch(ck.get("data"), data_id)
        if other_data:  # moved files with the same content are fine: nothing here is a path
            raise data.DataError(f"{last_ckpt}: checkpoint was trained on other data: " + "; ".join(other_data))
        differ = {k: (ck["config"].get(k), cfg[k]) for k in cfg
                  if k not in RESUME_FREE_KEYS and common.jsonable(cfg[k]) != ck["config"].get(k)}
        if differ:
            raise ValueError(f"{last_ckpt}: checkpoint was written with a different config; differing keys "
                             + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in differ.items()))
        orig_model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        step = ck["step"]
        if ck["world_size"] == world_size:
            bad_images = list(ck["bad_images"][rank])
            torch.set_rng_state(ck["rng"]["torch"][rank])
            if device_type == "cuda" and ck["rng"]["cuda"][rank] is not None:
                torch.cuda.set_rng_state(ck["rng"]["cuda"][rank])
        else:
            bad_images = [b for part in ck["bad_images"] for b in part] if master else []
            log(f"note: checkpoint from {ck['world_size']} ranks, now {world_size}: data order is kept, "
                "per-rank RNG streams are reseeded")
        log(f"resumed from {last_ckpt} at step {step}")
        del ck
    elif cfg["resume"]:
        log(f"resume=True but no checkpoint in {out}/checkpoints: starting from scratch")

    model = torch.compile(orig_model) if cfg["compile"] else orig_model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)

    loader = train_loader(cfg, index, cache if uses_llm else None, data_config, rank, world_size, step,
                          pin_memory=device_type == "cuda")

    # -------------------------------------------------------------------------
    # held-out retrieval eval (unwrapped model, rank 0)
    val = None
    if cfg["val_manifest"] and master:
        pooled_llm = uses_llm and lora_encoder is None and cfg["adaptor"] == "linear"
        val = load_val(cfg, text_cfg, text_encoder, device, need_embeddings=pooled_llm)

    def run_eval(at_step):
        """Retrieval with each text side of the variant ("eval": the first; "eval_<name>": every one)."""
        if val is None:
            return None
        v_records, v_texts, v_emb, t2i = val
        img = embed_images(orig_model, v_records, data_config, device, cfg["eval_batch_size"], autocast)
        feats, bs = {}, cfg["eval_batch_size"]
        orig_model.eval()
        with torch.no_grad():
            for s in range(0, len(v_texts), bs):
                with autocast:
                    text = M.text_inputs(orig_model, v_texts[s:s + bs], None if v_emb is None else v_emb[s:s + bs],
                                         text_encoder, *llm_args, device=device)
                    for name, f in orig_model.text_features(text).items():
                        feats.setdefault(name, []).append(f.float())
        orig_model.train()
        rec = {"step": at_step}
        for name in orig_model.text_names:
            metrics = evaluate.retrieval_metrics(img, torch.cat(feats[name]), t2i)
            metrics["chance_R@1"] = 100 / len(v_records)
            log(f"eval step {at_step} ({len(v_records)} images, text side {name}): "
                + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
            rec.setdefault("eval", metrics)
            rec[f"eval_{name}"] = metrics
        write_metrics(out, rec)
        return rec["eval"]

    # -------------------------------------------------------------------------
    # training loop
    flops_per_image = 3 * M.vit_flops(vision.model)  # training: forward + backward
    log(f"training steps {step} -> {cfg['max_steps']}, ~{flops_per_image / 1e9:.2f} GFLOPs per image")
    t_interval, wait_interval, loss_interval, n_interval = time.time(), 0.0, torch.zeros((), device=device), 0
    pbar = None
    if master:
        from tqdm import tqdm
        pbar = tqdm(total=cfg["max_steps"], initial=step, desc="post_train", unit="step", dynamic_ncols=True,
                    disable=None)
    if step == 0:
        run_eval(0)  # the starting point, so the log shows what training changed
    batches = iter(loader)
    while step < cfg["max_steps"]:
        t0 = time.time()
        batch = next(batches)
        wait_interval += time.time() - t0
        images = batch["image"].to(device, non_blocking=True)
        with autocast:
            text = M.text_inputs(orig_model, batch["text"], batch["embedding"], text_encoder, *llm_args, device=device)
        bad_images += batch["bad"]
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

        # chunks of `micro`: more than one -> gradient caching (the full batch's negatives, one chunk's memory)
        chunks = list(zip(images.split(micro), M.split_batch(text, micro)))
        loss = M.grad_cache_step(lambda c: model(*c), [chunks], orig_model.loss,
                                 no_sync=model.no_sync if ddp else None, autocast=autocast)
        if ddp:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # every rank sees the same value: stop together
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; last good checkpoint: "
                                     f"{last_ckpt or 'none (no checkpoint saved yet)'}")
        optimizer_step(orig_model, optimizer, cfg)
        step += 1
        loss_interval += loss
        n_interval += 1
        if pbar is not None:
            pbar.update(1)

        if step % cfg["log_interval"] == 0 or step == cfg["max_steps"]:
            if device_type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t_interval
            rec = {"step": step, "loss": (loss_interval / n_interval).item(), "lr": lr,
                   "logit_scale": orig_model.logit_scale.exp().item(), "samples_per_s": n_interval * cfg["batch_size"] / dt,
                   "ms_per_step": 1000 * dt / n_interval, "data_wait": wait_interval / dt}
            line = (f"step {step}: loss {rec['loss']:.4f}, lr {lr:.3g}, logit scale {rec['logit_scale']:.2f}, "
                    f"{rec['samples_per_s']:.1f} samples/s, {rec['ms_per_step']:.1f} ms/step, data wait {100 * rec['data_wait']:.0f}%")
            if device_type == "cuda":
                rec["mfu"] = flops_per_image * rec["samples_per_s"] / (world_size * cfg["peak_flops"])
                line += f", MFU {100 * rec['mfu']:.1f}%"
            log(line)
            if master:
                write_metrics(out, rec)
            t_interval, wait_interval, loss_interval, n_interval = time.time(), 0.0, torch.zeros((), device=device), 0

        if step % cfg["save_interval"] == 0 or step == cfg["max_steps"]:
            last_ckpt = checkpoint(out, orig_model, optimizer, step, cfg, bad_images, world_size, master, ddp,
                                   cfg["keep_checkpoints"], data_id)
        if val is not None and (step % cfg["eval_interval"] == 0 or step == cfg["max_steps"]):
            run_eval(step)
    if pbar is not None:
        pbar.close()

    # -------------------------------------------------------------------------
    # export for inference (model.load_llm2clip) and the bad-image report
    if ddp:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, bad_images)
        bad_images = [b for part in gathered for b in part]
    if master:
        export(out, orig_model, cfg, text_cfg)
        log(f"exported vision_tower.pt, adaptor.pt, llm2clip.json to {out}")
        if bad_images:
            log(f"skipped {len(bad_images)} bad images (skip_bad_images=True): " + ", ".join(sorted(set(bad_images))[:20])
                + (" ..." if len(set(bad_images)) > 20 else ""))
        write_metrics(out, {"step": step, "bad_images": len(bad_images)})
        common.unlock_out_dir(out)
    common.cleanup_distributed(ddp)
    return {"step": step, "bad_images": len(bad_images), "out_dir": out}


if __name__ == "__main__":
    main()
