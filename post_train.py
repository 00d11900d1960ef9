"""Stage 2 of LLM2CLIP: post-train a CLIP vision tower against cached LLM caption embeddings.

The vision tower is fully trainable; the text side is the stage-1 LLM's embedding of each caption,
read from the embed_captions.py cache (or computed online by the frozen LLM, text_source="online"),
passed through a small trainable adaptor. Loss: CLIP's symmetric InfoNCE over the whole global batch
(features gathered across ranks with gradient; gradient caching when a rank's share of the batch does
not fit one forward pass), or SigLIP's sigmoid loss with a learnable logit bias (contrastive_loss="sigmoid").

    python post_train.py config/post_tiny_cpu.py
    torchrun --nproc_per_node=8 post_train.py config/post_clip_vitl14_224.py --cache_dir=... --out_dir=...
    (several nodes, SLURM, elastic restarts: docs/scale.md)

Outputs in out_dir: checkpoints/step_*.pt (exact resume with resume=True), vision_tower.pt (timm state
dict), adaptor.pt, llm2clip.json (read by model.load_llm2clip), metrics.jsonl (also sent to W&B /
tensorboard/ with wandb_log / tensorboard_log), post_train.log,
run_post_train.json (config + code version). The training index (data_index.build_train_index: built on first
use, then reused) lives beside the cache, or in out_dir/train_index, or where --train_index says.
"""
import math
import time
import types

import torch
import torch.distributed as dist

import common
import data_index
import loss as L
import model as M
import tracking
import zoo
from metrics import retrieval_metrics

# -----------------------------------------------------------------------------
# default config (override with config/*.py files and --key=value)
# I/O
out_dir = "out/post"
train_manifest = ""  # JSONL: {"image": rel/path, "captions": [...], "long_captions": [...]} per line
image_root = ""  # folder the manifest's image paths are relative to ("" = the manifest's folder)
train_shards = ""  # instead of a manifest: WebDataset tar shards, "dir/{00000..00099}.tar" or globs
cache_dir = ""  # embed_captions.py output for the training records (same records, same order)
train_index = ""  # training index folder (data_index.build_train_index): "" = beside the cache, else in out_dir
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
# the loss over each pair of sides: "softmax" (CLIP's InfoNCE, the paper's) or "sigmoid" (SigLIP's pairwise
# sigmoid loss, with a learnable logit bias: loss.siglip_loss)
contrastive_loss = "softmax"
# the logit scale's start (a log). None: the tower checkpoint's own where it has one (an open_clip checkpoint
# as vision_weights), else softmax ln(100) (the pretrained OpenAI / EVA02-CLIP value, at the clamp: the
# official run loads it with the checkpoint, timm's vision-only weights lack it), sigmoid ln(10) (SigLIP's
# paper); ln(1/0.07) (x14.3, CLIP's init) for a softmax tower trained from scratch (presets set it)
logit_scale_init = None
logit_bias_init = None  # sigmoid only: the logit bias's start; None: the checkpoint's own, else -10 (SigLIP's paper)
max_logit_scale = math.log(100)  # clamp after each step, like CLIP
logit_scale_lr = 0.0  # the scale's (and bias's) own peak lr (same warm-up/cosine schedule); 0 = learning_rate (official)
gradient_checkpointing = True  # recompute ViT activations in backward: larger batches per GPU
compile = False  # torch.compile the model
# data
real_caption_ratio = 0.5  # probability of the real caption; else one of the long captions (Table 7)
crop_scale = (0.9, 1.0)  # RandomResizedCrop scale range (mild: captions describe the whole image)
batch_size = 4096  # global batch (all ranks): the number of in-batch negatives
micro_batch_size = 0  # images per forward pass per rank; < per-rank batch -> gradient caching. 0 = all
num_workers = 8  # data loader processes per rank
skip_bad_images = False  # False: a missing/corrupt image stops the run naming it; True: skip + count
jpeg_draft = False  # True: JPEGs decode at a reduced DCT scale (still >= the crop): faster loading, other pixels
# optimisation
learning_rate = 1e-5
min_lr = 0.0  # cosine decays to this
weight_decay = 0.05  # not on the logit scale, biases, norms, position/class embeddings
beta1, beta2, adam_eps = 0.9, 0.98, 1e-6  # CLIP/EVA-CLIP values
layer_decay = 0.85  # ViT block i gets lr * layer_decay ** (depth - i); embeddings the least
warmup_steps = 500
max_steps = 10000
grad_clip = 5.0  # 0 = off
dtype = "auto"  # autocast dtype: "auto" = bfloat16 on CUDA, float32 on CPU; "float16" adds dynamic loss scaling
seed = 0
# checkpoints and logging
save_interval = 1000  # steps between checkpoints (also at the end)
keep_checkpoints = 2  # newest checkpoints kept (0 = all)
resume = False  # continue from the newest checkpoint in out_dir/checkpoints
overwrite = False  # a fresh run into an out_dir holding another run's files deletes them (else it refuses)
log_interval = 10
peak_flops = 989e12  # per GPU, for the MFU estimate (H100 bf16 dense)
# experiment tracking (rank 0): metrics.jsonl is always written; these also send its numbers on (tracking.MetricsLog)
wandb_log = False  # Weights & Biases (pip install wandb; WANDB_MODE=offline works without a network)
wandb_project = "llm2clip"
wandb_run_name = ""  # "" = W&B's own name; a resumed run keeps its W&B run (out_dir/wandb_run.json)
tensorboard_log = False  # TensorBoard event files in out_dir/tensorboard
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, dict, type(None)))]
# keys that may change on resume without changing the trajectory
RESUME_FREE_KEYS = {"out_dir", "resume", "overwrite", "max_steps", "save_interval", "keep_checkpoints", "log_interval",
                     "eval_interval", "eval_batch_size", "val_manifest", "val_image_root", "val_cache_dir",
                     "eval_field", "num_workers", "compile", "peak_flops", "image_root", "train_manifest",
                     "train_shards", "cache_dir", "text_model", "text_source", "train_index", *tracking.KEYS}
