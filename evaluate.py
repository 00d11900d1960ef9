"""Evaluation: zero-shot retrieval (the paper's Table 2), zero-shot classification (Table 4) and
caption-to-caption retrieval (Table 1, the stage-1 quality gate), baseline and post-trained side by side.

    python evaluate.py --task=retrieval --model=openai/clip-vit-base-patch16,out/llm2clip --data=flickr30k,coco
    python evaluate.py --task=retrieval --model=out/llm2clip --data=my_manifest.jsonl --image_root=imgs/
    torchrun --nproc_per_node=8 evaluate.py --task=retrieval ...   (ranks split images/texts, rank 0 scores)
    python evaluate.py --task=classify --model=... --data=imagenet/val --classnames=names.txt
    python evaluate.py --task=c2c --text_model=out/stage1 --captions=coco_dev.jsonl
    python evaluate.py --task=convert --format=karpathy --src=dataset_coco.json --out=data/coco/manifest.jsonl
    python evaluate.py --task=linear_probe --model=... --data=imagenet   (train/ and val/ class folders; Table 4)
    python evaluate.py --task=export_hf --model=out/llm2clip --out=hf/llm2clip_vision   (LLaVA-ready folder)
    python evaluate.py --task=convert --format=xm3600 --lang=de --src=captions.jsonl --out=data/xm3600_de/manifest.jsonl

Metrics follow LAION CLIP_benchmark: image->text is a hit at k if ANY of the image's captions is in
its top k; text->image is scored per caption. Ties are broken by lowest index (see `rank_of_target`).
"""
import json
import os
import re

import torch
import torch.nn.functional as F

import common
from data import (DataError, ImageDataset, convert_docci, convert_karpathy, convert_sharegpt4v,
                  convert_urban1k, read_caption_records, eval_transform, read_jsonl, read_manifest, write_manifest)

# -----------------------------------------------------------------------------
# config: every key can be overridden with --key=value or a config/*.py file
task = "retrieval"       # retrieval | classify | c2c | convert | linear_probe | export_hf (the last two: downstream.py)
model = ""               # comma-separated; each a HF CLIP/SigLIP folder or hub name (baseline, own text
                         # tower), open_clip:NAME/PRETRAINED (e.g. open_clip:EVA02-L-14-336/merged2b_s6b_b61k;
                         # needs pip install open_clip_torch) or an LLM2CLIP out_dir (has llm2clip.json): one
                         # table row per model, one per text encoder of an out_dir (LLM side, CLIP-T, Cat head)
data = ""                # retrieval: comma-separated known names or manifest .jsonl paths; classify: a folder;
                         # linear_probe: a folder with train/ and val/ class folders
data_root = "data"       # known names resolve to <data_root>/<name>/manifest.jsonl, images under <data_root>/<name>/
image_root = ""          # image root of manifest paths given in --data; "" = the manifest's folder
caption_field = ""       # "captions" | "long_captions"; "" = the dataset's own (long-caption sets: long_captions)
captions_per_image = -1  # exact count required; -1 = per dataset (5 for flickr30k/coco, 1 for long sets), 0 = any
out = ""                 # results JSON (retrieval/classify/c2c/linear_probe), manifest (convert) or the
                         # transformers folder (export_hf); "" = print only
device = ""              # "" = cuda if available, else cpu
batch_size = 64          # images (or texts for c2c) per forward pass, per rank
text_batch_size = 256    # texts per forward pass; texts are length-sorted first so padding stays small
num_workers = 4          # image decoding worker processes
amp = True               # bf16 autocast on CUDA (CPU always runs fp32)
# zero-shot classification
classnames = ""          # file, one class name per line in sorted-folder order; "" = for WordNet-id folders
                         # (ImageNet) the shipped config/imagenet/classnames.tsv names, else folder names ("_" -> " ")
templates = ""           # file, one prompt template per line with {}; "" = for WordNet-id folders CLIP's 80
                         # ImageNet templates (config/imagenet/templates.txt), else "a photo of a {}."
