"""Using the post-trained vision encoder downstream:

    python downstream.py --task=linear_probe --model=openai/clip-vit-base-patch16,out/llm2clip --data=imagenet
    python downstream.py --task=export_hf --model=out/llm2clip --out=hf/llm2clip_vision   (LLaVA-ready folder)
    python downstream.py --task=export_llm2clip --model=out/llm2clip --out=hf/llm2clip   (as the released models ship)
    torchrun --nproc_per_node=8 downstream.py --task=linear_probe ...   (ranks split the feature extraction)

`evaluate.py --task=linear_probe|export_hf|export_llm2clip` runs the same code with evaluate.py's config.

1. `export_hf`: the timm tower of a post_train.py out_dir as a transformers `CLIPVisionModel` (OpenAI-CLIP
   family) or `SiglipVisionModel` (SigLIP/SigLIP2) folder with a `preprocessor_config.json`, so LLaVA-style
   code loads it with no remote code; the new projection head goes to `projection.safetensors`.
   `export_llm2clip` writes the whole model (tower, adaptor, logit scale) the way the released LLM2CLIP models
   ship, a transformers remote-code folder (hf_release.py).
2. `linear_probe` (the paper's Table 4, right half): frozen image features cached to disk in resumable
   chunks, then a linear classifier trained with SGD on them; top-1/top-5, one row per model.
3. Converters for the multilingual retrieval sets (Table 3): XM3600, COCO-CN, Flickr30k-CN -> manifests
   (run by `evaluate.py --task=convert --format=xm3600|coco_cn|flickr30k_cn`).

A script of its own so evaluate.py stays the scoring tasks; evaluate.py imports it, never the other way.
Models and image encoding come from zoo.py, ranks and results files from metrics.py.
"""
import hashlib
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import hf_release
import zoo
from data import DataError, read_class_folder, read_jsonl, scan_lines
from metrics import check_results_path, percent, ranks, split_specs, write_results

# -----------------------------------------------------------------------------
# config: every key can be overridden with --key=value or a config/*.py file
task = "linear_probe"    # linear_probe | export_hf | export_llm2clip (the converters: evaluate.py --task=convert)
model = ""               # linear_probe: comma-separated, each as evaluate.py takes it (HF CLIP/SigLIP folder or hub
                         # name, open_clip:NAME/PRETRAINED, LLM2CLIP out_dir); export_*: ONE post_train.py out_dir
