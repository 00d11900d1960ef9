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
    python evaluate.py --task=export_llm2clip --model=out/llm2clip --out=hf/llm2clip   (as the released models ship)
    python evaluate.py --model=hf_llm2clip:microsoft/LLM2CLIP-Openai-B-16 --trust_remote_code=True --data=coco
    python evaluate.py --task=mteb --model=out/llm2clip --text_model=out/stage1 --tasks=Flickr30kT2IRetrieval,STSBenchmark
    python evaluate.py --task=convert --format=xm3600 --lang=de --src=captions.jsonl --out=data/xm3600_de/manifest.jsonl

Metrics follow LAION CLIP_benchmark: image->text is a hit at k if ANY of the image's captions is in
its top k; text->image is scored per caption. Ties are broken by lowest index (metrics.py, shared with
the stage scripts). linear_probe, export_hf and export_llm2clip run downstream.py's code with this script's
config, mteb runs mteb_eval.py's (mteb, an optional package, is imported only there).
"""
import os

import torch
import torch.nn.functional as F

import common
import downstream  # linear_probe, export_hf and the multilingual converters (Table 3)
from convert import convert_docci, convert_karpathy, convert_sharegpt4v, convert_urban1k
from data import DataError, read_caption_records, read_class_folder, read_jsonl, read_manifest, write_manifest
from metrics import (c2c_eval, check_results_path, markdown_table, percent, ranks, retrieval_metrics,
                     split_specs, write_results)
from zoo import DEVICE_RULE, check_model_specs, encode_images, encode_texts, load_models  # every model family

# -----------------------------------------------------------------------------
# config: every key can be overridden with --key=value or a config/*.py file
task = "retrieval"       # retrieval | classify | c2c | convert | mteb | linear_probe | export_hf | export_llm2clip
                         # (mteb: mteb_eval.py; the last three: downstream.py)
model = ""               # comma-separated; each a HF CLIP/SigLIP folder or hub name (baseline, own text
                         # tower), open_clip:NAME/PRETRAINED (e.g. open_clip:EVA02-L-14-336/merged2b_s6b_b61k;
                         # needs pip install open_clip_torch), hf_llm2clip:PATH (a remote-code LLM2CLIP folder or
                         # hub name: the released models, export_llm2clip's folders; needs --trust_remote_code=True)
                         # or an LLM2CLIP out_dir (has llm2clip.json): one table row per model, one per text
                         # encoder of an out_dir (LLM side, CLIP-T, Cat head)
data = ""                # retrieval: comma-separated known names or manifest .jsonl paths; classify: a folder;
                         # linear_probe: a folder with train/ and val/ class folders
data_root = "data"       # known names resolve to <data_root>/<name>/manifest.jsonl, images under <data_root>/<name>/
image_root = ""          # image root of manifest paths given in --data; "" = the manifest's folder
caption_field = ""       # "captions" | "long_captions"; "" = the dataset's own (long-caption sets: long_captions)
captions_per_image = -1  # exact count required; -1 = per dataset (5 for flickr30k/coco, 1 for long sets), 0 = any
out = ""                 # results JSON (retrieval/classify/c2c/mteb/linear_probe), manifest (convert) or the
                         # transformers folder (export_hf, export_llm2clip); "" = print only
device = ""              # "" = cuda if available, else cpu
batch_size = 64          # images (or texts for c2c) per forward pass, per rank
text_batch_size = 256    # texts per forward pass; texts are length-sorted first so padding stays small
num_workers = 4          # image decoding worker processes
amp = True               # bf16 autocast on CUDA (CPU always runs fp32)
trust_remote_code = False  # let hf_llm2clip:PATH run the Python files of its folder (transformers remote code)
image_processor = ""     # hf_llm2clip: the image processor (folder or hub name); "" = the folder's, else the
                         # base CLIP of a released model (zoo.ReleasedLLM2CLIP.BASE_PROCESSORS)
# zero-shot classification
classnames = ""          # file, one class name per line in sorted-folder order; "" = for WordNet-id folders
                         # (ImageNet) the shipped config/imagenet/classnames.tsv names, else folder names ("_" -> " ")
templates = ""           # file, one prompt template per line with {}; "" = for WordNet-id folders CLIP's 80
                         # ImageNet templates (config/imagenet/templates.txt), else "a photo of a {}."
# linear probe (Table 4, right half): downstream.py's keys, defaults and comments, settable here as well
from downstream import (feature_dir, probe_epochs, probe_batch_size, probe_lr, probe_momentum,  # noqa: E402,F401
                        probe_weight_decay, overwrite)
# caption-to-caption retrieval (and the text side of hf_llm2clip rows; mteb's text-only row)
text_model = ""          # HF model folder or stage-1 out_dir, loaded with model.load_text_encoder; for hf_llm2clip
                         # "" = the folder's recorded encoder, else microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned
captions = ""            # caption JSONL {"id", "captions": [>= 2]}: caption 1 queries, caption 2 is the gallery
# MTEB / MIEB (mteb_eval.py): --model rows on image-text tasks, --text_model on text tasks
tasks = ""               # comma-separated mteb task names, or FILE.py:ClassName (an mteb task class of your own)
# LLM text-encoder settings (c2c, and the text side of an LLM2CLIP model in retrieval/classify, where
# unset values are those recorded in its llm2clip.json, i.e. what its training cache used)
max_length = 0           # text tokens; 0 = the model's own (llm2clip.json / encoder.json), else 512 (paper)
instruction = ""         # c2c: query-side instruction, "" = none (captions are documents, docs/DESIGN.md); retrieval: "" = recorded
bidirectional = None     # None = the encoder's own (encoder.json, else True); False scores a causal LLM as trained
pooling = ""             # "" = the encoder's own (encoder.json, else mean); "mean" | "eos"
chat_template = ""       # "" = the encoder's own (encoder.json, else none); "none"; "llama3" (official embeddings)
dtype = ""               # text encoder dtype for c2c, hf_llm2clip and mteb's text row ("bfloat16", ...); "" = the
                         # loader's default
# convert public annotations into a manifest
format = ""              # karpathy | sharegpt4v | urban1k | docci | xm3600 | coco_cn | flickr30k_cn
src = ""                 # annotation file (karpathy, sharegpt4v, docci, xm3600, flickr30k_cn) or folder (urban1k, coco_cn)
lang = ""                # xm3600: its language code (de, zh, ...); coco_cn: zh | zh-translated; flickr30k_cn: zh
split = "test"           # karpathy / docci split to keep
num = 1000               # sharegpt4v: the first `num` entries (the paper's ShareGPT4V-1K)
image_prefix = None      # prepended to image paths in the manifest; None = the format's default
config_keys = [k for k, v in dict(globals()).items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]

# declared once, checked before any data or model is read (common.check_config, as in the stage scripts): each
# key's range, and what each path key must be (per task where the key's meaning depends on it)
TASKS = ("retrieval", "classify", "c2c", "convert", "mteb", "linear_probe", "export_hf", "export_llm2clip")
CONVERT_FOLDERS = ("urban1k", "coco_cn")  # the converters that read a folder; every other one reads a file
RULES = {"batch_size": common.positive_int, "text_batch_size": common.positive_int, "num": common.positive_int,
         "max_length": (lambda v: v >= 0, "an integer >= 0 (0 = the model's own)"),
         "num_workers": common.non_negative_int,
         "captions_per_image": (lambda v: v >= -1, "-1 (the dataset's own), 0 (any) or the exact count"),
         "caption_field": common.one_of("", "captions", "long_captions"), "pooling": common.one_of("", "mean", "eos"),
         "dtype": common.one_of("", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"), "device": DEVICE_RULE,
         **downstream.PROBE_RULES}
PATHS = {"image_root": "dir", "classnames": "file", "templates": "file", "text_model": "model", "captions": "file",
         "image_processor": "model"}
TASK_PATHS = {"classify": {"data": "dir"}, "linear_probe": {"data": "dir", "feature_dir": "out"},
              **{t: {"out": "out"} for t in downstream.EXPORT_TASKS}}
TASK_RELATIONS = {"mteb": [
    (lambda c: c["tasks"], "--task=mteb needs --tasks=NAME,... (mteb task names or FILE.py:ClassName)"),
    (lambda c: c["model"] or c["text_model"], "--task=mteb needs --model=... (image-text tasks) and/or "
                                              "--text_model=... (text tasks)")]}

# The paper's benchmarks: name -> (caption field, captions per image). Short sets are scored with
# 5 captions per image, long-caption sets 1:1 (docs/DESIGN.md, "Evaluate").
KNOWN_DATASETS = {"flickr30k": ("captions", 5), "coco": ("captions", 5), "sharegpt4v": ("long_captions", 1),
                  "urban1k": ("long_captions", 1), "docci": ("long_captions", 1)}


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
                            f"(python evaluate.py --task=convert ..., see docs/evaluation.md) or set --data_root")
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


# -----------------------------------------------------------------------------
# tasks

def run_retrieval(cfg, dist_info, log):
    specs, data_specs = split_specs(cfg["model"], "model"), split_specs(cfg["data"], "data")
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
        write_results(cfg["out"], payload, cfg)
    return payload


def run_classify(cfg, dist_info, log):
    """Zero-shot top-1/top-5: class embedding = mean of its normalised prompt embeddings, renormalised."""
    paths, labels, names, templates = read_class_folder(cfg["data"], cfg["classnames"], cfg["templates"])
    log(f"{cfg['data']}: {len(paths)} images, {len(names)} classes (e.g. {', '.join(names[:3])}), "
        f"{len(templates)} prompt templates (e.g. {templates[0]!r})")
    results = {}
    for spec in split_specs(cfg["model"], "model"):
        rows = load_models(spec, dist_info[3], cfg)
        img = encode_images(rows[0][1], paths, cfg, dist_info)
        for name, m in rows:
            txt = encode_texts(m, [t.format(n) for n in names for t in templates], cfg, dist_info, "prompts")
            if dist_info[1] == 0:
                cls = F.normalize(txt.view(len(names), len(templates), -1).mean(1), dim=-1)
                rank = ranks(img, cls, torch.tensor(labels, device=img.device))
                results[name] = {"top1": percent(rank < 1), "top5": percent(rank < 5), "n": len(paths)}
                log(f"{name}: top-1 {results[name]['top1']:.2f}, top-5 {results[name]['top5']:.2f}")
        del rows
    if dist_info[1] == 0 and cfg["out"]:
        write_results(cfg["out"], {"task": "classify", "data": cfg["data"], "results": results}, cfg)
    return results


def run_c2c(cfg, log):
    if not cfg["text_model"] or not cfg["captions"]:
        raise ValueError("--task=c2c needs --text_model=PATH and --captions=FILE")
    records = read_caption_records(cfg["captions"])  # bad input fails before the model loads
    from model import load_text_encoder  # local: retrieval and convert run without model.py
    kwargs = common.text_encoder_kwargs(cfg)
    enc = load_text_encoder(cfg["text_model"], dtype=cfg["dtype"] or None, **kwargs)
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
        write_results(cfg["out"], {"task": "c2c", "text_model": cfg["text_model"], "captions": cfg["captions"],
                                    "text_encoder": used, **r}, cfg)
    return r


def run_convert(cfg, log):
    fmt, src, prefix = cfg["format"], cfg["src"], cfg["image_prefix"]
    kw = {} if prefix is None else {"prefix": prefix}
    converters = {"karpathy": lambda: convert_karpathy(src, split=cfg["split"], log=log, **kw),
                  "sharegpt4v": lambda: convert_sharegpt4v(src, num=cfg["num"], **kw),
                  "urban1k": lambda: convert_urban1k(src, **kw),
                  "docci": lambda: convert_docci(src, split=cfg["split"], **kw)}
    converters.update({"xm3600": lambda: downstream.convert_xm3600(src, lang=cfg["lang"], **kw),
                       "coco_cn": lambda: downstream.convert_coco_cn(src, cfg["split"], cfg["lang"] or "zh", **kw),
                       "flickr30k_cn": lambda: downstream.convert_flickr30k_cn(src, cfg["lang"], **kw)})
    if fmt not in converters:
        raise ValueError(f"--format={fmt!r}: expected one of {', '.join(converters)}")
    if not src or not os.path.exists(src):
        raise DataError(f"--src={src!r}: not found (the {fmt} annotation file or folder)")
    folder = fmt in CONVERT_FOLDERS
    if os.path.isdir(src) != folder:
        raise DataError(f"--src={src!r}: is a {'file' if folder else 'folder'}; --format={fmt} reads "
                        f"{'a folder' if folder else 'an annotation file'}")
    if not cfg["out"]:
        raise ValueError("--task=convert needs --out=manifest.jsonl")
    n = write_manifest(cfg["out"], converters[fmt]())
    log(f"wrote {n} records to {cfg['out']}")
    return n


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = common.configure({k: globals()[k] for k in config_keys}, argv, __doc__)
    if cfg["task"] not in TASKS:
        raise ValueError(f"--task={cfg['task']!r}: expected one of {', '.join(TASKS)}")
    common.check_config(cfg, RULES, TASK_RELATIONS.get(cfg["task"], ()),
                        paths={**PATHS, **TASK_PATHS.get(cfg["task"], {})})
    if cfg["task"] in ("retrieval", "classify", "linear_probe", "mteb") and cfg["model"]:
        check_model_specs(split_specs(cfg["model"], "model"), trust_remote_code=cfg["trust_remote_code"])
    if cfg["out"] and cfg["task"] not in downstream.EXPORT_TASKS:  # a results file: found now, not after scoring
        check_results_path(cfg["out"])
    if cfg["task"] in ("c2c", "convert", "mteb", *downstream.EXPORT_TASKS):  # single process
        log = common.Logger(None, "evaluate")
        if cfg["task"] in downstream.EXPORT_TASKS:
            return downstream.EXPORT_TASKS[cfg["task"]](cfg, log)
        if cfg["task"] == "mteb":
            from mteb_eval import run_mteb  # local: mteb is an optional package
            return run_mteb(cfg, log)
        return run_c2c(cfg, log) if cfg["task"] == "c2c" else run_convert(cfg, log)
    ddp, rank, _, world, device = common.setup_distributed()
    device = cfg["device"] or device
    log = common.Logger(None, "evaluate", master_process=rank == 0)
    try:
        if cfg["task"] == "linear_probe":
            return downstream.run_linear_probe(cfg, (ddp, rank, world, device), log)
        run = run_retrieval if cfg["task"] == "retrieval" else run_classify
        return run(cfg, (ddp, rank, world, device), log)
    finally:
        common.cleanup_distributed(ddp)


if __name__ == "__main__":
    common.run_main(main)