# declared once, checked before any heavy work (common.check_config): each key's range, the relations
# between keys, and what each path key must be. A key's type is its default's.
RULES = {
    "text_source": common.one_of("cache", "online"), "dtype": common.one_of("float32", "bfloat16", "float16", "auto"),
    "contrastive_loss": common.one_of(*L.PAIR_LOSSES),
    "losses": common.one_of("a", "direct", "b", "c", "d"), "adaptor": common.one_of("linear", "transformer"),
    "eval_field": common.one_of("captions", "long_captions"), "pooling": common.one_of("", "mean", "eos"),
    "chat_template": common.chat_template,
    "max_length": (lambda v: v >= 0, "an integer >= 0 (0 = as recorded)"),
    "batch_size": common.positive_int, "max_steps": common.non_negative_int, "save_interval": common.positive_int,
    "log_interval": common.positive_int, "eval_interval": common.positive_int, "eval_batch_size": common.positive_int,
    "micro_batch_size": (lambda v: v >= 0, "an integer >= 0 (0 = the whole per-rank batch)"),
    "num_workers": common.non_negative_int, "keep_checkpoints": common.non_negative_int,
    "warmup_steps": common.non_negative_int, "adaptor_blocks": common.non_negative_int,
    "adaptor_expansion": common.positive_int, "text_lora_r": common.non_negative_int,
    "embed_dim": (lambda v: v == -1 or v > 0, "-1 (the model's own head) or an integer > 0"),
    "crop_scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "(min, max) with 0 < min <= max <= 1"),
    "real_caption_ratio": common.probability, "learning_rate": common.positive, "min_lr": common.non_negative,
    "text_lora_lr": common.positive, "logit_scale_lr": common.non_negative, "weight_decay": common.non_negative,
    "beta1": common.in_range(0, 0.999999, "a number in [0, 1)"), "beta2": common.in_range(0, 0.999999, "a number in [0, 1)"),
    "adam_eps": common.positive, "layer_decay": common.in_range(1e-9, 1, "a number in (0, 1]"),
    "grad_clip": common.non_negative, "max_logit_scale": common.finite,
    **{k: (lambda v: v is None or common.finite[0](v),
           "None (the tower checkpoint's own, else the loss's default) or a finite number")
       for k in ("logit_scale_init", "logit_bias_init")},
    "peak_flops": common.positive,
    "vision_model": (lambda v: __import__("timm").is_model(v), "a timm model name (see timm.list_models())"),
}
RELATIONS = [
    (lambda c: c["min_lr"] <= c["learning_rate"],
     lambda c: f"min_lr={c['min_lr']!r}: expected a value in [0, learning_rate={c['learning_rate']!r}] (the cosine decays to it)"),
    (lambda c: c["logit_scale_init"] is None or c["logit_scale_init"] <= c["max_logit_scale"],
     lambda c: f"logit_scale_init={c['logit_scale_init']!r}: expected <= max_logit_scale={c['max_logit_scale']!r} "
               "(the scale is clamped there after every step)"),
    (lambda c: c["logit_bias_init"] is None or c["contrastive_loss"] == "sigmoid",
     lambda c: f"logit_bias_init={c['logit_bias_init']!r}: the logit bias belongs to contrastive_loss='sigmoid' "
               f"(now {c['contrastive_loss']!r}: the softmax loss has none)"),
    (lambda c: (c["losses"] != "a") == bool(c["clip_text"]),
     lambda c: f"losses={c['losses']!r} with clip_text={c['clip_text']!r}: every variant but 'a' trains CLIP's own "
               "text tower, so clip_text must name it exactly when losses is not 'a'"),
    (lambda c: not (c["text_source"] == "cache" and (c["adaptor"] == "transformer" or c["text_lora_r"] > 0)
                    and c["losses"] != "direct"),
     "adaptor='transformer' and text_lora_r > 0 need text_source='online': a cache holds one pooled embedding per "
     "caption, not the token states a transformer adaptor reads (T x d values: 4 MiB per caption at 4096-d x 512 "
     "tokens in fp16) nor a trainable LLM"),
    (lambda c: c["micro_batch_size"] == 0 or c["batch_size"] % c["micro_batch_size"] == 0,
     lambda c: f"micro_batch_size={c['micro_batch_size']}: expected 0 or a divisor of batch_size={c['batch_size']} "
               "(equal forward chunks)"),
    (lambda c: bool(c["train_manifest"]) != bool(c["train_shards"]),
     "train_manifest, train_shards: set exactly one of train_manifest (JSONL + image_root) and train_shards (tar shards)"),
    *tracking.RELATIONS,
]
PATHS = {"out_dir": "out", "train_manifest": "file", "image_root": "dir", "cache_dir": "dir", "val_manifest": "file",
         "val_image_root": "dir", "val_cache_dir": "dir", "text_model": "model", "vision_weights": "file",
         "clip_text": "model",
         "train_index": "out"}
