"""MTEB and MIEB (the image extension of MTEB) on our models, the way mteb evaluates the released LLM2CLIP models
(mteb/models/model_implementations/llm2clip_models.py): image-text tasks on a stage-2 model and text tasks on a
stage-1 encoder, each wrapped as an mteb encoder:

    python evaluate.py --task=mteb --model=out/post,hf_llm2clip:microsoft/LLM2CLIP-Openai-L-14-336 \
        --trust_remote_code=True --tasks=Flickr30kI2TRetrieval,Flickr30kT2IRetrieval --out=mieb.json
    python evaluate.py --task=mteb --text_model=out/stage1 --tasks=STSBenchmark,SciFact --out=mteb.json
    python evaluate.py --task=mteb --model=out/post --tasks=my_tasks.py:MyTask   (an mteb task class of your own)

- A --model row is any model evaluate.py scores (an LLM2CLIP out_dir, hf_llm2clip:PATH, a baseline): images go
  through our eval transform (the model's own preprocessing) and its image encoder, texts through its text side,
  each L2-normalised; an input with both is their sum (as mteb's wrapper of the released models does).
- --text_model is a stage-1 encoder (model.load_text_encoder, with the usual text-encoder keys): a text-only row,
  no instruction on documents, --instruction (if set) on queries, as c2c treats captions. A text-only row skips
  the tasks that need images.
- Scores are mteb's own (its retrieval, classification, STS evaluators); the table shows each task's main score
  x100, averaged over its subsets; --out keeps every score mteb reports.

mteb (an optional dependency, requirements-extra.txt) is imported only here; evaluate.py imports this module only
for --task=mteb.
"""
import importlib.util
import math
import numbers
import os

import torch
import torch.nn.functional as F

import common
import zoo
from data import eval_transform
from metrics import split_specs, write_results

try:
    import mteb
    from mteb.abstasks import AbsTask
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError:
    raise ImportError("--task=mteb needs the mteb package, which is not installed: pip install mteb "
                      "(see requirements-extra.txt)") from None


def model_meta(name, modalities):
    """The mteb metadata of a local model: its name, what it reads, cosine similarity (features are normalised)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(os.path.normpath(name)))
    return ModelMeta.create_empty(dict(name=f"local/{safe or 'model'}", revision="local", modalities=modalities,
                                       similarity_fn_name=ScoringFunction.COSINE, framework=["PyTorch"]))


def _pil(image):
    from PIL import Image
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    from torchvision.transforms.functional import to_pil_image
    return to_pil_image(image).convert("RGB")


class ImageTextEncoder(AbsEncoder):
    """A zoo model (data_config, encode_images, encode_texts) as an mteb encoder of images and texts."""

    def __init__(self, name, m, device, amp=True):
        self.model, self.device, self.amp = m, device, amp
        self.transform = eval_transform(m.data_config)
        self.mteb_model_meta = model_meta(name, ["image", "text"])

    @torch.no_grad()
    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        features, out = inputs.dataset.features, []
        for batch in inputs:
            parts = []
            with zoo._autocast(self.device, self.amp):
                if "text" in features:
                    parts.append(F.normalize(self.model.encode_texts(list(batch["text"])).float(), dim=-1))
                if "image" in features:
                    x = torch.stack([self.transform(_pil(im)) for im in batch["image"]]).to(self.device)
                    parts.append(F.normalize(self.model.encode_images(x).float(), dim=-1))
            out.append(sum(parts).cpu())
        return torch.cat(out).numpy()


class TextOnlyEncoder(AbsEncoder):
    """A stage-1 model.TextEncoder as an mteb text encoder: queries carry `instruction` (if any), documents none."""

    def __init__(self, name, encoder, instruction=None, max_length=512):
        self.encoder, self.instruction, self.max_length = encoder, instruction, max_length
        self.mteb_model_meta = model_meta(name, ["text"])

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        instruction = self.instruction if prompt_type == PromptType.query else None
        emb = self.encoder.encode(texts, instruction, self.max_length, batch_size=inputs.batch_size or 64)
        return F.normalize(emb, dim=-1).numpy()


def resolve_tasks(value):
    """--tasks=A,B: mteb task names (mteb.get_task) or FILE.py:ClassName, an mteb AbsTask subclass of your own."""
    tasks = []
    for name in split_specs(value, "tasks"):
        path, _, cls = name.rpartition(":")
        if path.endswith(".py"):
            if not os.path.isfile(path):
                raise ValueError(f"tasks: {path} not found (in {name!r}, expected FILE.py:ClassName)")
            spec = importlib.util.spec_from_file_location(f"mteb_user_tasks_{len(tasks)}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            task = getattr(module, cls, None)
            if not (isinstance(task, type) and issubclass(task, AbsTask)):
                raise ValueError(f"tasks: {path} has no mteb task class {cls!r} (an mteb.abstasks.AbsTask subclass)")
            tasks.append(task())
            continue
        try:
            tasks.append(mteb.get_task(name))
        except (KeyError, ValueError) as e:
            raise ValueError(f"tasks: {name!r} is not an mteb task ({str(e).splitlines()[0][:200]}); expected a "
                             "name of mteb.get_tasks() or FILE.py:ClassName") from None
    return tasks


def needs_images(task):
    return any(m != "text" for m in task.metadata.modalities)


def _finite(v):
    """mteb's scores as strict JSON: numpy numbers as Python ones, NaN (an undefined metric) as null."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
        return float(v) if math.isfinite(v) else None
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v