# linear probe (Table 4, right half): a linear classifier trained with SGD on cached frozen features
feature_dir = "out/probe_features"  # cached image features, one folder per model and split (reused on rerun)
probe_epochs = 50        # epochs, batch, lr, momentum, weight decay: the recipe issue 14 gives for the paper
probe_batch_size = 1024
probe_lr = 0.1           # peak lr, cosine to 0 over all steps (features are standardised first)
probe_momentum = 0.9
probe_weight_decay = 0.0
# caption-to-caption retrieval
text_model = ""          # HF model folder or stage-1 out_dir, loaded with model.load_text_encoder
captions = ""            # caption JSONL {"id", "captions": [>= 2]}: caption 1 queries, caption 2 is the gallery
# LLM text-encoder settings (c2c, and the text side of an LLM2CLIP model in retrieval/classify, where
# unset values are those recorded in its llm2clip.json, i.e. what its training cache used)
max_length = 0           # text tokens; 0 = the model's own (llm2clip.json / encoder.json), else 512 (paper)
instruction = ""         # c2c: query-side instruction, "" = none (captions are documents, DESIGN.md); retrieval: "" = recorded
bidirectional = None     # None = the encoder's own (encoder.json, else True); False scores a causal LLM as trained
pooling = ""             # "" = the encoder's own (encoder.json, else mean); "mean" | "eos"
chat_template = ""       # "" = the encoder's own (encoder.json, else none); "none"; "llama3" (official embeddings)
dtype = ""               # text encoder dtype for c2c ("bfloat16", ...); "" = the loader's default
# convert public annotations into a manifest
format = ""              # karpathy | sharegpt4v | urban1k | docci | xm3600 | coco_cn | flickr30k_cn
src = ""                 # annotation file (karpathy, sharegpt4v, docci, xm3600, flickr30k_cn) or folder (urban1k, coco_cn)
lang = ""                # xm3600: its language code (de, zh, ...); coco_cn: zh | zh-translated; flickr30k_cn: zh
split = "test"           # karpathy / docci split to keep
num = 1000               # sharegpt4v: the first `num` entries (the paper's ShareGPT4V-1K)
image_prefix = None      # prepended to image paths in the manifest; None = the format's default
config_keys = [k for k, v in dict(globals()).items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]

# The paper's benchmarks: name -> (caption field, captions per image). Short sets are scored with
# 5 captions per image, long-caption sets 1:1 (DESIGN.md, "Evaluate").
KNOWN_DATASETS = {"flickr30k": ("captions", 5), "coco": ("captions", 5), "sharegpt4v": ("long_captions", 1),
                  "urban1k": ("long_captions", 1), "docci": ("long_captions", 1)}


# -----------------------------------------------------------------------------
# metrics

def rank_of_target(scores, target):
    """Rank (0 = best) of column target[r] in each row r of scores (R, N), deterministically:
    rank = #columns with a strictly higher score + #columns with an equal score and a lower index,
    i.e. ties go to the lowest index, like a stable sort by descending score."""
    s = scores.gather(1, target[:, None])
    cols = torch.arange(scores.shape[1], device=scores.device)
    return (scores > s).sum(1) + ((scores == s) & (cols[None, :] < target[:, None])).sum(1)


def _percent(hits):
    return 100.0 * hits.sum().item() / max(1, hits.numel())  # exact count, float64 division


def _chunk_rows(n_cols):
    return max(1, 2 ** 24 // max(1, n_cols))  # ~64 MB of float32 scores per chunk: 5K x 25K fits anywhere


def _ranks(queries, gallery, target):
    """rank_of_target for queries @ gallery.T, computed in row chunks."""
    out, step = [], _chunk_rows(gallery.shape[0])
    for lo in range(0, queries.shape[0], step):
        out.append(rank_of_target(queries[lo:lo + step] @ gallery.T, target[lo:lo + step]))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def retrieval_metrics(image_features, text_features, text_to_image, ks=(1, 5, 10)):
    """Recall@k in percent, both directions: {"i2t_R@1": .., "i2t_R@5": .., ..., "t2i_R@10": ..}.

    Features should be L2-normalised (scores are dot products). text_to_image[t] is the image of
    caption t; any number of captions per image (5 for Flickr30k/COCO, 1 for 1:1 sets). Image->text
    is a hit at k if ANY of the image's captions ranks < k: that is the rank of its best caption
    (highest score, lowest index among equal scores). Text->image is scored per caption. Ties follow
    `rank_of_target`. Similarities are computed in chunks, so 5K images x 25K captions stay small.
    """
    img, txt = image_features.float(), text_features.float()
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=img.device)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if t2i.shape != (n_txt,):
        raise ValueError(f"text_to_image has shape {tuple(t2i.shape)}, expected ({n_txt},): one image index per text")
    if n_txt and (t2i.min() < 0 or t2i.max() >= n_img):
        raise ValueError(f"text_to_image values must be in [0, {n_img}), got [{t2i.min()}, {t2i.max()}]")
    counts = torch.bincount(t2i, minlength=n_img)
    if n_img == 0 or (counts == 0).any():
        raise ValueError(f"every image needs at least one caption; images without: {(counts == 0).sum().item()} of {n_img}")
    if not (torch.isfinite(img).all() and torch.isfinite(txt).all()):
        raise ValueError("features contain NaN or inf")
    cols = torch.arange(n_txt, device=img.device)
    i2t_rank, step = [], _chunk_rows(n_txt)
    for lo in range(0, n_img, step):
        s = img[lo:lo + step] @ txt.T                                           # (c, T)
        pos = t2i[None, :] == torch.arange(lo, lo + s.shape[0], device=img.device)[:, None]
        best = s.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)        # best caption's score
        first = torch.where(pos & (s == best), cols, n_txt).amin(1)             # ... lowest index among ties
        i2t_rank.append(rank_of_target(s, first))
    i2t_rank, t2i_rank = torch.cat(i2t_rank), _ranks(txt, img, t2i)
    out = {f"i2t_R@{k}": _percent(i2t_rank < k) for k in ks}
    out.update({f"t2i_R@{k}": _percent(t2i_rank < k) for k in ks})
    return out


