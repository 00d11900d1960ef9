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

import torch
import torch.nn.functional as F

import common
from data import (DataError, convert_docci, convert_karpathy, convert_sharegpt4v, convert_urban1k,
                  read_caption_records, read_class_folder, read_jsonl, read_manifest, write_manifest)
from zoo import encode_images, encode_texts, load_models  # every model family, sharded encoding

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