data = ""                # linear_probe: a folder with train/ and val/ class folders
out = ""                 # linear_probe: results JSON ("" = print only); export_*: the transformers folder to write
device = ""              # "" = cuda if available, else cpu
batch_size = 64          # images per forward pass, per rank
num_workers = 4          # image decoding worker processes
amp = True               # bf16 autocast on CUDA (CPU always runs fp32)
# linear probe (Table 4, right half): a linear classifier trained with SGD on cached frozen features
feature_dir = "out/probe_features"  # cached image features, one folder per model and split (reused on rerun)
probe_epochs = 50        # epochs, batch, lr, momentum, weight decay: the recipe given for the paper
probe_batch_size = 1024
probe_lr = 0.1           # peak lr, cosine to 0 over all steps (features are standardised first)
probe_momentum = 0.9
probe_weight_decay = 0.0
overwrite = False        # export_*: write into an --out folder that already holds files (else it is refused)
config_keys = [k for k, v in dict(globals()).items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
# declared once, checked before any data or model is read (common.check_config); evaluate.py checks the
# probe keys with these rules too
PROBE_RULES = {"probe_epochs": common.positive_int,
               "probe_batch_size": common.positive_int, "probe_lr": common.positive,
               "probe_momentum": common.in_range(0, 0.999999, "a number in [0, 1)"),
               "probe_weight_decay": common.non_negative}
RULES = {"batch_size": common.positive_int, "num_workers": common.non_negative_int,
         "device": zoo.DEVICE_RULE, **PROBE_RULES}
TASK_PATHS = {"linear_probe": {"data": "dir", "feature_dir": "out"}, "export_hf": {"out": "out"},
              "export_llm2clip": {"out": "out"}}

# -----------------------------------------------------------------------------
# 1. transformers export of the vision tower

SUPPORTED = ("OpenAI-CLIP-style timm VisionTransformer (class token, pre-norm, token pooling: "
             "vit_*_clip_* -> CLIPVisionModel) and SigLIP/SigLIP2 (no class token, attention-pool head: "
             "vit_*_siglip_* -> SiglipVisionModel)")
HF_PROJECTION = "projection.safetensors"  # our head: Linear(width -> embed_dim) with bias, {"weight", "bias"}


class UnsupportedTower(ValueError):
    """The timm tower has no transformers counterpart (e.g. EVA02's rotary embeddings and SwiGLU)."""


def _require(ok, name, what):
    if not ok:
        raise UnsupportedTower(f"{name}: {what}; export_hf supports {SUPPORTED}. The timm export "
                               "(vision_tower.pt + llm2clip.json, read by model.load_llm2clip) stays the way to load it.")


def hidden_act(act):
    """The transformers name of a timm activation module, found by evaluating it (never by class name)."""
    x = torch.linspace(-6, 6, 1201)
    refs = {"gelu": F.gelu(x), "gelu_pytorch_tanh": F.gelu(x, approximate="tanh"),
            "quick_gelu": x * torch.sigmoid(1.702 * x)}
    with torch.no_grad():
        y = act(x)
    return next((name for name, ref in refs.items() if torch.allclose(y, ref, rtol=0, atol=1e-6)), None)


def _norm_eps(m):
    return m.eps if isinstance(m, nn.LayerNorm) and m.elementwise_affine else None


def _bias(linear, n):
    return linear.bias if linear.bias is not None else torch.zeros(n)  # transformers always has the bias


def hf_vision_config(vit, name="tower"):
    """(family, transformers config) for a timm VisionTransformer, or UnsupportedTower saying why not."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block, VisionTransformer
    _require(isinstance(vit, VisionTransformer), name, f"a timm {type(vit).__name__}, not a VisionTransformer")
    if vit.has_class_token and vit.global_pool == "token" and _norm_eps(vit.norm_pre):
        family = "clip"
    elif not vit.has_class_token and vit.global_pool == "map" and isinstance(vit.norm_pre, nn.Identity):
        family = "siglip"  # transformers' SigLIP has no norm before the blocks
    else:
        _require(False, name, f"class_token={vit.has_class_token}, global_pool={vit.global_pool!r}, "
                              f"pre_norm={not isinstance(vit.norm_pre, nn.Identity)}")
    pe = vit.patch_embed
    _require(vit.num_reg_tokens == 0 and not vit.no_embed_class and vit.pos_embed is not None
             and not vit.dynamic_img_size and isinstance(pe.norm, nn.Identity), name,
             "register tokens, no_embed_class, no position embedding, dynamic size or a patch-embed norm")
    (h, w), (ph, pw) = pe.img_size, pe.patch_size
    _require(h == w and ph == pw and tuple(pe.grid_size) == (h // ph, w // pw) and not getattr(pe, "dynamic_img_pad", False),
             name, f"image {h}x{w} / patch {ph}x{pw}: not square, or padded")  # 384 / 14: both drop the remainder
    blocks = list(vit.blocks)
    norms = [vit.norm] + [n for b in blocks for n in (b.norm1, b.norm2)] + ([vit.norm_pre] if family == "clip" else [])
    for b in blocks:
        _require(type(b) is Block and type(b.attn) is Attention and type(b.mlp) is Mlp, name, "non-standard blocks")
        extras = (b.ls1, b.ls2, b.attn.q_norm, b.attn.k_norm, getattr(b.attn, "norm", nn.Identity()), b.mlp.norm)
        _require(all(isinstance(m, nn.Identity) for m in extras) and getattr(b.attn, "gate", None) is None,
                 name, "layer scale, qk-norm, attention/MLP norms or gated attention")
    acts = {hidden_act(b.mlp.act) for b in blocks}
    mlp_dims = {b.mlp.fc1.out_features for b in blocks}
    if family == "siglip":
        p = vit.attn_pool
        _require(p is not None and p.latent_len == 1 and p.pos_embed is None and p.pool == "token"
                 and isinstance(p.q, nn.Linear) and p.mlp is not None and p.num_heads == blocks[0].attn.num_heads
                 and isinstance(p.q_norm, nn.Identity) and p.proj.out_features == vit.embed_dim, name,
                 "an attention-pool head other than SigLIP's (one latent, q projection, MLP, same heads)")
        norms.append(p.norm)
        acts.add(hidden_act(p.mlp.act))
        mlp_dims.add(p.mlp.fc1.out_features)
    _require(isinstance(vit.fc_norm, nn.Identity), name, "a norm after pooling (fc_norm)")
    eps = {_norm_eps(n) for n in norms}
    _require(len(eps) == 1 and None not in eps, name, f"LayerNorm eps differ across the tower ({eps})")
    _require(len(acts) == 1 and None not in acts, name, "an activation other than gelu, gelu-tanh or quick-gelu")
    _require(len(mlp_dims) == 1, name, f"MLP widths differ ({mlp_dims})")
    kw = dict(hidden_size=vit.embed_dim, intermediate_size=mlp_dims.pop(), num_hidden_layers=len(blocks),
              num_attention_heads=blocks[0].attn.num_heads, image_size=h, patch_size=ph, num_channels=pe.proj.in_channels,
              hidden_act=acts.pop(), layer_norm_eps=eps.pop(), attention_dropout=0.0)
    from transformers import CLIPVisionConfig, SiglipVisionConfig
    if family == "clip":
        return family, CLIPVisionConfig(**kw, architectures=["CLIPVisionModel"])
    return family, SiglipVisionConfig(**kw, vision_use_head=True, architectures=["SiglipVisionModel"])


@torch.no_grad()
def hf_vision_state_dict(vit, family):
    """timm VisionTransformer weights renamed and reshaped into transformers' CLIP/SigLIP vision layout.

    - timm's fused qkv Linear (3D, D) splits into q_proj, k_proj, v_proj (that order); missing biases -> 0.
    - CLIP: cls_token (1, 1, D) -> class_embedding (D,); pos_embed (1, 1+N, D) -> an Embedding table. CLIP's
      patch conv has no bias in transformers: a timm bias adds the same vector to every patch token before
      the position embedding, so it is folded into the patch rows of the position table (the class row
      gets none, as in timm). timm's norm_pre is pre_layrnorm; its final norm is post_layernorm, which
      transformers applies to the class token only: timm's head reads that token, so the pooled outputs agree.
    - SigLIP: the patch conv keeps its bias; the final norm is post_layernorm; the attention-pool head maps
      latent -> probe and q + kv -> nn.MultiheadAttention's packed in_proj.
    """
    sd, D = {}, vit.embed_dim
    pos = vit.pos_embed[0].clone()                                        # (prefix + N, D)
    sd["embeddings.patch_embedding.weight"] = vit.patch_embed.proj.weight
    conv_bias = vit.patch_embed.proj.bias
    if family == "clip":
        sd["embeddings.class_embedding"] = vit.cls_token.reshape(D)
        if conv_bias is not None:
            pos[1:] += conv_bias
        sd["pre_layrnorm.weight"], sd["pre_layrnorm.bias"] = vit.norm_pre.weight, vit.norm_pre.bias
    else:
        sd["embeddings.patch_embedding.bias"] = _bias(vit.patch_embed.proj, D)
    sd["embeddings.position_embedding.weight"] = pos
    for i, b in enumerate(vit.blocks):
        p = f"encoder.layers.{i}."
        qkv_w, qkv_b = b.attn.qkv.weight.chunk(3), _bias(b.attn.qkv, 3 * D).chunk(3)
        for j, n in enumerate("qkv"):
            sd[p + f"self_attn.{n}_proj.weight"], sd[p + f"self_attn.{n}_proj.bias"] = qkv_w[j], qkv_b[j]
        sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"] = b.attn.proj.weight, _bias(b.attn.proj, D)
        pairs = (("layer_norm1", b.norm1), ("layer_norm2", b.norm2), ("mlp.fc1", b.mlp.fc1), ("mlp.fc2", b.mlp.fc2))
        for ours, theirs in pairs:
            sd[p + ours + ".weight"], sd[p + ours + ".bias"] = theirs.weight, _bias(theirs, theirs.weight.shape[0])
    sd["post_layernorm.weight"], sd["post_layernorm.bias"] = vit.norm.weight, vit.norm.bias
    if family == "siglip":
        a = vit.attn_pool
        sd["head.probe"] = a.latent                                        # (1, 1, D)
        sd["head.attention.in_proj_weight"] = torch.cat([a.q.weight, a.kv.weight])
        sd["head.attention.in_proj_bias"] = torch.cat([_bias(a.q, D), _bias(a.kv, 2 * D)])
        sd["head.attention.out_proj.weight"], sd["head.attention.out_proj.bias"] = a.proj.weight, _bias(a.proj, D)
        sd["head.layernorm.weight"], sd["head.layernorm.bias"] = a.norm.weight, a.norm.bias
        for n in ("fc1", "fc2"):
            lin = getattr(a.mlp, n)
            sd[f"head.mlp.{n}.weight"], sd[f"head.mlp.{n}.bias"] = lin.weight, _bias(lin, lin.weight.shape[0])
    return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


hf_image_processor = zoo.hf_image_processor  # data config -> CLIPImageProcessor, beside its inverse zoo.hf_data_config


@torch.no_grad()
def timm_hidden_states(vit, x):
    """timm's counterpart of transformers' hidden_states: the input to block 0, then every block's output."""
    out = [vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))]
    for b in vit.blocks:
        out.append(b(out[-1]))
    return out