# -----------------------------------------------------------------------------
# models: one interface (data_config, encode_images, encode_texts) for baselines and LLM2CLIP

def _get(d, key):
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def hf_data_config(processor):
    """A HF image processor's settings as a timm data config, under our eval rules: bicubic resize of
    the short side, centre crop, the processor's mean/std. (HF's SigLIP squashes to a square instead;
    we keep one rule for every model, as DESIGN.md asks.)"""
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    if size is None or not (_get(size, "shortest_edge") or (_get(size, "height") and _get(size, "width"))):
        raise ValueError(f"{type(processor).__name__} (size={size!r}) has no fixed input size; variable-resolution "
                         "processors (e.g. SigLIP2 NaFlex) are not supported, use a fixed-size checkpoint")
    short = _get(size, "shortest_edge") or min(_get(size, "height"), _get(size, "width"))
    if getattr(processor, "do_center_crop", False) and crop is not None and _get(crop, "height"):
        h, w = _get(crop, "height"), _get(crop, "width")
    else:
        h, w = (_get(size, "height") or short), (_get(size, "width") or short)
    return {"input_size": (3, h, w), "interpolation": "bicubic", "crop_pct": min(h, w) / short,
            "crop_mode": "center", "mean": tuple(processor.image_mean), "std": tuple(processor.image_std)}