# -----------------------------------------------------------------------------


def get_lr(it, cfg):
    """Linear warm-up to learning_rate, then cosine down to min_lr at max_steps."""
    if it < cfg["warmup_steps"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_steps"] + 1)
    progress = min(1.0, (it - cfg["warmup_steps"]) / max(1, cfg["max_steps"] - cfg["warmup_steps"]))
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg["learning_rate"] - cfg["min_lr"])


def check_config(cfg):
    """Every declared rule (RULES, RELATIONS, PATHS), before any data or model is read."""
    common.check_config(cfg, RULES, RELATIONS, PATHS)


# -----------------------------------------------------------------------------
# The model: the vision tower, and the text side each ablation trains (Tables 10, 11)

def load_llm(cfg, text_cfg, device, log):
    """The LLM when it runs in the loop (text_source="online", Table 11) -> (frozen LLM or None, LLM with
    trainable LoRA or None); (None, None) with the cache (the paper's offline trick)."""
    if text_cfg is None or cfg["text_source"] != "online":
        return None, None
    r = cfg["text_lora_r"]
    enc = zoo.load_text_model(text_cfg, device, lora=dict(r=r, alpha=2 * r) if r > 0 else None)
    text_cfg.update(bidirectional=enc.settings["bidirectional"], pooling=enc.pooling,
                    chat_template=enc.chat_template)  # resolved: recorded in llm2clip.json
    log(common.describe_text_encoder(enc, text_cfg) + f", instruction={text_cfg['instruction']!r}, "
        f"max_length={text_cfg['max_length']}")
    if r == 0:
        return enc.eval().requires_grad_(False), None
    if cfg["gradient_checkpointing"]:
        enc.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return None, enc