@torch.no_grad()
def export_hf(vision, hf_dir, name="tower", atol=1e-4):
    """Write a VisionTower (model.VisionTower: timm model + data_config) as a transformers folder.

    hf_dir gets config.json + model.safetensors (keys under `vision_model.`: the layout of the hub's
    CLIP/SigLIP vision checkpoints, which transformers 5 maps on load and 4.x expects), preprocessor_config.json,
    and `projection.safetensors` when the tower has a head. transformers' CLIPVisionModelWithProjection
    cannot hold it: its projection has no bias and ours has one. The folder is loaded back and checked
    against timm on a random input (every hidden state and the embedding, relative to atol); if they
    differ, the files written are removed again and RuntimeError says so. Returns (family, max difference).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel, SiglipVisionModel
    vit = vision.model.eval()
    family, config = hf_vision_config(vit, name)
    state = hf_vision_state_dict(vit, family)
    Model = CLIPVisionModel if family == "clip" else SiglipVisionModel
    os.makedirs(hf_dir, exist_ok=True)
    try:
        config.save_pretrained(hf_dir)
        save_file({"vision_model." + k: v for k, v in state.items()}, os.path.join(hf_dir, "model.safetensors"),
                  metadata={"format": "pt"})
        hf_image_processor(vision.data_config).save_pretrained(hf_dir)
        if isinstance(vit.head, nn.Linear):
            save_file({"weight": vit.head.weight.detach().float().contiguous(),
                       "bias": vit.head.bias.detach().float().contiguous()}, os.path.join(hf_dir, HF_PROJECTION))
    except (OSError, SafetensorError) as e:  # a full disk inside transformers/safetensors: named here, no half export
        if isinstance(e, SafetensorError) and "I/O error" not in str(e):
            raise
        _remove_export(hf_dir)
        m = re.search(r"os error (\d+)", str(e))  # safetensors reports the errno in its message only
        code = e.errno if isinstance(e, OSError) else (int(m.group(1)) if m else None)
        raise OSError(code, f"cannot write {hf_dir}: {getattr(e, 'strerror', None) or e}") from None
    hf, info = Model.from_pretrained(hf_dir, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"{hf_dir}: {Model.__name__} reloaded with {info}; the weight mapping is incomplete")
    x = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    got, want = hf_forward(hf.eval(), hf_dir, x), (timm_hidden_states(vit, x), vit(x))
    diff = max(_rel_diff(a, b) for a, b in zip(got[0] + (got[1],), want[0] + [want[1]]))
    if len(got[0]) != len(want[0]) or diff > atol:
        _remove_export(hf_dir)
        raise RuntimeError(f"{hf_dir}: the transformers model differs from timm's {name} (max relative difference "
                           f"{diff:.2e} > {atol}); not a faithful export")
    return family, diff


def _remove_export(hf_dir):
    """Delete the files export_hf writes (after a failed write or check): never leave a half export."""
    for n in ("config.json", "model.safetensors", "preprocessor_config.json", HF_PROJECTION):
        if os.path.isfile(os.path.join(hf_dir, n)):
            os.remove(os.path.join(hf_dir, n))


def _rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


@torch.no_grad()
def hf_forward(hf, hf_dir, pixels):
    """(hidden_states, embedding) of an exported folder's model: embedding = projection(pooler_output)."""
    from safetensors.torch import load_file
    out = hf(pixel_values=pixels, output_hidden_states=True)
    emb = out.pooler_output
    path = os.path.join(hf_dir, HF_PROJECTION)
    if os.path.isfile(path):
        p = load_file(path)
        emb = F.linear(emb, p["weight"], p["bias"])
    return tuple(out.hidden_states), emb


