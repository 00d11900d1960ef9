"""The whole method end to end on a CPU, no downloads: `python pipeline.py` (about a minute on 2 cores).

  1. synthetic shapes data (data.make_synthetic_dataset): train / val / test splits
  2. a tiny random Llama with a tokenizer trained offline, saved as a HF folder
  3. cc_finetune.py   stage 1 (c2c before -> after on the val captions)
  4. embed_captions.py  the offline caption cache
  5. post_train.py    stage 2 from that cache (and the untrained model, exported at step 0)
  6. evaluate.py      retrieval on the held-out test split: untrained vs post-trained, one table
  7. (--ablations=True) the stage-2 ablation table: losses a/direct/b/c/d (a tiny random CLIP as CLIP-T),
     a with SigLIP's sigmoid loss, LoRA on the LLM online, the transformer adaptor; each text encoder scored,
     wall time per run
  8. report.py        plots and a summary table in <out_dir>/report (with matplotlib; skipped without it)

Every stage runs in-process through its own `main([...])` with its tiny preset (config/*_tiny_cpu.py),
exactly as `python <stage>.py config/... --key=value` would. Outputs: <out_dir>/<stage>/.
Also holds the tiny offline model builders the tests use.

`python pipeline.py --stage1_ablations=True`: instead of stages 3-6, the stage-1 ablation table (the
paper's Table 9 rows, each a cc_finetune.py config switch) on the same data: c2c before -> after and
wall time per row, printed as a markdown table and saved in <out_dir>/ablate_stage1/results.json.
"""
import glob
import json
import os
import time

import common

# -----------------------------------------------------------------------------
out_dir = "out-tiny"  # everything goes under here
num_train = 2000  # synthetic training images (stage 2) and caption records (stage 1)
num_val = 200  # c2c gate + periodic eval during stage 2
num_test = 200  # held-out test set for the final table
image_size = 32  # the tiny ViT's input
seed = 0
arch = "llama"  # tiny text model architecture: llama | qwen2 | mistral | gemma | bert
cc_steps = 60  # stage-1 steps (config/cc_tiny_cpu.py)
post_steps = 800  # stage-2 steps (config/post_tiny_cpu.py: 300)
# stage 2's tower, shaped by the preset's timm_kwargs: OpenAI-CLIP-style (pre-norm, class token) like the paper
# presets' towers, so `evaluate.py --task=export_hf --model=out-tiny/post` writes a transformers CLIPVisionModel
vision_model = "vit_base_patch16_clip_224.openai"
ablations = False  # also the stage-2 ablation table (Tables 8, 10, 11, and the sigmoid loss): 8 more stage-2 runs
stage1_ablations = False  # instead of stages 3-6: the stage-1 ablation table (Table 9's rows), ~7 stage-1 runs
config_keys = [k for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, str))]
# declared once, checked before any work (common.check_config)
RULES = {**{k: common.positive_int for k in ("num_train", "num_val", "num_test", "image_size", "cc_steps", "post_steps")},
         "arch": (lambda v: v in ("llama", "qwen2", "mistral", "gemma", "bert"), "one of llama, qwen2, mistral, gemma, bert"),
         "vision_model": (lambda v: __import__("timm").is_model(v), "a timm model name")}
PATHS = {"out_dir": "out"}