def build_model(cfg, text_dim, lora_llm, device, log):
    """LLM2CLIP with the sides `losses` trains: the LLM (through the adaptor), CLIP-T (`clip_text`:
    transformers' CLIP/SigLIP text towers, or open_clip:NAME/PRETRAINED), or both through the Cat head."""
    vision = M.VisionTower(cfg["vision_model"], pretrained=cfg["pretrained"], weights=cfg["vision_weights"] or None,
                           embed_dim=None if cfg["embed_dim"] < 0 else cfg["embed_dim"],
                           gradient_checkpointing=cfg["gradient_checkpointing"], timm_kwargs=cfg["timm_kwargs"])
    clip_text = None
    if cfg["clip_text"]:
        clip_text = zoo.load_open_clip_text(cfg["clip_text"]).requires_grad_(cfg["clip_text_trainable"])
    (scale, scale_from), (bias, bias_from) = logit_init(cfg, vision)
    net = M.LLM2CLIP(vision, text_dim, cfg["adaptor_blocks"], cfg["adaptor_expansion"], scale,
                     text_sides=L.text_sides(cfg["losses"]), clip_text=clip_text, adaptor=cfg["adaptor"],
                     text_encoder=lora_llm, logit_bias_init=bias).to(device)
    log(f"vision {cfg['vision_model']}: {sum(p.numel() for p in vision.parameters()) / 1e6:.2f}M params, input "
        f"{vision.data_config['input_size']}, output dim {vision.output_dim}; "
        + (f"{cfg['adaptor']} adaptor {text_dim} -> {vision.output_dim}, {cfg['adaptor_blocks']} blocks, "
           f"{sum(p.numel() for p in net.adaptor.parameters()) / 1e6:.2f}M params" if net.adaptor is not None
           else "no LLM side") + f"; {cfg['contrastive_loss']} loss, logit scale starts at x{math.exp(scale):.1f} "
        f"({scale_from})" + (f", logit bias at {bias:.2f} ({bias_from})" if bias is not None else "")
        + f", lr {cfg['logit_scale_lr'] or cfg['learning_rate']:.3g}, clamped at x{math.exp(cfg['max_logit_scale']):.1f}")
    return net


# where neither the config nor the tower's checkpoint sets them: the logits' start per loss, (log scale, bias)
LOGIT_INIT = {"softmax": (math.log(100), None), "sigmoid": (math.log(10), -10.0)}


def logit_init(cfg, vision):
    """((log scale, from), (bias or None, from)): the config's value, else the tower checkpoint's own
    (VisionTower.checkpoint_logits: an open_clip checkpoint as vision_weights; timm's hub weights carry
    none), else LOGIT_INIT's; a scale above max_logit_scale starts at the clamp, as after every step."""
    own, (scale0, bias0) = vision.checkpoint_logits, LOGIT_INIT[cfg["contrastive_loss"]]

    def pick(key, name, default):
        if cfg[key] is not None:
            return cfg[key], key
        if name in own:
            return own[name], f"{name} of {cfg['vision_weights']}"
        return default, f"{cfg['contrastive_loss']} default"
    scale, scale_from = pick("logit_scale_init", "logit_scale", scale0)
    if scale > cfg["max_logit_scale"]:
        scale, scale_from = cfg["max_logit_scale"], f"{scale_from}, x{math.exp(scale):.1f} clamped to max_logit_scale"
    return (scale, scale_from), (pick("logit_bias_init", "logit_bias", bias0) if bias0 is not None else (None, None))


def text_inputs(model, texts, embeddings=None, frozen_llm=None, instruction=None, max_length=512, device=None):
    """An LLM2CLIP's text input for a batch of captions, as the variant needs it:
    "llm": the cached embeddings (B, C), or the frozen LLM's pooled embedding or token states (B, T, C) +
    "llm_mask" (transformer adaptor); "llm_ids", ...: tokens when the LLM trains (LoRA, model.text_encoder);
    "clip_ids", "clip_mask": CLIP-T tokens (77, truncated). Run it under the step's autocast."""
    text = {}
    if model.adaptor is not None:
        llm = model.text_encoder if model.text_encoder is not None else frozen_llm
        if llm is None:
            text["llm"] = embeddings
        else:
            tok = llm.tokenize(texts, instruction, max_length)
            if model.text_encoder is not None:  # runs inside the model, with gradient
                text.update(llm_ids=tok["input_ids"], llm_attention_mask=tok["attention_mask"],
                            llm_embed_mask=tok["embed_mask"])
            else:
                with torch.no_grad():
                    out = llm(**{k: v.to(llm.device) for k, v in tok.items()},
                              pool=not getattr(model.adaptor, "takes_tokens", False))
                text.update({"llm": out.float()} if torch.is_tensor(out)  # pooled (B, C) | token states + mask
                            else {"llm": out[0].float(), "llm_mask": out[1]})
    if model.clip_text is not None:
        text.update(model.clip_text.tokenize(texts))
    return {k: v.to(device, non_blocking=True) for k, v in text.items()}