def export_args(cfg, task):
    """(out_dir, folder) of an export task: ONE post_train.py out_dir, and an empty or new --out folder (never
    written into, or on a failed check deleted from, another run's folder unless --overwrite=True)."""
    from model import LLM2CLIP_CONFIG
    spec, out = cfg["model"], cfg["out"]
    if not spec or "," in spec or not os.path.isfile(os.path.join(spec, LLM2CLIP_CONFIG)):
        raise ValueError(f"--task={task} needs --model=ONE post_train.py out_dir (with {LLM2CLIP_CONFIG}); got {spec!r}")
    if not out:
        raise ValueError(f"--task={task} needs --out=HF_DIR (the transformers folder to write)")
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if held and not cfg.get("overwrite"):
        raise ValueError(f"out={out!r} holds files ({len(held)}: {', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
                         "expected an empty or new folder: choose another --out, or pass --overwrite=True to write over it")
    return spec, out


def run_export_hf(cfg, log, script="evaluate.py"):
    """--task=export_hf --model=OUT_DIR --out=HF_DIR; HF_DIR/run_<script>.json records the run."""
    from model import load_llm2clip
    spec, out = export_args(cfg, "export_hf")
    image_encoder, _ = load_llm2clip(spec, load_text=False)
    name = image_encoder.vision.model_name
    family, diff = export_hf(image_encoder.vision, out, name=f"{spec} ({name})")
    common.save_run_info(out, cfg, script, extra={"export_hf": {"family": family, "source": spec,
                         "timm_model": name, "max_relative_difference": diff}})
    cls = "CLIPVisionModel" if family == "clip" else "SiglipVisionModel"
    log(f"wrote {cls} folder {out} from {spec} ({name}); hidden states and embedding match timm "
        f"(max relative difference {diff:.1e})")
    return {"family": family, "max_relative_difference": diff, "out": out}