def score_rows(rows, tasks, batch_size, log):
    """{row: {task: {"main_score", "scores"}}} for each (name, mteb encoder, text_only) row."""
    results = {}
    for name, encoder, text_only in rows:
        todo = [t for t in tasks if not (text_only and needs_images(t))]
        if len(todo) < len(tasks):
            log(f"{name}: text only, skips {', '.join(t.metadata.name for t in tasks if t not in todo)}")
        res = mteb.evaluate(encoder, todo, cache=None, overwrite_strategy="always", show_progress_bar=False,
                            encode_kwargs={"batch_size": batch_size}) if todo else None
        results[name] = {tr.task_name: {"main_score": float(tr.get_score()), "scores": _finite(tr.scores)}
                         for tr in (res.task_results if res else [])}
        log(f"{name}: " + ", ".join(f"{t} {100 * r['main_score']:.2f}" for t, r in results[name].items()))
    return results


def run_mteb(cfg, log):
    """--task=mteb: every --model row (image-text) and the --text_model row (text) on --tasks; prints the table."""
    tasks = resolve_tasks(cfg["tasks"])  # unknown names fail before any model loads
    device = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for spec in (split_specs(cfg["model"], "model") if cfg["model"] else []):
        rows += [(name, ImageTextEncoder(name, m, device, cfg["amp"]), False)
                 for name, m in zoo.load_models(spec, device, cfg)]
    if cfg["text_model"]:
        import model as M
        kwargs = common.text_encoder_kwargs(cfg)
        enc = M.load_text_encoder(cfg["text_model"], dtype=cfg["dtype"] or None, device=device, **kwargs)
        max_length = cfg["max_length"] or enc.settings.get("max_length") or 512
        log(common.describe_text_encoder(enc, kwargs) + f", instruction={cfg['instruction']!r} (queries), "
            f"max_length={max_length}")
        encoder = TextOnlyEncoder(cfg["text_model"], enc, cfg["instruction"] or None, max_length)
        rows.append((cfg["text_model"], encoder, True))
    results = score_rows(rows, tasks, cfg["batch_size"], log)
    names = [t.metadata.name for t in tasks]
    table = "\n".join(["| model | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)] + [
        f"| {row} | " + " | ".join(f"{100 * r[n]['main_score']:.2f}" if n in r else "-" for n in names) + " |"
        for row, r in results.items()])
    log(table)
    payload = {"task": "mteb", "tasks": names, "results": results, "table": table}
    if cfg["out"]:
        write_results(cfg["out"], payload, cfg)
    return payload