def main(argv=None):
    import data
    cfg = common.configure({k: globals()[k] for k in config_keys}, argv, doc=__doc__)
    common.check_config(cfg, RULES, (), PATHS)
    root = cfg["out_dir"]
    p = lambda *a: os.path.join(root, *a)  # noqa: E731
    t0 = time.time()
    timings = {}

    def done(stage, t):
        timings[stage] = round(time.time() - t, 1)
        print(f"=== {stage} done in {timings[stage]:.1f}s ===", flush=True)

    # --- 1. data
    t = time.time()
    splits = {"train": cfg["num_train"], "val": cfg["num_val"], "test": cfg["num_test"]}
    for split, n in splits.items():
        data.make_synthetic_dataset(p("data"), n, seed=cfg["seed"], image_size=cfg["image_size"], split=split)
    done("data", t)

    # --- 2. tiny text model, tokenizer trained on the training captions
    t = time.time()
    corpus = []
    for _, rec in data.read_jsonl(p("data", "train.jsonl")):
        corpus += rec["captions"] + rec["long_captions"]
    pipeline_text_model(p("text_model"), corpus, cfg["arch"], cfg["seed"])
    done("tiny text model", t)
    if cfg["stage1_ablations"]:
        return ablate_stage1(cfg, p)

    # --- 3. stage 1
    import cc_finetune
    t = time.time()
    # every stage below replaces what an earlier `python pipeline.py` left in its folder (--overwrite=True)
    cc = cc_finetune.main(["config/cc_tiny_cpu.py", f"--text_model={p('text_model')}",
                      f"--train_captions={p('data', 'train_captions.jsonl')}",
                      f"--val_captions={p('data', 'val_captions.jsonl')}", "--overwrite=True",
                      f"--out_dir={p('cc')}", f"--max_steps={cfg['cc_steps']}", f"--seed={cfg['seed']}"])
    t_cut = cc["truncation"]  # the preset's max_length fits instruction + caption: this should be 0
    print(f"stage 1: {t_cut['truncated']} of {t_cut['texts']} training texts truncated", flush=True)
    done("stage 1 (cc_finetune)", t)

    # --- 4. the offline cache, for the train and val manifests; a cache left by an earlier run came from the
    # stage 1 just replaced (its encoder.json records another code version), so it is rebuilt, not refused
    import embed_captions
    t = time.time()
    for split in ("train", "val"):
        embed_captions.main([f"--text_model={p('cc')}", f"--manifest={p('data', split + '.jsonl')}",
                             f"--out_dir={p('cache_' + split)}", "--max_length=64", "--overwrite=True"])
    done("embed_captions", t)

    # --- 5. stage 2: the untrained model (step 0) and the post-trained one
    import post_train
    t = time.time()
    common_args = ["config/post_tiny_cpu.py", f"--train_manifest={p('data', 'train.jsonl')}",
                   f"--cache_dir={p('cache_train')}", f"--val_manifest={p('data', 'val.jsonl')}",
                   f"--val_cache_dir={p('cache_val')}", f"--seed={cfg['seed']}", f"--vision_model={cfg['vision_model']}",
                   "--overwrite=True"]
    post_train.main(common_args + [f"--out_dir={p('post_untrained')}", "--max_steps=0"])
    post_train.main(common_args + [f"--out_dir={p('post')}", f"--max_steps={cfg['post_steps']}"])
    done("stage 2 (post_train)", t)

    # --- 6. evaluation on the held-out test split, side by side
    import evaluate
    t = time.time()
    results = p("results.json")
    evaluate.main(["--task=retrieval", f"--model={p('post_untrained')},{p('post')}",
                   f"--data={p('data', 'test.jsonl')}", "--caption_field=long_captions",
                   "--captions_per_image=0", f"--out={results}", "--num_workers=0"])
    done("evaluate", t)
    with open(results) as f:
        res = json.load(f)
    # the point of the run: the post-trained model retrieves far above chance and above the untrained one
    rows = {r: v for r, v in _r1(res).items()}
    untrained, trained = rows[p("post_untrained")], rows[p("post")]
    chance = 100.0 / cfg["num_test"]
    print(f"test R@1 (chance {chance:.1f}): untrained i2t {untrained[0]:.1f} t2i {untrained[1]:.1f} -> "
          f"post-trained i2t {trained[0]:.1f} t2i {trained[1]:.1f}")
    if not (min(trained) > 10 * chance and min(trained) > max(untrained) + 5):
        raise SystemExit("pipeline: the post-trained model did not clearly beat chance and the untrained model")
    if cfg["ablations"]:
        t = time.time()
        res["ablations"] = ablation_table(common_args, p, cfg)
        done("stage-2 ablations", t)
    draw_report(p, cfg["ablations"])
    print(f"pipeline finished in {time.time() - t0:.0f}s; stage times (s): {timings}")
    print(f"outputs under {root}/: data, text_model, cc, cache_train, cache_val, post_untrained, post, results.json, "
          "report")
    return res


def draw_report(p, ablations):
    """report.py's plots of the tiny run (stage-1 and stage-2 curves, untrained vs post-trained bars) in
    <out_dir>/report, and of the ablation runs overlaid in <out_dir>/report_ablations; matplotlib is
    optional (requirements-extra.txt): without it a log line says so and nothing is drawn."""
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        print("report: skipped, matplotlib is not installed (pip install matplotlib; requirements-extra.txt)")
        return
    import report
    report.main([p("cc"), p("post"), f"--results={p('results.json')}", f"--out={p('report')}"])
    if ablations:
        report.main([d for d in sorted(glob.glob(p("ablations", "*"))) if os.path.isfile(os.path.join(d, "metrics.jsonl"))]
                    + [f"--out={p('report_ablations')}"])