def split_batch(text, micro):
    """A batch's text input (a tensor or a dict of tensors, as text_inputs gives) -> chunks of `micro` along dim 0."""
    if torch.is_tensor(text):
        return list(text.split(micro))
    parts = {k: v.split(micro) for k, v in text.items()}
    return [{k: parts[k][j] for k in parts} for j in range(len(next(iter(parts.values()))))]


# -----------------------------------------------------------------------------
# Optimisation

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
    # the logit scale (and the sigmoid loss's bias): its own lr (logit_scale_lr) through lr_scale, so it
    # follows the same schedule; never weight-decayed
    lr = cfg["learning_rate"]
    logits = [p for p in (orig_model.logit_scale, orig_model.logit_bias) if p is not None]
    groups.append({"params": logits, "weight_decay": 0.0,
                   "lr_scale": (cfg["logit_scale_lr"] or lr) / lr if lr else 1.0})
    if orig_model.text_encoder is not None:  # the LLM's LoRA (text_lora_r > 0), at its own lr
        lora = [p for p in orig_model.text_encoder.parameters() if p.requires_grad]
        groups.append({"params": lora, "weight_decay": 0.0, "lr_scale": cfg["text_lora_lr"] / lr if lr else 1.0})
    return [g for g in groups if g["params"]]


def optimizer_step(orig_model, optimizer, cfg, scaler=None, where=""):
    """Clip the gradient norm, step (through the float16 loss scaler: common.scaled_step), zero the
    gradients, clamp the logit scale to max_logit_scale (CLIP). -> (skipped by the scaler, gradient norm)."""
    skipped, grad_norm = common.scaled_step(optimizer, scaler, orig_model.parameters(), cfg["grad_clip"], where)
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        orig_model.logit_scale.clamp_(max=cfg["max_logit_scale"])
    return skipped, grad_norm


# -----------------------------------------------------------------------------
# Checkpoints: what trains, the optimizer, each rank's RNG and skipped images; the step is the data position

def save(ckpts, run, step, bad_images):
    """Everything an exact resume needs (plain types only), written by rank 0; every rank waits for it."""
    ranks = common.per_rank((common.rng_state(), bad_images), run.ddp, run.world_size)
    path = None
    if run.master:
        path = ckpts.save(step, {
            "model": common.trainable_state(run.orig_model), "optimizer": run.optimizer.state_dict(),
            "config": common.jsonable(run.cfg), "world_size": run.world_size, "data": run.data_id,
            "rng": {"torch": [r["torch"] for r, _ in ranks], "cuda": [r["cuda"] for r, _ in ranks]},
            "bad_images": [list(b) for _, b in ranks], "scaler": run.scaler.state_dict(), "skipped_steps": run.skipped})
    if run.ddp:
        dist.barrier()
    return path


def resume_from(ckpts, run, log):
    """(step, bad images, checkpoint path) from the newest good checkpoint, under the resume rules."""
    path, ck = ckpts.newest()
    if ck is None:
        log(f"resume=True but no checkpoint in {run.cfg['out_dir']}/checkpoints: starting from scratch")
        return 0, [], None
    common.check_resume(path, ck, run.cfg, RESUME_FREE_KEYS, run.data_id, run.world_size, run.orig_model,
                        defaults={k: globals()[k] for k in config_keys})
    common.load_trainable_state(run.orig_model, ck["model"], path)
    run.optimizer.load_state_dict(ck["optimizer"])
    if ck.get("scaler"):  # float16: the loss scale and its growth counter, so the next skips replay too
        run.scaler.load_state_dict(ck["scaler"])
    run.skipped = ck.get("skipped_steps", 0)
    rank = run.rank
    if ck["world_size"] == run.world_size:
        bad = list(ck["bad_images"][rank])
        common.set_rng_state({"torch": ck["rng"]["torch"][rank], "cuda": ck["rng"]["cuda"][rank]})
    else:
        bad = [b for part in ck["bad_images"] for b in part] if run.master else []
        log(f"note: checkpoint from {ck['world_size']} ranks, now {run.world_size}: the global batches and crops "
            "are kept (functions of the step and record), the model draws no random numbers: the run continues exactly")
    log(f"resumed from {path} at step {ck['step']}")
    return ck["step"], bad, path