def run_export_llm2clip(cfg, log, script="evaluate.py"):
    """--task=export_llm2clip --model=OUT_DIR --out=HF_DIR: the whole model (tower, adaptor, logit scale) as a
    remote-code folder like the released LLM2CLIP models (hf_release.py); HF_DIR/run_<script>.json records the run."""
    spec, out = export_args(cfg, "export_llm2clip")
    diff, config = hf_release.export_release(spec, out)
    common.save_run_info(out, cfg, script, extra={"export_llm2clip": {"source": spec, "timm_model": config["vision_model"],
                                                                      "max_difference": diff}})
    t = config["llm2clip_text"]
    log(f"wrote {out} from {spec} ({config['vision_model']}): AutoModel.from_pretrained({out!r}, trust_remote_code=True) "
        f"matches its encoders (max difference {diff:.1e}); get_text_features takes {t['model']}'s pooled embeddings "
        f"({', '.join(f'{k}={t.get(k)!r}' for k in zoo.TEXT_KEYS)})")
    return {"max_difference": diff, "out": out, "config": config}


EXPORT_TASKS = {"export_hf": run_export_hf, "export_llm2clip": run_export_llm2clip}  # single-process, write --out


# -----------------------------------------------------------------------------
# 2. linear probe on frozen features (Table 4, right half)

PROBE_CHUNK = 10000  # images per cached feature file: a killed run loses at most one chunk