# Table 9's stage-1 rows as cc_finetune.py overrides on config/cc_tiny_cpu.py ("{mntp}": the MNTP row's out_dir)
STAGE1_ABLATIONS = [
    ("supervised SimCSE (paper)", {}),
    ("unsupervised SimCSE", {"objective": "unsupervised_simcse", "dropout": 0.1}),
    ("MNTP", {"objective": "mntp"}),
    ("MNTP, then supervised SimCSE", {"init_from": "{mntp}"}),
    ("causal attention", {"bidirectional": False}),
    ("EOS pooling", {"pooling": "eos"}),
    ("frozen LLM + 4-block adaptor", {"lora_r": 0, "cc_adaptor_blocks": 4}),
]


def ablate_stage1(cfg, p):
    """Each STAGE1_ABLATIONS row through cc_finetune.main with the tiny preset: c2c before -> after, wall time."""
    import cc_finetune
    rows, dirs = [], {}
    for name, over in STAGE1_ABLATIONS:
        out = p("ablate_stage1", name.split(" (")[0].replace(",", "").replace(" ", "_").replace("+", "plus"))
        if over.get("objective") == "mntp":
            dirs["mntp"] = out
        over = {k: v.format(**dirs) if isinstance(v, str) else v for k, v in over.items()}
        t = time.time()
        res = cc_finetune.main(["config/cc_tiny_cpu.py", f"--text_model={p('text_model')}",
                                f"--train_captions={p('data', 'train_captions.jsonl')}",
                                f"--val_captions={p('data', 'val_captions.jsonl')}", f"--out_dir={out}",
                                f"--max_steps={cfg['cc_steps']}", f"--seed={cfg['seed']}", "--overwrite=True"]
                               + [f"--{k}={v}" for k, v in over.items()])
        rows.append({"row": name, "overrides": over, "c2c_before": res["c2c_before"]["c2c_top1"],
                     "c2c_after": res["c2c_after"]["c2c_top1"], "wall_s": round(time.time() - t, 1)})
    table = ["| Table 9 row | cc_finetune.py overrides | c2c top-1 before -> after | wall (s) |", "|---|---|---|---|"]
    for r in rows:
        ov = " ".join(f"--{k}={os.path.basename(v) if k == 'init_from' else v}" for k, v in r["overrides"].items())
        table.append(f"| {r['row']} | {ov or '(defaults)'} | {r['c2c_before']:.1f} -> {r['c2c_after']:.1f} | {r['wall_s']:.0f} |")
    print("\n".join(table))
    with open(p("ablate_stage1", "results.json"), "w") as f:
        json.dump({"rows": rows, "config": cfg}, f, indent=2)
    return rows


# name -> post_train.py switches (Tables 10, 11, 8); every run gets the same data, steps and seed
ABLATIONS = {
    "a (default)": [],
    "sigmoid (SigLIP loss)": ["--contrastive_loss=sigmoid", "--logit_scale_init=None"],  # a with SigLIP's loss and init
    "direct": ["--losses=direct", "--cache_dir="],
    "b": ["--losses=b"],
    "c": ["--losses=c"],
    "d (Cat head)": ["--losses=d"],
    "LoRA online": ["--text_source=online", "--text_lora_r=8"],
    "transformer adaptor": ["--text_source=online", "--adaptor=transformer", "--adaptor_blocks=1", "--adaptor_expansion=4"],
}


def ablation_table(common_args, p, cfg):
    """Every ABLATIONS run of post_train.py, each of its text encoders scored by evaluate.py on the held-out
    test split (long captions): one markdown table of I2T/T2I R@1 with the training wall time per run."""
    import data
    import evaluate
    import post_train
    corpus = [c for _, rec in data.read_jsonl(p("data", "train.jsonl")) for c in rec["long_captions"]]
    clip = build_tiny_clip(p("tiny_clip"), texts=corpus, projection_dim=64, seed=cfg["seed"])  # a random CLIP-T
    rows, lines = {}, ["| variant | text encoder | test I2T R@1 | test T2I R@1 | train wall s |", "|---|---|---|---|---|"]
    for name, switches in ABLATIONS.items():
        out = p("ablations", name.split(" ")[0] if name != "transformer adaptor" else "transformer")
        clip_args = [f"--clip_text={clip}"] if any(s.startswith("--losses=") for s in switches) else []
        t = time.time()
        post_train.main(common_args + [f"--out_dir={out}", f"--max_steps={cfg['post_steps']}", "--val_manifest="]
                        + clip_args + switches)
        wall = time.time() - t
        res = evaluate.main(["--task=retrieval", f"--model={out}", f"--data={p('data', 'test.jsonl')}",
                             "--caption_field=long_captions", "--captions_per_image=0", "--num_workers=0"])
        for row, (i2t, t2i) in _r1(res).items():
            encoder = row[len(out):].strip(" []") or "llm"
            rows[f"{name} / {encoder}"] = {"i2t_R@1": i2t, "t2i_R@1": t2i, "train_s": round(wall, 1)}
            lines.append(f"| {name} | {encoder} | {i2t:.1f} | {t2i:.1f} | {wall:.0f} |")
    table = "\n".join(lines)
    print(table)
    with open(p("ablations.json"), "w") as f:
        json.dump({"rows": rows, "table": table, "post_steps": cfg["post_steps"]}, f, indent=2)
    return rows


