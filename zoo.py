"""Every model family evaluate.py scores, behind one interface (data_config, encode_images(images),
encode_texts(texts)): transformers CLIP/SigLIP folders or hub names, open_clip:NAME/PRETRAINED (an
optional package, imported only when named), LLM2CLIP out_dirs (one row per text encoder) and
hf_llm2clip:PATH (remote-code LLM2CLIP folders: the released models, hf_release.py's exports); plus
the sharded encoding of images and texts with any of them. And the other end of an LLM2CLIP out_dir:
the text settings post_train.py embeds captions with, its held-out eval set, and `export`, which writes
what load_models (model.load_llm2clip) reads back.

Kept out of the stage scripts so evaluate.py reads as metrics, datasets and tasks and post_train.py as
its training loop; downstream.py (linear probe, HF export) loads models from here too.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from cache import EmbeddingCache, encoder_mismatch, model_fingerprint
from data import DataError, ImageDataset, eval_transform, open_image, read_manifest
from data_index import worker_init

# -----------------------------------------------------------------------------
# what a --model / --device value must be, checked before any model loads (with the scripts' other rules)

def is_device(v):
    """A --device value torch can parse ("cpu", "cuda", "cuda:1"); "" and "auto" mean the default."""
    if v in ("", "auto"):
        return True
    try:
        torch.device(v)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


DEVICE_RULE = (is_device, "'' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'")


def check_model_specs(specs, key="model", trust_remote_code=False):
    """Each --model item as common.check_config checks a "model" path (a path-looking one that does not exist
    is an error naming `key`, never a hub lookup; in open_clip:NAME/PRETRAINED a path-looking PRETRAINED must be a file).
    hf_llm2clip:PATH runs PATH's own Python code, so it also needs trust_remote_code (--trust_remote_code=True)."""
    for spec in specs:
        if spec.startswith(ReleasedLLM2CLIP.PREFIX):
            spec = spec[len(ReleasedLLM2CLIP.PREFIX):]
            if not spec or not trust_remote_code:
                raise ValueError(f"{key}={ReleasedLLM2CLIP.PREFIX}{spec}: " + (
                    "expected hf_llm2clip:FOLDER_OR_HUB_NAME" if not spec else "a released-style LLM2CLIP model runs the "
                    "Python files of its folder (transformers remote code); pass --trust_remote_code=True to allow it"))
        common.check_config({key: spec}, paths={key: "model"})


# -----------------------------------------------------------------------------
# models: one interface (data_config, encode_images, encode_texts) for baselines and LLM2CLIP

def _get(d, key):
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def hf_data_config(processor):
    """A HF image processor's settings as a timm data config, under our eval rules: bicubic resize of
    the short side, centre crop, the processor's mean/std. (HF's SigLIP squashes to a square instead;
    we keep one rule for every model, as docs/DESIGN.md asks.)"""
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


def hf_image_processor(data_config):
    """The other way (for the exports): a CLIPImageProcessor with our eval transform's geometry and statistics:
    bicubic resize of the short side to floor(size / crop_pct), centre crop to size, the tower's mean/std (also
    for SigLIP towers: SiglipImageProcessor can only squash to a square). Known difference: transformers' centre
    crop starts at floor((L - size) / 2), torchvision's (ours) at round-half-even, one pixel further when
    L - size is 3 mod 4. transformers' default torchvision backend also resizes tensors, not PIL images
    (~1/255 apart); `backend="pil"` reproduces our pixels exactly otherwise."""
    from transformers import CLIPImageProcessor
    _, h, w = data_config["input_size"]
    if h != w or data_config.get("crop_mode", "center") != "center" or data_config.get("interpolation") != "bicubic":
        raise ValueError(f"data config {data_config}: an exported image processor holds square, bicubic, "
                         "centre-crop preprocessing only")
    short = math.floor(h / data_config.get("crop_pct", 1.0))
    return CLIPImageProcessor(size={"shortest_edge": short}, crop_size={"height": h, "width": w}, resample=3,
                              do_center_crop=True, image_mean=list(data_config["mean"]), image_std=list(data_config["std"]))


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


# -----------------------------------------------------------------------------
# CLIP's own text tower (CLIP-T) for stage 2's Table 10 variants b-d and their exports