# -----------------------------------------------------------------------------
# Held-out retrieval, every text side of the variant

def evaluate_sides(run, val, at_step, log):
    """Retrieval with each text side ("eval": the first; "eval_<name>": every one) -> the first's metrics."""
    v_records, v_texts, v_emb, t2i = val
    net, bs = run.orig_model, run.cfg["eval_batch_size"]
    img = zoo.embed_images(net, v_records, net.vision.data_config, run.device, bs, run.autocast)
    feats = {}
    net.eval()
    with torch.no_grad():
        for s in range(0, len(v_texts), bs):
            with run.autocast:
                text = text_inputs(net, v_texts[s:s + bs], None if v_emb is None else v_emb[s:s + bs],
                                   run.frozen_llm, *run.llm_args, device=run.device)
                for name, f in net.text_features(text).items():
                    feats.setdefault(name, []).append(f.float())
    net.train()
    rec = {"step": at_step}
    for name in net.text_names:
        metrics = retrieval_metrics(img, torch.cat(feats[name]), t2i)
        metrics["chance_R@1"] = 100 / len(v_records)
        log(f"eval step {at_step} ({len(v_records)} images, text side {name}): "
            + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        rec.setdefault("eval", metrics)
        rec[f"eval_{name}"] = metrics
    run.metrics.write(rec)
    return rec["eval"]


# -----------------------------------------------------------------------------

def train(run, loader, ckpts, step, bad_images, last_ckpt, val, log):
    """The training loop from `step` to max_steps: the loss, logging, checkpoints and evals."""
    cfg, net, model = run.cfg, run.orig_model, run.model
    terms = L.LOSS_TERMS[cfg["losses"]]
    flops_per_image = 3 * common.vit_flops(net.vision.model)  # training: forward + backward
    log(f"training steps {step} -> {cfg['max_steps']}, ~{flops_per_image / 1e9:.2f} GFLOPs per image")
    t_interval, wait_interval, loss_interval, n_interval = time.time(), 0.0, torch.zeros((), device=run.device), 0
    pbar = None
    if run.master:
        from tqdm import tqdm
        pbar = tqdm(total=cfg["max_steps"], initial=step, desc="post_train", unit="step", dynamic_ncols=True,
                    disable=None)
    if step == 0 and val is not None:
        evaluate_sides(run, val, 0, log)  # the starting point, so the log shows what training changed
    batches = data_index.batches(loader)
    while step < cfg["max_steps"]:
        t0 = time.time()
        batch = next(batches)
        wait_interval += time.time() - t0
        images = batch["image"].to(run.device, non_blocking=True)
        with run.autocast:
            text = text_inputs(net, batch["text"], batch["embedding"], run.frozen_llm, *run.llm_args, device=run.device)
        bad_images += batch["bad"]
        lr = get_lr(step, cfg)
        for g in run.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

        # the loss: CLIP's (or SigLIP's) over the global batch for each pair of sides; chunks of `micro` when a
        # rank's share does not fit one forward pass (gradient caching: the full batch's negatives, one chunk's memory)
        chunks = list(zip(images.split(run.micro), split_batch(text, run.micro)))
        loss = L.grad_cache_step(lambda c: model(*c), [chunks],
                                 lambda out: L.multi_clip_loss(out, terms, cfg["contrastive_loss"]),
                                 no_sync=model.no_sync if run.ddp else None, autocast=run.autocast, scaler=run.scaler)
        if run.ddp:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # every rank sees the same value: stop together
        # the loss is float32 and unscaled: non-finite means the forward diverged, so the run stops; float16
        # gradients that overflow at the current loss scale are the scaler's routine: skipped and counted
        newest = f"; last good checkpoint: {last_ckpt or 'none (no checkpoint saved yet)'}"
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}{newest}")
        skipped, grad_norm = optimizer_step(net, run.optimizer, cfg, run.scaler, f" at step {step}{newest}")
        if skipped:
            run.skipped += 1
            log(f"step {step + 1}: float16 gradients overflowed, step skipped ({run.skipped} so far), loss scale "
                f"now {run.scaler.get_scale():g}")
        step += 1
        loss_interval += loss
        n_interval += 1
        if pbar is not None:
            pbar.update(1)

        if step % cfg["log_interval"] == 0 or step == cfg["max_steps"]:
            if str(run.device).startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.time() - t_interval
            rec = {"step": step, "loss": (loss_interval / n_interval).item(), "lr": lr,
                   "logit_scale": net.logit_scale.exp().item(), "samples_per_s": n_interval * cfg["batch_size"] / dt,
                   "ms_per_step": 1000 * dt / n_interval, "data_wait": wait_interval / dt}
            line = (f"step {step}: loss {rec['loss']:.4f}, lr {lr:.3g}, logit scale {rec['logit_scale']:.2f}, "
                    f"{rec['samples_per_s']:.1f} samples/s, {rec['ms_per_step']:.1f} ms/step, data wait {100 * rec['data_wait']:.0f}%")
            if torch.isfinite(grad_norm):  # this step's, before clipping (a skipped float16 step's is inf)
                rec["grad_norm"] = grad_norm.item()
                line += f", grad norm {rec['grad_norm']:.3g}"
            if net.logit_bias is not None:
                rec["logit_bias"] = net.logit_bias.item()
                line += f", logit bias {rec['logit_bias']:.2f}"
            if run.scaler.is_enabled():  # float16: the dynamic loss scale and the steps it skipped so far
                rec.update(loss_scale=run.scaler.get_scale(), skipped_steps=run.skipped)
                line += f", loss scale {rec['loss_scale']:g} ({run.skipped} skipped)"
            if str(run.device).startswith("cuda"):
                rec["mfu"] = flops_per_image * rec["samples_per_s"] / (run.world_size * cfg["peak_flops"])
                line += f", MFU {100 * rec['mfu']:.1f}%"
            log(line)
            run.metrics.write(rec)  # rank 0: metrics.jsonl, and W&B / TensorBoard when on
            t_interval, wait_interval, loss_interval, n_interval = time.time(), 0.0, torch.zeros((), device=run.device), 0

        if step % cfg["save_interval"] == 0 or step == cfg["max_steps"]:
            last_ckpt = save(ckpts, run, step, bad_images)
        if val is not None and (step % cfg["eval_interval"] == 0 or step == cfg["max_steps"]):
            evaluate_sides(run, val, step, log)
    if pbar is not None:
        pbar.close()
    return step, bad_images