TINY_ARCHS = ("llama", "qwen2", "mistral", "gemma", "bert")


def train_tokenizer(texts, vocab_size=512, style="decoder"):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer.

    style="decoder": adds BOS only, no pad token (like Llama-3); style="encoder": [CLS] text [SEP], with [PAD].
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    if style == "decoder":
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        specials = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                    "mask_token": "[MASK]"}
    tok = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    if style == "decoder":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    else:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def tiny_text_config(arch, vocab_size, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_position_embeddings=512, tokenizer=None):
    """A transformers config for a tiny random model of the given architecture."""
    import transformers as T
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, intermediate_size=intermediate_size,
                  max_position_embeddings=max_position_embeddings)
    ids = {}
    if tokenizer is not None:
        ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(tokenizer, k, None) is not None}
    if arch == "bert":
        return T.BertConfig(**common, **ids)
    cls = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "mistral": T.MistralConfig, "gemma": T.GemmaConfig}[arch]
    extra = {"num_key_value_heads": 2}
    if arch == "gemma":
        extra["head_dim"] = hidden_size // num_heads
    return cls(**common, **extra, **ids)


def build_tiny_text_model(out_dir, arch="llama", texts=None, vocab_size=512, seed=0, lm_head=False, **config_kwargs):
    """Save a tiny random `arch` model + trained tokenizer to out_dir: the AutoModel base, or with
    lm_head=True a causal LM (what MNTP needs; AutoModel still loads its base)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch={arch!r}; expected one of {TINY_ARCHS}")
    texts = list(texts) if texts else _DEFAULT_CORPUS
    tokenizer = train_tokenizer(texts, vocab_size, style="encoder" if arch == "bert" else "decoder")
    # margin: some Auto tokenizer classes (Qwen2) add a special token or two when they load the files back
    config = tiny_text_config(arch, len(tokenizer) + 32, tokenizer=tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = (AutoModelForCausalLM if lm_head else AutoModel).from_config(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def pipeline_text_model(path, texts, arch="llama", seed=0):
    """The pipeline's stage-1 starting point: a random 2-layer width-64 `arch` model with a tokenizer trained on
    `texts`. A decoder is saved with its LM head, so `cc_finetune.py --objective=mntp` runs on it as well; AutoModel
    loads the same base weights from it as from a headless save (the head is built last), so no other stage changes."""
    return build_tiny_text_model(path, arch, texts=texts, vocab_size=400, seed=seed, hidden_size=64, num_layers=2,
                                 intermediate_size=128, lm_head=arch != "bert")


def build_tiny_clip(out_dir, texts=None, projection_dim=64, kind="clip", vocab_size=400, seed=0, hidden_size=32):
    """Save a tiny random CLIPModel (kind="clip") or SiglipModel ("siglip") + a BPE tokenizer trained on
    `texts` ([CLS] text [SEP]; [SEP] is the EOS CLIP pools at) to out_dir: a stand-in for a pretrained CLIP
    whose text tower (CLIP-T) stage 2 can load. Text width `hidden_size`, 2 layers, 77 positions."""
    import torch
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel
    tok = train_tokenizer(list(texts) if texts else _DEFAULT_CORPUS, vocab_size, style="encoder")
    tok.model_max_length = 77
    text = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    elif kind == "siglip":  # SigLIP's text head maps to the text width: the joint space is hidden_size wide
        model = SiglipModel(SiglipConfig(text_config={**text, "hidden_size": projection_dim,
                                                      "intermediate_size": 2 * projection_dim}, vision_config=vision))
    else:
        raise ValueError(f"kind={kind!r}; expected 'clip' or 'siglip'")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


_DEFAULT_CORPUS = [
    "a red circle on a white background", "two blue squares next to a green triangle",
    "a small yellow star in the top left corner", "the quick brown fox jumps over the lazy dog",
    "a man riding a bicycle down a city street", "a plate of food with broccoli and rice",
    "people standing on a beach near the ocean", "a cat sleeping on a wooden table",
] * 4


def _r1(results):
    """model name -> (i2t R@1, t2i R@1) on the single dataset of a retrieval results JSON."""
    out = {}
    for name, per_data in results["results"].items():
        (m,) = per_data.values()
        out[name] = (m["i2t_R@1"], m["t2i_R@1"])
    return out


if __name__ == "__main__":
    common.run_main(main)