class CLIPText(nn.Module):
    """A pretrained CLIP/SigLIP text tower with its projection: forward(clip_ids, clip_mask) -> (B, dim).

    `tokenize` truncates to the tower's context (77 for CLIP, 64 for SigLIP); SigLIP was trained with
    max-length padding, so it pads to that length (as its processor does), CLIP to the longest text.
    """

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.siglip = "siglip" in cfg.model_type
        self.max_length = getattr(cfg, "max_position_embeddings", 77)
        self.dim = getattr(cfg, "projection_dim", None) if not self.siglip else cfg.hidden_size

    def tokenize(self, texts):
        tok = self.tokenizer(list(texts), padding="max_length" if self.siglip else True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        out = {"clip_ids": tok["input_ids"]}
        if "attention_mask" in tok and not self.siglip:  # SigLIP attends to its padding, as in training
            out["clip_mask"] = tok["attention_mask"]
        return out

    def forward(self, clip_ids, clip_mask=None):
        out = self.model(input_ids=clip_ids, attention_mask=clip_mask)
        return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # (B, dim)

    @torch.no_grad()
    def encode(self, texts, batch_size=256):
        """Raw strings -> L2-normalised (N, dim), in input order."""
        device = next(self.parameters()).device
        feats = []
        for s in range(0, len(texts), batch_size):
            tok = {k: v.to(device) for k, v in self.tokenize(texts[s:s + batch_size]).items()}
            feats.append(F.normalize(self(**tok).float(), dim=-1))
        return torch.cat(feats) if feats else torch.zeros(0, self.dim)

    def save_pretrained(self, path):
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


class OpenCLIPText(CLIPText):
    """CLIP-T of an open_clip model (EVA02-CLIP and other families transformers lacks), with CLIPText's
    interface. Built by load_open_clip_text: open_clip is an optional dependency, imported only there. The vision tower is dropped; open_clip's tokenizer pads to its context (77) and the tower finds the
    end-of-text token itself, so there is no mask."""

    def __init__(self, model, tokenizer, name, dim):
        nn.Module.__init__(self)
        model.visual = None  # CLIP-T only
        self.model, self.tokenizer, self.name, self.dim, self.siglip = model, tokenizer, name, dim, False

    def tokenize(self, texts):
        return {"clip_ids": self.tokenizer(list(texts))}

    def forward(self, clip_ids, clip_mask=None):
        return self.model.encode_text(clip_ids)

    def save_pretrained(self, path):
        """open_clip.json (model name, dim) + the text tower's state dict: what load_open_clip_text rebuilds."""
        os.makedirs(path, exist_ok=True)
        torch.save(self.model.state_dict(), os.path.join(path, "open_clip_text.pt"))
        with open(os.path.join(path, "open_clip.json"), "w") as f:
            json.dump({"open_clip": self.name, "dim": self.dim, "file": "open_clip_text.pt"}, f)


def load_clip_text(name_or_path, device=None):
    """The text tower + projection of a transformers CLIPModel / SiglipModel / Siglip2Model folder or hub
    name (or of a folder this function's CLIPText.save_pretrained wrote) -> CLIPText. The vision weights
    in the checkpoint are skipped (the text classes share the full model's weight names)."""
    from transformers import AutoConfig, AutoTokenizer
    import transformers
    config = AutoConfig.from_pretrained(name_or_path)
    model_type = config.model_type
    classes = {"clip": "CLIPTextModelWithProjection", "clip_text_model": "CLIPTextModelWithProjection",
               "siglip": "SiglipTextModel", "siglip_text_model": "SiglipTextModel",
               "siglip2": "Siglip2TextModel", "siglip2_text_model": "Siglip2TextModel"}
    if model_type not in classes:
        raise ValueError(f"clip_text={name_or_path!r}: model_type {model_type!r} is not a transformers CLIP/SigLIP "
                         f"model (expected one of {sorted(classes)}); other families load through open_clip")
    if hasattr(config, "text_config"):  # a full CLIP/SigLIP: its text part (CLIP keeps projection_dim at the top)
        text_config = config.text_config
        if hasattr(config, "projection_dim"):
            text_config.projection_dim = config.projection_dim
        config = text_config
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the checkpoint's vision weights are skipped on purpose
    try:
        model = getattr(transformers, classes[model_type]).from_pretrained(name_or_path, config=config)
    finally:
        transformers.logging.set_verbosity(verbosity)
    tower = CLIPText(model, AutoTokenizer.from_pretrained(name_or_path))
    return tower.to(device) if device is not None else tower


class CatTextEncoder(nn.Module):
    """Inference wrapper of Table 10 (d): CatHead(LLM side, CLIP-T) -> L2-normalised (N, D)."""

    def __init__(self, llm_side, clip_text, cat_head):
        super().__init__()
        self.llm_side, self.clip_text, self.cat_head = llm_side, clip_text, cat_head

    @torch.no_grad()
    def encode(self, texts, batch_size=64, progress=None):
        llm = self.llm_side.encode(texts, batch_size, progress)  # CatHead normalises both inputs anyway
        clip = self.clip_text.encode(texts, batch_size)
        p = next(self.cat_head.parameters())
        return F.normalize(self.cat_head(llm.to(p.device), clip.to(p.device)), dim=-1)


def load_llm2clip_text(out_dir, text=None, device="cpu", clip_loader=None, text_settings=None):
    """One text encoder of a post_train.py export: "llm" (model.load_llm_side), "clip_t" (CLIP's own text
    tower as fine-tuned) or "cat" (both through the Cat head). clip_loader(folder, device) loads the
    exported CLIP-T (default load_open_clip_text: a transformers folder or an open_clip one)."""
    import model as M
    meta = M.read_llm2clip_config(out_dir)
    names = meta.get("text_encoders", ["llm"])
    text = text or names[0]
    if text not in names:
        raise ValueError(f"{out_dir}: text encoder {text!r} not in this run's {names}")
    llm_side = M.load_llm_side(out_dir, meta, device, text_settings) if text in ("llm", "cat") else None
    if text == "llm":
        return llm_side
    clip_text = (clip_loader or load_open_clip_text)(os.path.join(out_dir, meta["clip_text"]["dir"]), device=device)
    if text == "clip_t":
        return clip_text.eval()
    h = meta["cat_head"]
    head = M.CatHead(h["llm_dim"], h["clip_dim"], h["out_dim"])
    head.load_state_dict(M._load_state(os.path.join(out_dir, h["file"])))
    return CatTextEncoder(llm_side, clip_text.eval(), head.to(device)).eval()


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
    meta = None
    if os.path.isfile(os.path.join(spec, "open_clip.json")):
        with open(os.path.join(spec, "open_clip.json")) as f:
            meta = json.load(f)
        name, pretrained = meta["open_clip"], ""
    elif spec.startswith(OpenCLIP.PREFIX):
        name, _, pretrained = spec[len(OpenCLIP.PREFIX):].partition("/")
    else:
        return load_clip_text(spec, device=device)
    open_clip = import_open_clip(spec)
    model = open_clip.create_model(name, pretrained=pretrained or None)
    tower = OpenCLIPText(model, open_clip.get_tokenizer(name), name, open_clip.get_model_config(name)["embed_dim"])
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


class ReleasedLLM2CLIP:
    """`hf_llm2clip:PATH`: an LLM2CLIP model shipped as transformers remote code (the released
    microsoft/LLM2CLIP-Openai-B-16, -L-14-224, -L-14-336, or a folder hf_release.py wrote), scored as code written
    for those models uses them: get_image_features(pixel_values) with its CLIP image processor's settings (under
    our one preprocessing rule, hf_data_config) and get_text_features(embeddings) on the stage-1 encoder's pooled
    caption embeddings. The text side is cfg's text_model, else the folder's `llm2clip_text` (our exports record
    theirs), else RELEASED_TEXT_MODEL; each setting is cfg's where set, else that record's, else a stage-1
    out_dir's own, else RELEASED_TEXT. The image processor: cfg's image_processor, else the folder's
    preprocessor_config.json, else a released model's base CLIP (BASE_PROCESSORS). Needs cfg trust_remote_code."""

    PREFIX = "hf_llm2clip:"
    RELEASED_TEXT_MODEL = "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"
    # how the official code embeds captions for its released models (llm2clip/data/extract_embedding.py and
    # mteb's wrapper: LLM2Vec(pooling_mode="mean", max_length=512, doc_max_length=512) on the name that turns on
    # its Llama-3 user-turn wrapping); docs/evaluation.md
    RELEASED_TEXT = {"bidirectional": True, "pooling": "mean", "chat_template": "llama3", "instruction": None,
                     "max_length": 512, "official_extraction": True}
    BASE_PROCESSORS = {"LLM2CLIP-Openai-B-16": "openai/clip-vit-base-patch16",
                       "LLM2CLIP-Openai-L-14-224": "openai/clip-vit-large-patch14",
                       "LLM2CLIP-Openai-L-14-336": "openai/clip-vit-large-patch14-336"}  # released without one

    def __init__(self, spec, device, cfg=None, load_text=True):
        from transformers import AutoImageProcessor, AutoModel
        cfg = cfg or {}
        self.path, self.device = spec[len(self.PREFIX):], device
        check_model_specs([spec], trust_remote_code=cfg.get("trust_remote_code"))
        try:
            self.model = AutoModel.from_pretrained(self.path, trust_remote_code=True).to(device).eval()
            proc = cfg.get("image_processor") or (
                self.path if os.path.isfile(os.path.join(self.path, "preprocessor_config.json")) else
                self.BASE_PROCESSORS.get(os.path.basename(self.path.rstrip("/"))))
            if not proc:
                raise ValueError("no preprocessor_config.json: pass --image_processor=NAME (the CLIP it was "
                                 "post-trained from, e.g. openai/clip-vit-large-patch14-336)")
            self.data_config = hf_data_config(AutoImageProcessor.from_pretrained(proc))
        except (OSError, ValueError) as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise ValueError(f"model={spec!r}: cannot load it as a remote-code LLM2CLIP model ({first})") from None
        self.text_encoder = self._text_encoder(cfg) if load_text else None

    def _text_encoder(self, cfg):
        import model as M
        own = dict(getattr(self.model.config, "llm2clip_text", None) or {})
        name = cfg.get("text_model") or own.get("model") or self.RELEASED_TEXT_MODEL
        if own and not cfg.get("text_model"):
            check_export_text_model(self.path, {"text": own})
        stage1 = os.path.isfile(os.path.join(name, M.ENCODER_CONFIG))
        base, where = (own, "the folder's llm2clip_text") if own else (
            ({}, "its encoder.json") if stage1 else (self.RELEASED_TEXT, "the official extraction's"))
        given = _llm_text_settings(cfg)
        t = {k: given.get(k, base.get(k)) for k in TEXT_KEYS}
        enc = M.load_text_encoder(name, bidirectional=t["bidirectional"], pooling=t["pooling"],
                                  chat_template=t["chat_template"], official_extraction=t.get("official_extraction"),
                                  dtype=cfg.get("dtype") or None, device=self.device)
        self.instruction, self.max_length = t["instruction"], t["max_length"] or enc.settings.get("max_length") or 512
        print(common.describe_text_encoder(enc, given) + f", instruction={self.instruction!r}, max_length="
              f"{self.max_length} (settings not set: {where})")
        return enc

    def encode_images(self, images):
        return _pooled(self.model.get_image_features(pixel_values=images.to(self.model.dtype)))

    def encode_texts(self, texts):
        emb = self.text_encoder.encode(texts, self.instruction, self.max_length, batch_size=len(texts))
        return _pooled(self.model.get_text_features(emb.to(self.device, self.model.dtype)))

    @property
    def truncation(self):
        return getattr(self.text_encoder, "truncation", None)


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


def check_export_text_model(spec, meta):
    """An export names its stage-1 encoder by path: refuse one retrained or replaced in place since (its
    weights fingerprint differs), which would score the adaptor against other embeddings silently."""
    t = meta.get("text") or {}
    if not t.get("fingerprint"):
        return  # a hub name, or an export of older code
    path = t["model"] if os.path.isabs(t["model"]) else os.path.join(spec, t["model"])
    now = model_fingerprint(path)
    if now != t["fingerprint"]:
        raise ValueError(f"{os.path.join(spec, 'llm2clip.json')}: its text model {path} is not the one it was "
                         f"trained with (fingerprint {t['fingerprint'][:12]}, now {str(now)[:12]}); expected that "
                         "stage-1 encoder unchanged: restore it or post-train again")


def load_models(spec, device, cfg=None):
    """--model item -> [(row name, model)]: one row per text encoder of an LLM2CLIP out_dir (it has
    llm2clip.json: its LLM side, CLIP-T and Cat head, as `text_encoders` lists them; rows "spec [name]" when
    the run has other than the LLM side alone), one row of hf_llm2clip:PATH (ReleasedLLM2CLIP), else one row of
    a HF CLIP/SigLIP folder or hub name. The rows of one out_dir share its image encoder. cfg's LLM text-encoder
    settings (bidirectional, pooling, chat_template, instruction, max_length), where set, override what
    llm2clip.json recorded."""
    if os.path.isfile(os.path.join(spec, "llm2clip.json")):
        import model as M  # local: baselines need no model.py
        meta = M.read_llm2clip_config(spec)
        check_export_text_model(spec, meta)
        names = meta.get("text_encoders", ["llm"])
        text = _llm_text_settings(cfg)
        kw = {"text_settings": text} if text else {}
        if names == ["llm"]:  # the paper's default run: one row, named by its folder
            return [(spec, _log_llm_side(LLM2CLIP(*M.load_llm2clip(spec, device=device, **kw)), text))]
        image_encoder, _ = M.load_llm2clip(spec, device=device, load_text=False)
        return [(f"{spec} [{n}]", _log_llm_side(LLM2CLIP(image_encoder, load_llm2clip_text(spec, n, device, **kw)),
                                                 text)) for n in names]
    if spec.startswith(ReleasedLLM2CLIP.PREFIX):  # transformers remote code: the released models, our hf_release.py
        return [(spec, ReleasedLLM2CLIP(spec, device, cfg))]
    if spec.startswith(OpenCLIP.PREFIX):
        return [(spec, OpenCLIP(spec, device))]
    return [(spec, load_hf_clip(spec, device))]


def load_hf_clip(spec, device, key="model"):
    """HFClip(spec), where transformers' errors on what the user named (a folder that is not a model, a
    broken config, an unknown hub name offline) become one ValueError naming `key` and the spec."""
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")):
        raise ValueError(f"{key}={spec!r}: a folder with neither config.json nor llm2clip.json; expected a "
                         "transformers CLIP/SigLIP folder or a post_train.py out_dir")
    try:
        return HFClip(spec, device)
    except (OSError, ValueError) as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ValueError(f"{key}={spec!r}: cannot load it as a transformers CLIP/SigLIP model ({first})") from None


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


class _ErrorsAsValues:
    """A dataset whose DataError (a bad image, named) is returned instead of raised: raised in a DataLoader
    worker it would reach the main process re-wrapped, its message the worker's traceback text."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except DataError as e:
            return e


def _collate(items):
    """default_collate, or the batch's first DataError (encode_images raises it)."""
    from torch.utils.data import default_collate
    return next((x for x in items if isinstance(x, DataError)), None) or default_collate(items)


@torch.no_grad()
def encode_images(m, paths, cfg, dist_info, desc="images"):
    """L2-normalised features of all images (every rank returns all of them)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm
    ddp, rank, world, device = dist_info
    lo, hi = _shard(len(paths), rank, world)
    loader = DataLoader(_ErrorsAsValues(ImageDataset(paths[lo:hi], eval_transform(m.data_config))),
                        batch_size=cfg["batch_size"], num_workers=cfg["num_workers"], collate_fn=_collate,
                        worker_init_fn=worker_init)
    feats = []
    for batch in tqdm(loader, desc=desc, disable=rank != 0):
        if isinstance(batch, DataError):  # an image that cannot be decoded, named by data.open_image
            raise DataError(str(batch)) from None
        x, _ = batch
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
# post_train.py's side of an LLM2CLIP out_dir: the text settings it embeds captions with, its held-out
# eval set (texts with their LLM embeddings, images), and the export that load_models reads back

TEXT_KEYS = ("bidirectional", "pooling", "chat_template", "instruction", "max_length", "official_extraction")


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
        if cache is not None and cfg["text_source"] == "cache" and k in enc and encoder_mismatch(enc, {k: v}):
            raise ValueError(f"{k}={v!r}, but the cache {cfg['cache_dir']} was embedded with {k}={enc[k]!r}; "
                             f"rebuild it with embed_captions.py --{k}={v} or drop --{k}")
        out[k] = v
    out["instruction"] = out["instruction"] or None
    out["max_length"] = int(out["max_length"] or 512)
    return out


def load_text_model(text_cfg, device, lora=None):
    """The stage-1 encoder with the settings in text_cfg (None = the encoder's own); lora: see load_text_encoder."""
    import model as M  # local: baselines need no model.py
    return M.load_text_encoder(text_cfg["model"], pooling=text_cfg["pooling"], bidirectional=text_cfg["bidirectional"],
                               chat_template=text_cfg["chat_template"], device=device, lora=lora,
                               official_extraction=text_cfg.get("official_extraction"))


def load_val(cfg, text_cfg, text_encoder, device, need_embeddings=True):
    """(records, texts, their LLM embeddings (N_txt, C) on device or None, text_to_image) for the held-out eval."""
    path, field = cfg["val_manifest"], cfg["eval_field"]
    records = read_manifest(path, cfg["val_image_root"] or None, field=field)
    texts = [t for rec in records for t in rec[field]]
    t2i = [r for r, rec in enumerate(records) for _ in rec[field]]
    if not need_embeddings:  # CLIP-T only, or the LLM runs in the model's text side (LoRA, token-level adaptor)
        return records, texts, None, t2i
    if cfg["val_cache_dir"]:
        same = {k: text_cfg[k] for k in ("model",) + TEXT_KEYS if text_cfg[k] is not None}
        vc = EmbeddingCache(cfg["val_cache_dir"], manifest=path, fields=[field], expect=same)
        emb = torch.from_numpy(np.concatenate([np.asarray(vc.rows(r, field), np.float32) for r in range(len(records))]))
    else:  # embed once with the frozen stage-1 encoder, then free it
        enc = text_encoder or load_text_model(text_cfg, device)
        emb = enc.encode(texts, text_cfg["instruction"], text_cfg["max_length"])
        del enc
    return records, texts, emb.to(device), t2i


@torch.no_grad()
def embed_images(orig_model, records, data_config, device, batch_size, autocast):
    """L2-normalised image features of `records` with the eval preprocessing (in order)."""
    tf = eval_transform(data_config)
    feats = []
    orig_model.eval()
    for s in range(0, len(records), batch_size):
        x = torch.stack([tf(open_image(r)) for r in records[s:s + batch_size]]).to(device)
        with autocast:
            feats.append(orig_model.encode_image(x).float())
    orig_model.train()
    return torch.cat(feats)


def export(out_dir, orig_model, cfg, text_cfg):
    """vision_tower.pt (timm state dict), adaptor.pt, clip_text/ (HF folder), cat_head.pt, text_lora/ (peft
    adapter) as the variant has them, and llm2clip.json, as model.load_llm2clip reads them."""
    import model as M
    vision, adaptor = orig_model.vision, orig_model.adaptor
    common.atomic_torch_save(vision.model.state_dict(), os.path.join(out_dir, "vision_tower.pt"))
    meta = {"vision": {"model_name": vision.model_name, "timm_kwargs": vision.timm_kwargs, "file": "vision_tower.pt"},
            "text_encoders": list(orig_model.text_names), "losses": cfg.get("losses", "a"),
            "logit_scale": orig_model.logit_scale.exp().item(), "code_version": common.code_version()}
    if orig_model.logit_bias is not None:  # the sigmoid loss: its bias belongs to the scores
        meta.update(contrastive_loss="sigmoid", logit_bias=orig_model.logit_bias.item())
    if adaptor is not None:
        common.atomic_torch_save(adaptor.state_dict(), os.path.join(out_dir, "adaptor.pt"))
        meta["adaptor"] = {**M.adaptor_spec(adaptor), "file": "adaptor.pt"}
        meta["text"] = {"model": text_cfg["model"], **{k: text_cfg.get(k) for k in TEXT_KEYS},
                        "fingerprint": model_fingerprint(text_cfg["model"])}  # checked when the export is scored
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
    M.write_llm2clip_config(out_dir, common.jsonable(meta))