def load_image_model(spec, device, cfg=None):
    """zoo.load_model without the text side (an LLM2CLIP out_dir's LLM is not loaded)."""
    from model import LLM2CLIP_CONFIG, load_llm2clip
    if os.path.isfile(os.path.join(spec, LLM2CLIP_CONFIG)):
        return zoo.LLM2CLIP(load_llm2clip(spec, device=device, load_text=False)[0], None)
    if spec.startswith(zoo.ReleasedLLM2CLIP.PREFIX):  # remote code (evaluate.py --trust_remote_code=True)
        return zoo.ReleasedLLM2CLIP(spec, device, cfg, load_text=False)
    if spec.startswith(zoo.OpenCLIP.PREFIX):  # open_clip:NAME/PRETRAINED (optional package)
        return zoo.OpenCLIP(spec, device)
    return zoo.load_hf_clip(spec, device)


def _model_identity(spec):
    """Which weights produced cached features: for a local folder, the weight files' names, sizes and
    first/last MB; a hub name stands for itself."""
    spec = spec.removeprefix(zoo.ReleasedLLM2CLIP.PREFIX)
    if not os.path.isdir(spec):
        return spec
    h = hashlib.sha256()
    for n in sorted(os.listdir(spec)):
        p = os.path.join(spec, n)
        if n.endswith((".pt", ".safetensors", ".bin", ".json")) and not n.startswith("run_") and os.path.isfile(p):
            size = os.path.getsize(p)
            with open(p, "rb") as f:
                head = f.read(1 << 20)
                f.seek(max(0, size - (1 << 20)))
                h.update(f"{n}\0{size}\0".encode() + head + f.read())
    return h.hexdigest()