def main(argv=None):
    # --- config, distributed init, run record
    cfg = common.configure({k: globals()[k] for k in config_keys}, argv, __doc__)
    check_config(cfg)
    common.elastic_restart(cfg)  # restarted by torchrun --max_restarts: resume from the newest checkpoint
    uses_llm = cfg["losses"] != "direct"  # direct: the LLM side is off (plain CLIP fine-tuning)
    ddp, rank, local_rank, world_size, device = common.setup_distributed()
    master = rank == 0
    if cfg["batch_size"] % world_size:
        raise ValueError(f"batch_size={cfg['batch_size']} is not divisible by the {world_size} ranks")
    local_batch = cfg["batch_size"] // world_size
    micro = cfg["micro_batch_size"] if 0 < cfg["micro_batch_size"] < local_batch else local_batch
    if local_batch % micro:
        raise ValueError(f"micro_batch_size={micro}: expected a divisor of the per-rank batch {local_batch} "
                         f"(batch_size={cfg['batch_size']} over {world_size} ranks)")
    dtype, autocast = common.resolve_dtype(cfg["dtype"], device)
    out = cfg["out_dir"]
    log = common.open_run(out, "post_train", master, cfg["resume"], cfg["overwrite"])  # one run per out_dir
    log(f"world size {world_size}, global batch {cfg['batch_size']} = {world_size} ranks x {local_batch}"
        f" ({math.ceil(local_batch / micro)} forward chunks of {micro}); {str(dtype).split('.')[-1]} on {device}"
        + (" with dynamic loss scaling" if dtype == torch.float16 else ""))

    # --- data: the training index (built once, memory-mapped), the cache checked against it
    index, cache = data_index.train_data(cfg, rank, world_size, log, uses_llm)
    text_cfg = zoo.text_settings(cfg, cache) if uses_llm else None
    data_id = data_index.data_identity(index, cache, data_index.expand_shards(cfg["train_shards"])
                                       if cfg["train_shards"] else ())
    log(f"{len(index)} training records, {len(index) // cfg['batch_size']} steps per epoch; losses "
        f"{cfg['losses']}: " + " + ".join(f"CL({a}, {b})" for a, b in L.LOSS_TERMS[cfg["losses"]])
        + (f"; LLM: {text_cfg['model']} ({cfg['text_source']})" if uses_llm else "")
        + (f"; CLIP-T: {cfg['clip_text']}" if cfg["clip_text"] else ""))

    # --- model: same init on every rank (seed), then per-rank seeds for dropout/drop-path
    torch.manual_seed(cfg["seed"])
    frozen_llm, lora_llm = load_llm(cfg, text_cfg, device, log)
    llm = frozen_llm or lora_llm
    text_dim = llm.dim if llm is not None else (cache.dim if cache is not None else None)
    orig_model = build_model(cfg, text_dim, lora_llm, device, log)
    torch.manual_seed(cfg["seed"] + rank)

    # --- optimizer; then resume (what trains, optimizer, step, RNG) from the newest good checkpoint
    optimizer = common.adamw(param_groups(orig_model, cfg), lr=cfg["learning_rate"],  # fused where torch can
                             betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["adam_eps"])
    run = types.SimpleNamespace(  # what the loop, checkpoints and evals share
        cfg=cfg, ddp=ddp, rank=rank, world_size=world_size, master=master, device=device, autocast=autocast,
        micro=micro, orig_model=orig_model, model=orig_model, optimizer=optimizer, data_id=data_id,
        scaler=common.grad_scaler(dtype, device), skipped=0,  # float16: dynamic loss scaling, steps it skipped
        frozen_llm=frozen_llm, llm_args=(text_cfg["instruction"], text_cfg["max_length"]) if uses_llm else (None, 512))
    ckpts = common.Checkpoints(out, cfg["keep_checkpoints"], log)
    step, bad_images, last_ckpt = resume_from(ckpts, run, log) if cfg["resume"] else (0, [], None)
    if master:  # once data and resume are accepted: a refused run changes nothing in out_dir
        common.save_run_info(out, cfg, __file__, extra={"world_size": world_size})
    run.metrics = tracking.MetricsLog(out, cfg, master, step, log)  # metrics.jsonl from `step` on (+ W&B, TensorBoard)
    model = torch.compile(orig_model) if cfg["compile"] else orig_model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if "cuda" in str(device) else None)
    run.model = model

    # --- the loop, with the held-out eval on rank 0 (unwrapped model)
    loader = data_index.train_loader(cfg, index, cache if uses_llm else None, orig_model.vision.data_config, rank,
                                     world_size, step, pin_memory="cuda" in str(device))
    val = None
    if cfg["val_manifest"] and master:
        pooled_llm = uses_llm and lora_llm is None and cfg["adaptor"] == "linear"
        val = zoo.load_val(cfg, text_cfg, frozen_llm, device, need_embeddings=pooled_llm)
    step, bad_images = train(run, loader, ckpts, step, bad_images, last_ckpt, val, log)

    # --- export for inference (model.load_llm2clip) and the bad-image report
    bad_images = [b for part in common.per_rank(bad_images, ddp, world_size) for b in part]
    if master:
        zoo.export(out, orig_model, cfg, text_cfg)
        log(f"exported vision_tower.pt, adaptor.pt, llm2clip.json to {out}")
        if bad_images:
            log(f"skipped {len(bad_images)} bad images (skip_bad_images=True): " + ", ".join(sorted(set(bad_images))[:20])
                + (" ..." if len(set(bad_images)) > 20 else ""))
        run.metrics.write({"step": step, "bad_images": len(bad_images)})
        run.metrics.close()
        common.unlock_out_dir(out)
    common.cleanup_distributed(ddp)
    return {"step": step, "bad_images": len(bad_images), "out_dir": out}


if __name__ == "__main__":
    common.run_main(main)