def _pooled(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a ModelOutput


class HFClip:
    """Baseline: a transformers CLIPModel / SiglipModel with its own text tower."""

    def __init__(self, path, device):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.data_config = hf_data_config(AutoImageProcessor.from_pretrained(path))
        self.device = device
        self.siglip = "siglip" in self.model.config.model_type  # trained with max-length padding
        self.max_length = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        self.truncation = dict(texts=0, truncated=0, tokens_cut=0, max_cut=0)  # as model.TextEncoder counts

    def encode_images(self, images):
        return _pooled(self.model.get_image_features(pixel_values=images))

    def encode_texts(self, texts):
        cut = [n - self.max_length for n in map(len, self.tokenizer(texts)["input_ids"]) if n > self.max_length]
        t = self.truncation
        t.update(texts=t["texts"] + len(texts), truncated=t["truncated"] + len(cut),
                 tokens_cut=t["tokens_cut"] + sum(cut), max_cut=max([t["max_cut"], *cut]))
        tok = self.tokenizer(texts, padding="max_length" if self.siglip else True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return _pooled(self.model.get_text_features(**tok))


def import_open_clip(spec):
    """open_clip, imported only when a name asks for it, with an error naming the pip package."""
    try:
        import open_clip
    except ImportError:
        raise ImportError(f"{spec}: open_clip models need the open_clip package, which is not installed: "
                          "pip install open_clip_torch") from None
    return open_clip


def load_open_clip_text(spec, device="cpu"):
    """CLIP-T (stage 2's `clip_text`) from `open_clip:NAME/PRETRAINED`, or from an export's clip_text/ folder
    (an open_clip one has open_clip.json, else it is a transformers CLIP/SigLIP folder)."""
    import model as M
    meta = None
    if os.path.isfile(os.path.join(spec, "open_clip.json")):
        with open(os.path.join(spec, "open_clip.json")) as f:
            meta = json.load(f)
        name, pretrained = meta["open_clip"], ""
    elif spec.startswith(OpenCLIP.PREFIX):
        name, _, pretrained = spec[len(OpenCLIP.PREFIX):].partition("/")
    else:
        return M.load_clip_text(spec, device=device)
    open_clip = import_open_clip(spec)
    model = open_clip.create_model(name, pretrained=pretrained or None)
    tower = M.OpenCLIPText(model, open_clip.get_tokenizer(name), name, open_clip.get_model_config(name)["embed_dim"])
    if meta is not None:
        tower.model.load_state_dict(torch.load(os.path.join(spec, meta["file"]), map_location="cpu", weights_only=True))
    return tower.to(device)


class OpenCLIP:
    """Baseline of a family transformers lacks (EVA02-CLIP, ...): `open_clip:NAME/PRETRAINED`, PRETRAINED an
    open_clip tag or a local checkpoint file (open_clip:NAME//abs/path.pt). open_clip is an optional
    dependency, imported only here."""

    PREFIX = "open_clip:"

    def __init__(self, spec, device):
        open_clip = import_open_clip(spec)
        name, _, pretrained = spec[len(self.PREFIX):].partition("/")
        self.model = open_clip.create_model(name, pretrained=pretrained or None, device=device).eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        pp = self.model.visual.preprocess_cfg  # its size, mean/std; our eval rule: short-side resize + centre crop
        size = pp["size"] if isinstance(pp["size"], (tuple, list)) else (pp["size"], pp["size"])
        self.data_config = {"input_size": (3, *size), "interpolation": pp.get("interpolation", "bicubic"),
                            "crop_pct": 1.0, "crop_mode": "center", "mean": tuple(pp["mean"]), "std": tuple(pp["std"])}
        self.device = device

    def encode_images(self, images):
        return self.model.encode_image(images)

    def encode_texts(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class LLM2CLIP:
    """A post-trained model: image_encoder(images) -> (B, D), text_encoder.encode(texts) -> (N, D)."""

    def __init__(self, image_encoder, text_encoder):
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.data_config = image_encoder.data_config
        if hasattr(image_encoder, "eval"):
            image_encoder.eval()

    def encode_images(self, images):
        return self.image_encoder(images)

    def encode_texts(self, texts):
        return self.text_encoder.encode(texts, batch_size=len(texts))

    @property
    def truncation(self):  # the LLM's counts (None for a text encoder that does not count)
        return getattr(getattr(self.text_encoder, "text_encoder", None), "truncation", None)

    @property
    def max_length(self):
        return getattr(self.text_encoder, "max_length", None)


def _llm_text_settings(cfg):
    """cfg's LLM text-encoder settings that are set (the others stay as llm2clip.json recorded them)."""
    if not cfg:
        return {}
    text = {**common.text_encoder_kwargs(cfg), "instruction": cfg["instruction"] or None,
            "max_length": cfg["max_length"] or None}
    return {k: v for k, v in text.items() if v is not None}


def _log_llm_side(m, text):
    t = getattr(m.text_encoder, "llm_side", m.text_encoder)
    if hasattr(getattr(t, "text_encoder", None), "settings"):  # a model.LLM2CLIPTextEncoder
        print(common.describe_text_encoder(t.text_encoder, text) + f", instruction={t.instruction!r}, "
              f"max_length={t.max_length}")
    return m


def load_models(spec, device, cfg=None):
    """--model item -> [(row name, model)]: one row per text encoder of an LLM2CLIP out_dir (it has
    llm2clip.json: its LLM side, CLIP-T and Cat head, as `text_encoders` lists them; rows "spec [name]" when
    the run has other than the LLM side alone), else one row of a HF CLIP/SigLIP folder or hub name.
    The rows of one out_dir share its image encoder. cfg's LLM text-encoder settings (bidirectional,
    pooling, chat_template, instruction, max_length), where set, override what llm2clip.json recorded."""
    if os.path.isfile(os.path.join(spec, "llm2clip.json")):
        import model as M  # local: baselines need no model.py
        with open(os.path.join(spec, "llm2clip.json")) as f:
            names = json.load(f).get("text_encoders", ["llm"])
        text = _llm_text_settings(cfg)
        kw = {"text_settings": text} if text else {}
        if names == ["llm"]:  # the paper's default run: one row, named by its folder
            return [(spec, _log_llm_side(LLM2CLIP(*M.load_llm2clip(spec, device=device, **kw)), text))]
        image_encoder, _ = M.load_llm2clip(spec, device=device, load_text=False)
        return [(f"{spec} [{n}]", _log_llm_side(LLM2CLIP(image_encoder, M.load_llm2clip_text(
            spec, n, device, load_open_clip_text, **kw)), text)) for n in names]
    if spec.startswith(OpenCLIP.PREFIX):
        return [(spec, OpenCLIP(spec, device))]
    return [(spec, HFClip(spec, device))]


def load_model(spec, device, cfg=None):
    """The first (for an LLM2CLIP out_dir: its main) row of load_models."""
    return load_models(spec, device, cfg)[0][1]


# -----------------------------------------------------------------------------
# encoding: each rank takes a contiguous shard, features are gathered in rank order

def _shard(n, rank, world):
    return n * rank // world, n * (rank + 1) // world


def gather_rows(x, ddp):
    """Concatenate every rank's rows (n_i, D) in rank order; shards may differ in size (or be empty)."""
    if not ddp:
        return x
    import torch.distributed as dist
    meta = [None] * dist.get_world_size()
    dist.all_gather_object(meta, (x.shape[0], x.shape[1] if x.numel() else 0))
    n_max, d = max(m[0] for m in meta), max(m[1] for m in meta)
    padded = x.new_zeros(n_max, d)
    if x.shape[0]:
        padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in meta]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, (n, _) in zip(parts, meta)])