def cached_features(m, spec, paths, cache_dir, cfg, dist_info, log):
    """L2-normalised image features of `paths`, computed in chunks of PROBE_CHUNK saved under cache_dir
    (float16, one file per chunk, written atomically): a rerun reuses every finished chunk. meta.json
    records the model identity, preprocessing, precision and image list; a cache made by anything else
    is refused."""
    bf16 = bool(cfg.get("amp")) and str(dist_info[3]).startswith("cuda")  # zoo.encode_images' autocast rule
    meta = {"model": spec, "model_identity": _model_identity(spec), "data_config": common.jsonable(m.data_config),
            "precision": "bfloat16 autocast" if bf16 else "float32",
            "images": hashlib.sha256("\n".join(paths).encode()).hexdigest(), "count": len(paths), "chunk": PROBE_CHUNK}
    meta_path = os.path.join(cache_dir, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        bad = [k for k in meta if old.get(k) != meta[k]]
        if bad:
            raise DataError(f"{meta_path}: cached features were made with different {', '.join(bad)}; "
                            f"delete {cache_dir} or set another --feature_dir")
    elif dist_info[1] == 0:
        os.makedirs(cache_dir, exist_ok=True)
        common.atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    parts, reused = [], 0
    for c, lo in enumerate(range(0, len(paths), PROBE_CHUNK)):
        path = os.path.join(cache_dir, f"chunk_{c:05d}.pt")
        if os.path.isfile(path):
            parts.append(torch.load(path, map_location="cpu", weights_only=True).float())
            reused += 1
            continue
        f = zoo.encode_images(m, paths[lo:lo + PROBE_CHUNK], cfg, dist_info, f"features {c}").cpu()
        if dist_info[1] == 0:
            common.atomic_torch_save(f.half(), path)
        parts.append(f.half().float())  # the same values as a reused chunk
    log(f"{cache_dir}: {len(paths)} images, {reused} of {len(parts)} chunks reused from the cache")
    return torch.cat(parts)


def train_linear_probe(x, y, num_classes, epochs=50, batch_size=1024, lr=0.1, momentum=0.9, weight_decay=0.0,
                       seed=0, device="cpu"):
    """A linear classifier on frozen features: SGD with momentum, cosine lr from `lr` to 0 over all steps,
    zero-initialised weights. Features are standardised with the training set's mean/std first (a frozen
    affine map, MAE's BatchNorm-without-affine), so one learning rate suits any tower's feature scale.
    Returns predict(features) -> logits."""
    x, y = x.float().to(device), torch.as_tensor(y, dtype=torch.long, device=device)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    clf = nn.Linear(x.shape[1], num_classes).to(device)
    nn.init.zeros_(clf.weight), nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(device)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(clf((x[idx] - mean) / std), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return lambda feats: clf((feats.float().to(device) - mean) / std)


def run_linear_probe(cfg, dist_info, log):
    """--task=linear_probe --model=A,B --data=ROOT (ROOT/train/<class>/..., ROOT/val/<class>/...)."""
    root = cfg["data"]
    # a split may lack a class the other has (a small val split): the class lists must match, not the counts
    train_paths, train_y, names, _ = read_class_folder(os.path.join(root, "train"), allow_empty_classes=True, log=log)
    val_paths, val_y, val_names, _ = read_class_folder(os.path.join(root, "val"), allow_empty_classes=True, log=log)
    if names != val_names:
        raise DataError(f"{root}: train/ and val/ need the same class folders; only in one of them: "
                        f"{sorted(set(names) ^ set(val_names))[:5]}")
    log(f"{root}: {len(train_paths)} train / {len(val_paths)} val images, {len(names)} classes "
        f"(chance top-1 {100 / len(names):.2f}%)")
    results, device = {}, dist_info[3]
    for spec in split_specs(cfg["model"], "model"):
        m = load_image_model(spec, device, cfg)
        where = os.path.abspath(spec) if os.path.exists(spec) else spec  # a folder, or a hub name
        base = os.path.join(cfg["feature_dir"], f"{os.path.basename(os.path.normpath(spec))}-"
                                                f"{hashlib.sha256(where.encode()).hexdigest()[:12]}")
        xtr = cached_features(m, spec, train_paths, os.path.join(base, "train"), cfg, dist_info, log)
        xva = cached_features(m, spec, val_paths, os.path.join(base, "val"), cfg, dist_info, log)
        del m
        if dist_info[1] != 0:
            continue
        torch.manual_seed(0)
        predict = train_linear_probe(xtr, train_y, len(names), cfg["probe_epochs"], cfg["probe_batch_size"],
                                     cfg["probe_lr"], cfg["probe_momentum"], cfg["probe_weight_decay"], device=device)
        with torch.no_grad():  # logits @ I.T: the rank of the true class, ties as everywhere (metrics.py)
            rank = ranks(predict(xva), torch.eye(len(names), device=device), torch.tensor(val_y, device=device))
        results[spec] = {"top1": percent(rank < 1), "top5": percent(rank < 5),
                         "n_train": len(train_paths), "n_val": len(val_paths), "dim": xtr.shape[1]}
    if dist_info[1] != 0:
        return None
    table = "| model | linear probe top-1 | top-5 |\n|---|---|---|\n" + "\n".join(
        f"| {s} | {r['top1']:.2f} | {r['top5']:.2f} |" for s, r in results.items())
    log(table)
    if cfg["out"]:
        write_results(cfg["out"], {"task": "linear_probe", "data": root, "classes": len(names),
                                   "results": results, "table": table}, cfg)
    return results


# -----------------------------------------------------------------------------
# 3. multilingual retrieval sets (Table 3) -> manifest records ("captions": all of an image's captions)

def convert_xm3600(src, lang, prefix="images/"):
    """Crossmodal-3600 `captions.jsonl`: per line {"image/key": K, "<lang>": {"caption": [...], ...}, ...}
    for 36 languages; image = prefix + K + ".jpg". Keeps the `lang` captions (1-2 per image, so
    evaluate with --captions_per_image=0)."""
    records, langs = [], set()
    for lineno, obj in read_jsonl(src):
        key = obj.get("image/key")
        langs.update(k for k, v in obj.items() if isinstance(v, dict) and "caption" in v)
        if not isinstance(key, str) or not key:
            raise DataError(f"{src}:{lineno}: expected an \"image/key\" string (Crossmodal-3600 captions.jsonl)")
        if lang not in obj:
            what = f"image {key} has no {lang!r} captions" if lang else "pick the captions' language with --lang"
            raise DataError(f"{src}:{lineno}: {what}; languages here: {', '.join(sorted(langs)) or 'none'}")
        caps = obj[lang].get("caption") if isinstance(obj[lang], dict) else None
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise DataError(f"{src}:{lineno}: {lang}.caption of image {key} must be a non-empty list of non-empty strings")
        records.append({"image": f"{prefix}{key}.jpg", "captions": [c.strip() for c in caps]})
    if not records:
        raise DataError(f"{src}: no records (expected Crossmodal-3600 captions.jsonl)")
    return records


def _read_tagged_captions(path, sep):
    """Lines '<image>#<tags...><sep><caption>' -> {image: [captions]} in file order; errors name the line
    (data.scan_lines: UTF-8, BOM and CRLF as every text reader takes them)."""
    out = {}
    for lineno, _, _, line in scan_lines(path, empty="no captions"):
        key, _, caption = line.partition(sep) if sep else line.strip().partition(" ")
        if "#" not in key or not caption.strip():
            raise DataError(f"{path}:{lineno}: expected '<image>#<n>' then a caption, got {line.strip()[:80]!r}")
        out.setdefault(key.split("#")[0].strip(), []).append(caption.strip())
    return out


def convert_coco_cn(src, split="test", lang="zh", prefix=""):
    """COCO-CN release folder: `coco-cn_<split>.txt` (one image id per line, e.g. COCO_val2014_000000000042)
    and the captions `imageid.human-written-caption.txt` (lang "zh", the usual retrieval protocol:
    1,000 test images, 1-2 captions each) or `imageid.manually-translated-caption.txt` (lang
    "zh-translated", test only): lines '<id>#<n>\\t<caption>'. Image = prefix + train2014|val2014/<id>.jpg."""
    files = {"zh": "imageid.human-written-caption.txt", "zh-translated": "imageid.manually-translated-caption.txt"}
    if lang not in files:
        raise ValueError(f"coco_cn --lang={lang!r}: expected one of {', '.join(files)}")
    ids_path = os.path.join(src, f"coco-cn_{split}.txt")
    if not os.path.isfile(ids_path):
        raise DataError(f"{ids_path}: not found (the COCO-CN split list; --split=train|val|test)")
    caps = _read_tagged_captions(os.path.join(src, files[lang]), "\t")
    records = []
    for lineno, _, _, line in scan_lines(ids_path, empty="no image ids"):
        iid = line.strip()
        if iid not in caps:
            raise DataError(f"{ids_path}:{lineno}: image {iid} has no caption in {files[lang]}")
        folder = iid.split("_")[1] if iid.count("_") >= 2 else ""
        records.append({"image": f"{prefix}{folder}/{iid}.jpg" if folder else f"{prefix}{iid}.jpg",
                        "captions": caps[iid]})
    return records


def convert_flickr30k_cn(src, lang="zh", prefix="flickr30k-images/"):
    """Flickr30k-CN caption file (e.g. the human-translated test set): lines '<image>.jpg#<tags> <caption>'
    (Flickr8k-CN style, space or tab after the key), grouped by image in first-seen order; 5 per image in
    the 1K test set. Image = prefix + <image>.jpg."""
    if lang not in ("zh", ""):
        raise ValueError(f"flickr30k_cn --lang={lang!r}: Flickr30k-CN is Chinese only (zh)")
    first = next(line for _, _, _, line in scan_lines(src, empty="no captions"))
    caps = _read_tagged_captions(src, "\t" if "\t" in first else None)
    return [{"image": prefix + (img if os.path.splitext(img)[1] else img + ".jpg"), "captions": c}
            for img, c in caps.items()]


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = common.configure({k: globals()[k] for k in config_keys}, argv, __doc__)
    if cfg["task"] not in ("linear_probe", *EXPORT_TASKS):
        raise ValueError(f"--task={cfg['task']!r}: downstream.py runs linear_probe or export_hf (retrieval, classify, "
                         "c2c, convert and mteb: evaluate.py) and export_llm2clip")
    common.check_config(cfg, RULES, paths=TASK_PATHS[cfg["task"]])
    if cfg["task"] == "linear_probe":
        zoo.check_model_specs(split_specs(cfg["model"], "model"))
    if cfg["task"] in EXPORT_TASKS:  # single process
        return EXPORT_TASKS[cfg["task"]](cfg, common.Logger(None, "downstream"), script="downstream.py")
    if cfg["out"]:
        check_results_path(cfg["out"])
    ddp, rank, _, world, device = common.setup_distributed()
    log = common.Logger(None, "downstream", master_process=rank == 0)
    try:
        return run_linear_probe(cfg, (ddp, rank, world, cfg["device"] or device), log)
    finally:
        common.cleanup_distributed(ddp)


if __name__ == "__main__":
    common.run_main(main)