def _autocast(device, amp):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and str(device).startswith("cuda"))


@torch.no_grad()
def encode_images(m, paths, cfg, dist_info, desc="images"):
    """L2-normalised features of all images (every rank returns all of them)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm
    ddp, rank, world, device = dist_info
    lo, hi = _shard(len(paths), rank, world)
    loader = DataLoader(ImageDataset(paths[lo:hi], eval_transform(m.data_config)),
                        batch_size=cfg["batch_size"], num_workers=cfg["num_workers"])
    feats = []
    for x, _ in tqdm(loader, desc=desc, disable=rank != 0):
        with _autocast(device, cfg["amp"]):
            feats.append(F.normalize(m.encode_images(x.to(device)).float(), dim=-1))
    return gather_rows(torch.cat(feats) if feats else torch.zeros(0, 0, device=device), ddp)


@torch.no_grad()
def encode_texts(m, texts, cfg, dist_info, desc="texts"):
    """L2-normalised features of all texts, encoded longest-first in batches (minimal padding)."""
    from tqdm import tqdm
    ddp, rank, world, device = dist_info
    lo, hi = _shard(len(texts), rank, world)
    order = sorted(range(lo, hi), key=lambda i: -len(texts[i]))
    bs, feats = cfg["text_batch_size"], {}
    for b in tqdm(range(0, len(order), bs), desc=desc, disable=rank != 0):
        idx = order[b:b + bs]
        with _autocast(device, cfg["amp"]):
            f = F.normalize(m.encode_texts([texts[i] for i in idx]).float(), dim=-1)
        feats.update(zip(idx, f.to(device)))
    local = torch.stack([feats[i] for i in range(lo, hi)]) if feats else torch.zeros(0, 0, device=device)
    return gather_rows(local, ddp)


# -----------------------------------------------------------------------------
# datasets

def resolve_dataset(spec, cfg):
    """A --data item -> {name, manifest, records, texts, text_to_image, field, captions_per_image}."""
    if spec.endswith(".jsonl") or os.path.isfile(spec):
        name, path = os.path.splitext(os.path.basename(spec))[0], spec
        if name == "manifest":  # <folder>/manifest.jsonl is named after its folder
            name = os.path.basename(os.path.dirname(os.path.abspath(spec)))
        root = cfg["image_root"] or None
        has_short = any(obj.get("captions") for _, obj in read_jsonl(path))
        field, cpi = ("captions" if has_short else "long_captions"), 0
    elif spec in KNOWN_DATASETS:
        name, path = spec, os.path.join(cfg["data_root"], spec, "manifest.jsonl")
        root = os.path.join(cfg["data_root"], spec)
        if not os.path.isfile(path):
            raise DataError(f"dataset {spec!r}: {path} not found; convert its annotations first "
                            f"(python evaluate.py --task=convert ..., see README) or set --data_root")
        field, cpi = KNOWN_DATASETS[spec]
    else:
        raise ValueError(f"unknown dataset {spec!r}: expected a manifest .jsonl path or one of "
                         f"{', '.join(KNOWN_DATASETS)} (resolved under --data_root={cfg['data_root']})")
    field = cfg["caption_field"] or field
    cpi = cpi if cfg["captions_per_image"] < 0 else cfg["captions_per_image"]
    records = read_manifest(path, image_root=root, field=field, captions_per_image=cpi)
    texts = [c for r in records for c in r[field]]
    text_to_image = [i for i, r in enumerate(records) for _ in r[field]]
    return {"name": name, "manifest": path, "records": records, "texts": texts,
            "text_to_image": text_to_image, "field": field, "captions_per_image": cpi}


def markdown_table(results, datasets):
    """Rows: models; columns: I2T and T2I R@1 per dataset and their average (the paper's Table 2)."""
    head = ["model"] + [f"{d} {x}" for d in datasets for x in ("I2T", "T2I")] + ["avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per in results.items():
        vals = [per[d][f"{x}_R@1"] for d in datasets for x in ("i2t", "t2i")]
        cells = [name] + [f"{v:.1f}" for v in vals] + [f"{sum(vals) / len(vals):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_results(path, payload, cfg):
    import datetime
    payload.update(config=cfg, code_version=common.code_version(),
                   time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    common.atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# tasks

def run_retrieval(cfg, dist_info, log):
    specs, data_specs = _split(cfg["model"], "model"), _split(cfg["data"], "data")
    datasets = [resolve_dataset(s, cfg) for s in data_specs]
    names = [d["name"] for d in datasets]
    if len(set(names)) != len(names) or len(set(specs)) != len(specs):
        raise ValueError(f"duplicate entries in --model={cfg['model']} or in --data (dataset names: "
                         f"{', '.join(names)}); give each model once and manifests distinct names")
    for d in datasets:
        log(f"{d['name']}: {len(d['records'])} images, {len(d['texts'])} texts ({d['field']}, "
            f"{d['captions_per_image'] or 'any'} per image) from {d['manifest']}")
    results = {}
    for spec in specs:
        rows = load_models(spec, dist_info[3], cfg)
        for name, _ in rows:
            results[name] = {}
        for d in datasets:  # images once per model: the rows of one run share its image encoder
            img = encode_images(rows[0][1], [r["image"] for r in d["records"]], cfg, dist_info, f"{d['name']} images")
            for name, m in rows:
                t0 = dict(getattr(m, "truncation", None) or {})
                txt = encode_texts(m, d["texts"], cfg, dist_info, f"{d['name']} texts")
                if t0:  # how many texts max_length cut (summed over ranks)
                    cut = torch.tensor([m.truncation[k] - t0[k] for k in ("texts", "truncated", "tokens_cut")])
                    if dist_info[0]:
                        cut = cut.to(dist_info[3])
                        torch.distributed.all_reduce(cut)
                    t0 = dict(zip(("texts", "truncated", "tokens_cut"), cut.tolist()), max_cut=m.truncation["max_cut"])
                    log(f"{name} on {d['name']}: " + common.describe_truncation(t0, m.max_length))
                if dist_info[1] == 0:
                    r = retrieval_metrics(img, txt, d["text_to_image"])
                    results[name][d["name"]] = {**r, "n_images": img.shape[0], "n_texts": txt.shape[0]}
                    log(f"{name} on {d['name']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
        del rows
    if dist_info[1] != 0:
        return None
    table = markdown_table(results, [d["name"] for d in datasets])
    log(table)
    payload = {"task": "retrieval", "results": results, "table": table,
               "datasets": {d["name"]: {"manifest": d["manifest"], "field": d["field"],
                                        "captions_per_image": d["captions_per_image"]} for d in datasets}}
    if cfg["out"]:
        _write_results(cfg["out"], payload, cfg)
    return payload


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# ImageNet-1k zero-shot defaults, shipped as data: WordNet id -> class name (the names CLIP's notebooks
# and open_clip use, in sorted-WNID order) and CLIP's 80 prompt templates
IMAGENET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "imagenet")
IMAGENET_CLASSNAMES = os.path.join(IMAGENET_DIR, "classnames.tsv")
IMAGENET_TEMPLATES = os.path.join(IMAGENET_DIR, "templates.txt")


def imagenet_classnames():
    """{wnid: class name} from the shipped config/imagenet/classnames.tsv."""
    with open(IMAGENET_CLASSNAMES, encoding="utf-8") as f:
        return dict(line.rstrip("\n").split("\t") for line in f if line.strip())


def _read_templates(path):
    with open(path, encoding="utf-8") as f:
        templates = [ln.strip() for ln in f if ln.strip()]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise DataError(f"{path}: every template needs a {{}} for the class name; bad: {bad[:3]}")
    return templates


def read_class_folder(root, classnames_file="", templates_file=""):
    """ImageNet-style folder: (image paths, labels, class names, templates). Classes are the sorted
    subfolders (torchvision ImageFolder order); names from a file (one per line, same order), else for
    WordNet-id folders (n01440764, ...) the shipped ImageNet names and CLIP's 80 templates, else the
    folder names and "a photo of a {}."."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    if not classes:
        raise DataError(f"{root}: no class subfolders (expected an ImageNet-style folder: <root>/<class>/<image>)")
    wnid = all(re.fullmatch(r"n\d{8}", c) for c in classes)
    names = [c.replace("_", " ") for c in classes]
    if classnames_file:
        with open(classnames_file, encoding="utf-8") as f:
            names = [ln.strip() for ln in f if ln.strip()]
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
        files = sorted(f for f in os.listdir(os.path.join(root, cls)) if f.lower().endswith(IMAGE_EXTENSIONS))
        paths += [os.path.join(root, cls, f) for f in files]
        labels += [c] * len(files)
    if not paths:
        raise DataError(f"{root}: no images in the class folders")
    return paths, labels, names, templates


def run_classify(cfg, dist_info, log):
    """Zero-shot top-1/top-5: class embedding = mean of its normalised prompt embeddings, renormalised."""
    paths, labels, names, templates = read_class_folder(cfg["data"], cfg["classnames"], cfg["templates"])
    log(f"{cfg['data']}: {len(paths)} images, {len(names)} classes (e.g. {', '.join(names[:3])}), "
        f"{len(templates)} prompt templates (e.g. {templates[0]!r})")
    results = {}
    for spec in _split(cfg["model"], "model"):
        rows = load_models(spec, dist_info[3], cfg)
        img = encode_images(rows[0][1], paths, cfg, dist_info)
        for name, m in rows:
            txt = encode_texts(m, [t.format(n) for n in names for t in templates], cfg, dist_info, "prompts")
            if dist_info[1] == 0:
                cls = F.normalize(txt.view(len(names), len(templates), -1).mean(1), dim=-1)
                rank = _ranks(img, cls, torch.tensor(labels, device=img.device))
                results[name] = {"top1": _percent(rank < 1), "top5": _percent(rank < 5), "n": len(paths)}
                log(f"{name}: top-1 {results[name]['top1']:.2f}, top-5 {results[name]['top5']:.2f}")
        del rows
    if dist_info[1] == 0 and cfg["out"]:
        _write_results(cfg["out"], {"task": "classify", "data": cfg["data"], "results": results}, cfg)
    return results


@torch.no_grad()
def c2c_eval(encoder, records_or_captions, instruction=None, max_length=512, batch_size=64):
    """Caption-to-caption top-1 (percent): caption 1 of each record queries the gallery of every
    record's caption 2 (`c2c_top1`), and the reverse (`c2c_top1_reverse`). The instruction, if any,
    goes on the query side only (as in CC training). `encoder.encode(texts, instruction, max_length,
    batch_size)` -> (N, D); features are L2-normalised here. Restores the encoder's train/eval mode."""
    caps = [r["captions"] if isinstance(r, dict) else r for r in records_or_captions]
    if not caps or min(len(c) for c in caps) < 2:
        raise ValueError("c2c_eval needs records with at least 2 captions each")
    was_training = getattr(encoder, "training", False)
    if hasattr(encoder, "eval"):
        encoder.eval()

    def enc(texts, ins):
        f = encoder.encode(texts, instruction=ins, max_length=max_length, batch_size=batch_size)
        return F.normalize(torch.as_tensor(f).float(), dim=-1)

    first, second = [c[0] for c in caps], [c[1] for c in caps]
    counts = getattr(encoder, "truncation", None)  # model.TextEncoder counts the texts max_length cuts
    cut0 = counts["truncated"] if counts else 0
    d1, d2 = enc(first, None), enc(second, None)
    q1, q2 = (enc(first, instruction), enc(second, instruction)) if instruction else (d1, d2)
    if was_training:
        encoder.train()
    target = torch.arange(len(caps), device=d1.device)
    out = {"c2c_top1": _percent(_ranks(q1, d2, target) == 0),
           "c2c_top1_reverse": _percent(_ranks(q2, d1, target) == 0), "n": len(caps)}
    if counts:
        out["truncated"] = encoder.truncation["truncated"] - cut0  # texts cut to max_length
    return out


def run_c2c(cfg, log):
    if not cfg["text_model"] or not cfg["captions"]:
        raise ValueError("--task=c2c needs --text_model=PATH and --captions=FILE")
    records = read_caption_records(cfg["captions"])  # bad input fails before the model loads
    from model import load_text_encoder  # local: retrieval and convert run without model.py
    kwargs = common.text_encoder_kwargs(cfg)
    enc = load_text_encoder(cfg["text_model"], dtype=getattr(torch, cfg["dtype"]) if cfg["dtype"] else None, **kwargs)
    max_length = cfg["max_length"] or enc.settings.get("max_length") or 512
    log(common.describe_text_encoder(enc, kwargs) + f", instruction={cfg['instruction']!r}, max_length={max_length}")
    r = c2c_eval(enc, records, instruction=cfg["instruction"] or None, max_length=max_length,
                 batch_size=cfg["batch_size"])
    used = {"bidirectional": enc.settings["bidirectional"], "pooling": enc.pooling,
            "chat_template": enc.chat_template, "instruction": cfg["instruction"], "max_length": max_length}
    log(f"| text model | captions | n | c2c top-1 | reverse |\n|---|---|---|---|---|\n"
        f"| {cfg['text_model']} | {cfg['captions']} | {r['n']} | {r['c2c_top1']:.1f} | {r['c2c_top1_reverse']:.1f} |")
    log(common.describe_truncation(enc.pop_truncation(), cfg["max_length"]))
    if cfg["out"]:
        _write_results(cfg["out"], {"task": "c2c", "text_model": cfg["text_model"], "captions": cfg["captions"],
                                    "text_encoder": used, **r}, cfg)
    return r


def run_convert(cfg, log):
    fmt, src, prefix = cfg["format"], cfg["src"], cfg["image_prefix"]
    kw = {} if prefix is None else {"prefix": prefix}
    converters = {"karpathy": lambda: convert_karpathy(src, split=cfg["split"], log=log, **kw),
                  "sharegpt4v": lambda: convert_sharegpt4v(src, num=cfg["num"], **kw),
                  "urban1k": lambda: convert_urban1k(src, **kw),
                  "docci": lambda: convert_docci(src, split=cfg["split"], **kw)}
    import downstream  # the multilingual sets (Table 3)
    converters.update({"xm3600": lambda: downstream.convert_xm3600(src, lang=cfg["lang"], **kw),
                       "coco_cn": lambda: downstream.convert_coco_cn(src, cfg["split"], cfg["lang"] or "zh", **kw),
                       "flickr30k_cn": lambda: downstream.convert_flickr30k_cn(src, cfg["lang"], **kw)})
    if fmt not in converters:
        raise ValueError(f"--format={fmt!r}: expected one of {', '.join(converters)}")
    if not src or not os.path.exists(src):
        raise DataError(f"--src={src!r}: not found (the {fmt} annotation file or folder)")
    if not cfg["out"]:
        raise ValueError("--task=convert needs --out=manifest.jsonl")
    n = write_manifest(cfg["out"], converters[fmt]())
    log(f"wrote {n} records to {cfg['out']}")
    return n


def _split(value, key):
    items = [s.strip() for s in value.split(",") if s.strip()]
    if not items:
        raise ValueError(f"--{key} is empty; give one or more comma-separated values")
    return items


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = common.configure({k: globals()[k] for k in config_keys}, argv, __doc__)
    tasks = ("retrieval", "classify", "c2c", "convert", "linear_probe", "export_hf")
    if cfg["task"] not in tasks:
        raise ValueError(f"--task={cfg['task']!r}: expected one of {', '.join(tasks)}")
    pos = (lambda v: v > 0, "a positive integer")
    common.check_config(cfg, {"batch_size": pos, "text_batch_size": pos,
                              "max_length": (lambda v: v >= 0, "an integer >= 0 (0 = the model's own)"),
                              "num_workers": (lambda v: v >= 0, "an integer >= 0")})
    if cfg["out"] and cfg["task"] != "export_hf":  # a results file: found now, not after every model is scored
        folder = os.path.dirname(os.path.abspath(cfg["out"]))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ValueError(f"out={cfg['out']!r}: cannot create {folder} ({e.strerror or e})") from None
        if not os.access(folder, os.W_OK) or os.path.isdir(cfg["out"]):
            raise ValueError(f"out={cfg['out']!r}: not a writable file path")
    if cfg["task"] in ("c2c", "convert", "export_hf"):  # single process
        log = common.Logger(None, "evaluate")
        if cfg["task"] == "export_hf":
            import downstream
            return downstream.run_export_hf(cfg, log)
        return run_c2c(cfg, log) if cfg["task"] == "c2c" else run_convert(cfg, log)
    ddp, rank, _, world, device = common.setup_distributed()
    device = cfg["device"] or device
    log = common.Logger(None, "evaluate", master_process=rank == 0)
    try:
        if cfg["task"] == "linear_probe":
            import downstream
            return downstream.run_linear_probe(cfg, (ddp, rank, world, device), log)
        run = run_retrieval if cfg["task"] == "retrieval" else run_classify
        return run(cfg, (ddp, rank, world, device), log)
    finally:
        common.cleanup_distributed(ddp)


if __name__ == "__main__":
    main()
