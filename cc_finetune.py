"""Stage 1: caption-contrastive (CC) LoRA fine-tuning of an LLM into a caption encoder.

Two captions of the same image are a positive pair; every other positive in the global batch
(gathered across ranks) is a negative (supervised SimCSE). The query side carries the instruction,
which is attended to but not pooled; the positive side has none. The caption-to-caption (c2c)
retrieval top-1 on `val_captions` is measured before and after: the stage's quality gate.

The paper's stage-1 ablations are config keys (Tables 8, 9, 12): `objective` (supervised_simcse,
unsupervised_simcse: the same caption twice, the views differ only by `dropout`; mntp: llm2vec's masked
next-token prediction), `init_from` (MNTP then SimCSE), `bidirectional`, `pooling`, `lora_r=0` with
`cc_adaptor_blocks` (frozen LLM + adaptor), per-record instructions/negatives in `train_pairs` and
`single_source_batches`. The table of all of them on tiny data: `python pipeline.py --stage1_ablations=True`.

    python cc_finetune.py config/cc_tiny_cpu.py
    torchrun --nproc_per_node=8 cc_finetune.py config/cc_llama3_8b.py --train_captions=a.jsonl,b.jsonl

A global batch larger than one forward pass runs in chunks with gradient caching: the objective is
that of the full batch (all its negatives), not of micro-batches. Outputs in out_dir: adapter/ (peft),
merged/ (HF model + tokenizer), encoder.json (how to use it: `model.load_text_encoder(out_dir)`),
run_cc_finetune.json (resolved config + code version), cc_finetune.log, metrics.jsonl (the log lines'
numbers and the c2c gate; also to W&B / tensorboard/ with wandb_log / tensorboard_log), checkpoints/step_*.pt (the
trainable weights, optimizer and step: resumable; common.Checkpoints), and with
cc_adaptor_blocks >= 0 cc_adaptor.pt (the stage-1 adaptor, applied by load_text_encoder).
"""
import math
import os
import time
import types

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import common
import data
import loss as L
import model as M
from metrics import c2c_eval  # (the quality gate: caption 1 -> caption 2 of every record)
import tracking

# -----------------------------------------------------------------------------
# default config (paper settings, docs/DESIGN.md); override with config/*.py and --key=value
# model
text_model = "meta-llama/Meta-Llama-3-8B-Instruct"  # HF hub name or local folder (paper: Llama-3-8B-Instruct)
bidirectional = True  # drop the causal mask: the paper's decoder -> encoder conversion (BERT-likes ignore it)
pooling = "mean"  # "mean" over the caption tokens (paper) or "eos"
chat_template = ""  # "" = none; "llama3" wraps every text in a Llama-3 user turn, <|eot_id|> pooled (model.CHAT_TEMPLATES)
lora_r = 16  # paper: r=16, alpha=32, dropout 0.05 on q,k,v,o,gate,up,down; 0 freezes the LLM (Table 9)
lora_alpha = 32
lora_dropout = 0.05
dtype = "auto"  # "auto": bfloat16 weights + bf16 autocast on CUDA, float32 on CPU; "float32" forces fp32; "float16":
# float16 weights + autocast with dynamic loss scaling (LoRA/adaptor weights stay float32)
gradient_checkpointing = True  # recompute activations in backward: less memory, same result
attn_implementation = ""  # "" = transformers' default (sdpa); e.g. "flash_attention_2" where installed
init_from = ""  # a stage-1 out_dir to start from (its LoRA merged, a fresh LoRA here): Table 9's MNTP + SimCSE
cc_adaptor_blocks = -1  # >= 0: an Adaptor of this many blocks trained on the pooled output, applied on load (Table 8)
# objective
objective = "supervised_simcse"  # supervised_simcse | unsupervised_simcse (same caption, other dropout) | mntp
dropout = -1.0  # LLM attention/hidden dropout in training; -1: the model's own (unsupervised SimCSE: > 0; llm2vec 0.3)
mntp_mask_prob = 0.2  # mntp: fraction of caption tokens masked, 80/10/10 mask/random/keep (llm2vec's default)
# data
train_captions = ""  # caption JSONL file(s), comma-separated: {"id": ..., "captions": [>= 2 strings]}
train_pairs = ""  # optional pure-text pairs JSONL {"query", "positive"[, "instruction", "negative"]}, as records
single_source_batches = False  # each batch from one input file (official sampler): caption, E5 negatives never mix
source_weights = ""  # share of batches per file (train_captions, then train_pairs), e.g. "3,1"; "": by file size
val_captions = ""  # caption JSONL for the c2c gate (caption 1 -> caption 2 of every record); "" skips it
instruction = "Given a caption, retrieve a similar relevant caption."  # query side only; attended, never pooled
max_length = 512  # tokens per text, instruction and special tokens included (paper: 512)
hard_negatives = False  # one extra negative per query: its record's "negative", else a caption of another record
# training
batch_size = 2048  # GLOBAL contrastive batch (paper 2048, official code 512): all of it serves as negatives
micro_batch_size = 32  # texts per forward pass on one rank; a larger per-rank batch uses gradient caching
max_steps = -1  # -1: one epoch over the training records (paper)
learning_rate = 2.5e-4  # AdamW peak learning rate (paper appendix; the official code used 2e-4)
warmup_steps = 300  # linear warm-up, then linear decay to 0 at max_steps (paper: 300)
weight_decay = 0.0  # on LoRA weights (HF Trainer default, as in the official code)
grad_clip = 1.0  # max global gradient norm (HF Trainer default); 0 disables
temperature = 0.05  # SimCSE's 0.05 (official code: 0.02)
seed = 1337  # same on every rank for the LoRA init; data order and dropout derive from it
# outputs
out_dir = "out-cc"
log_interval = 10  # steps between log lines
save_interval = 200  # steps between resumable checkpoints (also written at the end)
keep_checkpoints = 2  # newest checkpoints kept (0 = all)
resume = False  # continue from the newest checkpoint in out_dir/checkpoints (refused when training settings differ)
overwrite = False  # a fresh run into an out_dir holding another run's files deletes them (else it refuses)
eval_batch_size = 64  # texts per forward pass in the c2c gate
# experiment tracking (rank 0): metrics.jsonl is always written; these also send its numbers on (tracking.MetricsLog)
wandb_log = False  # Weights & Biases (pip install wandb; WANDB_MODE=offline works without a network)
wandb_project = "llm2clip"
wandb_run_name = ""  # "" = W&B's own name; a resumed run keeps its W&B run (out_dir/wandb_run.json)
tensorboard_log = False  # TensorBoard event files in out_dir/tensorboard
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))]
# keys that may change between a checkpoint and its resumption: they do not change what is computed
RESUME_FREE_KEYS = {"out_dir", "log_interval", "save_interval", "keep_checkpoints", "resume", "overwrite", "val_captions", "eval_batch_size",
                    "micro_batch_size", "gradient_checkpointing", "attn_implementation", *tracking.KEYS}
# declared once, checked before any data or model is read (common.check_config): each key's range, the
# relations between keys, and what each path key must be. A key's type is its default's.
OBJECTIVES = ("supervised_simcse", "unsupervised_simcse", "mntp")
RULES = {**{k: common.positive_int for k in ("batch_size", "micro_batch_size", "max_length", "log_interval",
                                             "save_interval", "eval_batch_size")},
         "keep_checkpoints": common.non_negative_int,
         "max_steps": (lambda v: v == -1 or v > 0, "-1 (one epoch) or an integer > 0"),
         "warmup_steps": common.non_negative_int, "lora_r": common.non_negative_int,
         "cc_adaptor_blocks": (lambda v: v >= -1, "-1 (none) or an integer >= 0"),
         "dtype": (lambda v: v in ("auto", "float32", "bfloat16", "bf16", "float16", "fp16"),
                   "'auto', 'float32', 'bfloat16' or 'float16'"),
         "pooling": common.one_of(*M.POOLERS),
         "chat_template": common.chat_template,
         "objective": (lambda v: v in OBJECTIVES, "one of " + ", ".join(OBJECTIVES)),
         "temperature": common.positive,
         "learning_rate": common.positive,
         "weight_decay": common.non_negative,
         "grad_clip": common.non_negative,
         "lora_alpha": (lambda v: v > 0, "a number > 0"), "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
         "dropout": (lambda v: v == -1 or 0 <= v < 1, "-1 (the model's own) or a number in [0, 1)"),
         "mntp_mask_prob": (lambda v: 0 < v < 1, "a number in (0, 1)"),
         "source_weights": (lambda v: not v or all(float(w) > 0 for w in v.split(",")),
                            "'' or comma-separated positive numbers, one per input file")}
RELATIONS = [
    (lambda c: data.split_paths(c["train_captions"]) or data.split_paths(c["train_pairs"]),
     "train_captions: expected one or more caption JSONL files (comma-separated), or train_pairs: a {query, "
     "positive} JSONL file"),
    (lambda c: not (c["objective"] == "unsupervised_simcse" and not c["dropout"] > 0),
     lambda c: f"objective=unsupervised_simcse needs dropout > 0 (got {c['dropout']}): its two views differ only "
               "by dropout (SimCSE 0.1, llm2vec 0.3)"),
    (lambda c: not (c["objective"] == "mntp" and (c["hard_negatives"] or c["cc_adaptor_blocks"] >= 0)),
     "objective=mntp: hard_negatives and cc_adaptor_blocks apply to the SimCSE objectives only"),
    (lambda c: not (c["lora_r"] == 0 and c["cc_adaptor_blocks"] < 0),
     "lora_r=0 freezes the LLM: set cc_adaptor_blocks >= 0 to train a stage-1 adaptor"),
    (lambda c: c["batch_size"] % c["micro_batch_size"] == 0 or c["micro_batch_size"] > c["batch_size"],
     lambda c: f"micro_batch_size={c['micro_batch_size']}: expected a divisor of batch_size={c['batch_size']} "
               "(equal forward chunks)"),
    (lambda c: not (c["source_weights"] and not c["single_source_batches"]),
     "source_weights: a share of batches per file needs single_source_batches=True"),
    *tracking.RELATIONS,
]
PATHS = {"out_dir": "out", "text_model": "model", "init_from": "dir", "train_captions": "files", "train_pairs": "files",
         "val_captions": "file"}



def step_seed(seed, rank, step):
    """Dropout RNG seed of one step on one rank: depends on nothing else, so a resumed run replays it."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def get_lr(it, max_steps, cfg):
    """Linear warm-up to cfg['learning_rate'] over warmup_steps, then linear decay to 0 at max_steps."""
    if it < cfg["warmup_steps"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_steps"] + 1)
    return cfg["learning_rate"] * max(0.0, (max_steps - it) / max(1, max_steps - cfg["warmup_steps"]))


def check_config(cfg):
    """Every declared rule (RULES, RELATIONS, PATHS), before any data or model is read."""
    common.check_config(cfg, RULES, RELATIONS, PATHS)


# -----------------------------------------------------------------------------
# Data: caption records (and pure-text pairs), each input file a source

def read_records(cfg):
    """(records, sources: each input file's (start, end) range in records, file names)."""
    records, sources, names = [], [], []
    for read, key in ((data.read_caption_records, "train_captions"), (data.read_text_pairs, "train_pairs")):
        for p in data.split_paths(cfg[key]):
            records += read(p)
            sources.append((sources[-1][1] if sources else 0, len(records)))
            names.append(p)
    return records, sources, names


def batch_weights(cfg):
    return [float(w) for w in cfg["source_weights"].split(",")] if cfg["source_weights"] else None


def make_sampler(cfg, n_records, sources, names, rank, world_size, start_step, max_steps):
    """Each step's record indices on this rank: shuffled over all records, or one source per batch."""
    if cfg["single_source_batches"]:
        return data.SourceBatchSampler([b - a for a, b in sources], cfg["batch_size"], rank, world_size, cfg["seed"],
                                       batch_weights(cfg), start_step, max_steps - start_step, names)
    return data.ResumableBatchSampler(n_records, cfg["batch_size"], rank, world_size, cfg["seed"],
                                      shuffle=True, start_step=start_step, max_steps=max_steps - start_step)


# -----------------------------------------------------------------------------
# The objectives' inputs and the stage-1 ablations' model changes

def step_texts(dataset, indices, step, objective, hard, instruction):
    """One step's texts per side, [(texts, instructions)]: supervised SimCSE: query (its record's own
    instruction, else `instruction`), positive[, hard negative]; unsupervised SimCSE: the same caption
    twice, no instruction, so the two views differ only by dropout[, hard negative]; mntp: one caption."""
    queries, positives, negatives = dataset.batch(indices, step, hard)
    none = [None] * len(queries)
    if objective == "supervised_simcse":
        sides = [(queries, dataset.instructions(indices, instruction)), (positives, none)]
    else:
        sides = [(queries, none)] * (2 if objective == "unsupervised_simcse" else 1)
    return sides + ([(negatives, none)] if hard else [])


def mntp_batch(encoder, texts, indices, step, cfg, mask_id):
    """Tokenised texts (no instruction) with llm2vec's MNTP corruption and labels (never a special token);
    each record's mask is drawn from (seed, step, record index) only, so micro-batching, ranks and resume
    do not change it."""
    b = encoder.tokenize(texts, None, cfg["max_length"])
    seeds = [step_seed(cfg["seed"], 10**9 + i, step) for i in indices]  # a stream per record, apart from ranks'
    b["input_ids"], b["labels"] = L.mntp_mask(b["input_ids"], b["embed_mask"] * b["attention_mask"], mask_id,
                                              len(encoder.tokenizer), cfg["mntp_mask_prob"], seeds,
                                              L.mntp_special_ids(encoder.tokenizer))
    return b


def set_dropout(model, p):
    """Set every attention and hidden dropout of a HF model to p (SimCSE's noise: LoRA dropout alone is
    not it). nn.Dropout modules outside LoRA, and attention modules' `attention_dropout` (Llama, Qwen,
    Mistral, Gemma apply no other dropout), plus the config fields for the record. Returns the number of
    places set; raises if the model has none (then p would silently do nothing)."""
    n = 0
    for name, m in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(m, nn.Dropout):
            m.p, n = p, n + 1
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout, n = p, n + 1
    if n == 0:
        raise ValueError(f"set_dropout: {type(model).__name__} has no dropout module or attention_dropout to set")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for k in ("attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(base.config, k):
            setattr(base.config, k, p)
    return n


def tokenize_mixed(encoder, texts, instructions, max_length=512):
    """Like `encoder.tokenize`, with one instruction per text (None: none): each text is laid out
    exactly as `encoder.tokenize([text], its_instruction)` would (the instruction attended, not pooled),
    rows right-padded to one length. Used for per-record instructions (E5-style pure-text pairs)."""
    texts, instructions = list(texts), list(instructions)
    groups = {}
    for i, ins in enumerate(instructions):
        groups.setdefault(ins, []).append(i)
    if len(groups) == 1:
        return encoder.tokenize(texts, instructions[0] if instructions else None, max_length)
    parts = [(rows, encoder.tokenize([texts[i] for i in rows], ins, max_length)) for ins, rows in groups.items()]
    T = max(b["input_ids"].shape[1] for _, b in parts)
    out = {"input_ids": torch.full((len(texts), T), encoder.pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(texts), T), dtype=torch.long),
           "embed_mask": torch.zeros((len(texts), T), dtype=torch.long)}
    for rows, b in parts:
        for k, v in b.items():
            out[k][rows, :v.shape[1]] = v
    return out


def chain_of(cfg):
    """init_from (Table 9's MNTP then SimCSE): (the chain's root model, the runs before this one)."""
    if not cfg["init_from"]:
        return cfg["text_model"], []
    prev = M.read_encoder_config(cfg["init_from"])
    if prev.get("adaptor"):
        raise ValueError(f"init_from={cfg['init_from']}: it holds a stage-1 adaptor; chain from a LoRA run")
    return prev["base_model"], prev.get("chain", []) + [{"out_dir": os.path.abspath(cfg["init_from"]),
                                                         "steps": prev["steps"],
                                                         "objective": prev.get("objective", "supervised_simcse")}]


def load_encoder(cfg, base_model, dtype, device):
    """The LLM as a bidirectional caption encoder with what trains: LoRA, or a frozen LLM + stage-1 adaptor;
    `dropout` set; (LM head, mask token) for MNTP. Same seed on every rank: the same init everywhere."""
    torch.manual_seed(cfg["seed"])
    encoder = M.load_text_encoder(
        cfg["init_from"] or cfg["text_model"], bidirectional=cfg["bidirectional"], pooling=cfg["pooling"],
        chat_template=cfg["chat_template"] or "none",
        lora=dict(r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"]) if cfg["lora_r"] else None,
        dtype=dtype, attn_implementation=cfg["attn_implementation"] or None, device=device)
    if not cfg["lora_r"]:
        encoder.model.requires_grad_(False)  # frozen LLM: only the adaptor trains
    if cfg["cc_adaptor_blocks"] >= 0:
        encoder.adaptor = M.Adaptor(encoder.dim, encoder.dim, cfg["cc_adaptor_blocks"]).to(device)
    if cfg["dropout"] >= 0:
        set_dropout(encoder.model, cfg["dropout"])
    mntp = None
    if cfg["objective"] == "mntp":  # next-token prediction through the LM head: a decoder's objective
        if not encoder.is_decoder:
            raise ValueError(f"objective=mntp: {base_model} is not a decoder LLM (no next-token LM head)")
        mntp = L.load_lm_head(base_model, encoder.model), L.mntp_mask_token_id(encoder.tokenizer)
    if cfg["gradient_checkpointing"]:
        m, kw = encoder.model, {"use_reentrant": False}  # non-reentrant: no input needs requires_grad
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return encoder, mntp


def log_setup(log, cfg, encoder, params, run, n_records, steps_per_epoch, start_step, max_steps, resumed, chain,
              base_model, names, records):
    b_local = cfg["batch_size"] // run.world_size
    n_chunks = math.ceil(b_local / cfg["micro_batch_size"])
    objective, hard = cfg["objective"], cfg["hard_negatives"]
    log(f"model {cfg['init_from'] or cfg['text_model']}: {'decoder' if encoder.is_decoder else 'encoder'}, "
        f"bidirectional={encoder.settings['bidirectional']}, pooling={cfg['pooling']}, "
        f"chat_template={encoder.chat_template or 'none'}, "
        + (f"{str(run.dtype).split('.')[-1]} autocast" if run.dtype != torch.float32 else "fp32")
        + (" with dynamic loss scaling" if run.scaler.is_enabled() else "") + f" on {run.device}; "
        + (f"LoRA r={cfg['lora_r']} alpha={cfg['lora_alpha']}" if cfg["lora_r"] else "LLM frozen")
        + (f", adaptor {cfg['cc_adaptor_blocks']} blocks" if encoder.adaptor is not None else "")
        + f": {sum(p.numel() for p in params):,} trainable of {sum(p.numel() for p in encoder.parameters()):,} parameters")
    if chain:
        log("init_from chain: " + " -> ".join([base_model] + [f"{c['objective']} {c['steps']} steps ({c['out_dir']})"
                                                             for c in chain]) + f" -> {objective} (this run)")
    log(f"objective {objective}" + (f", dropout {cfg['dropout']}" if cfg["dropout"] >= 0 else "")
        + (f", mask prob {cfg['mntp_mask_prob']} (80/10/10), LM head of {base_model} (frozen)" if objective == "mntp" else ""))
    single, weights = cfg["single_source_batches"], batch_weights(cfg)
    log(f"records: {n_records:,} ({steps_per_epoch} steps/epoch); steps {start_step} -> {max_steps}"
        + (f" (resumed from {resumed})" if resumed else "")
        + (f"; one source per batch: {', '.join(names)}" + (f", weights {weights}" if weights else "") if single else ""))
    unused = sum("negative" in r for r in records) if not hard else 0
    if unused:
        log(f"train_pairs: {unused} records carry a \"negative\" that hard_negatives=False leaves unused")
    if objective == "mntp":
        log(f"batch {cfg['batch_size']} ({run.world_size} ranks x {b_local}), {n_chunks} micro-batches of <= "
            f"{cfg['micro_batch_size']} per rank (plain accumulation: the MNTP loss is a sum over tokens, exact)")
    else:
        log(f"global contrastive batch {cfg['batch_size']} ({run.world_size} ranks x {b_local}), negatives per query: "
            f"{cfg['batch_size'] - 1}" + (f" (+{cfg['batch_size']} hard negatives)" if hard else "")
            + f", all gathered across ranks; temperature {cfg['temperature']}")
        log(f"gradient caching: {n_chunks} chunks of <= {cfg['micro_batch_size']} texts per side per rank"
            if n_chunks > 1 else "no gradient caching: one forward pass per side per rank")


def c2c_before_training(cfg, encoder, val_records, run, log):
    """The quality gate on the LLM as loaded (a fresh stage-1 adaptor's random projection is not the baseline)."""
    result = None
    if run.master:
        adaptor, encoder.adaptor = encoder.adaptor, None
        result = c2c_eval(encoder, val_records, cfg["instruction"] or None, cfg["max_length"], cfg["eval_batch_size"])
        encoder.adaptor = adaptor
        log(f"c2c before: top1 {result['c2c_top1']:.2f} reverse {result['c2c_top1_reverse']:.2f} "
            f"(n={result['n']}, {cfg['val_captions']}" + (", without the adaptor)" if adaptor else ")"))
    if run.ddp:
        dist.barrier()
    return result


# -----------------------------------------------------------------------------

def train(run, encoder, model, dataset, sampler, ckpts, start_step, max_steps, c2c_before, mntp, log):
    """The training loop: the step's texts, the loss (gradient caching or MNTP accumulation), the update,
    logging and checkpoints. Returns the last loss."""
    from tqdm import tqdm
    cfg, objective, hard = run.cfg, run.cfg["objective"], run.cfg["hard_negatives"]
    m, b_local, device, ddp = cfg["micro_batch_size"], cfg["batch_size"] // run.world_size, run.device, run.ddp
    no_sync = model.no_sync if ddp else None  # gradients are all-reduced once per step, by DDP
    loss_fn = lambda q, d, h=None: L.caption_contrastive_loss(q, d, cfg["temperature"], h)  # noqa: E731
    instruction = cfg["instruction"] or None
    texts_per_step = cfg["batch_size"] * ((1 if objective == "mntp" else 2) + hard)
    encoder.pop_truncation()  # from here on: the training texts only
    encoder.train()
    pbar = tqdm(total=max_steps, initial=start_step, desc="cc_finetune", disable=not run.master)
    t0, t0_step, loss = time.time(), start_step, None
    for step, indices in zip(range(start_step, max_steps), sampler):
        sides = step_texts(dataset, indices, step, objective, hard, instruction)
        lr_now = get_lr(step, max_steps, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr_now
        torch.manual_seed(step_seed(cfg["seed"], run.rank, step))  # dropout masks: a function of the step
        if objective == "mntp":  # a sum over tokens: plain micro-batch accumulation is exact
            b = mntp_batch(encoder, sides[0][0], indices, step, cfg, mntp[1])
            chunks = [{k: v[i:i + m].to(device) for k, v in b.items()} for i in range(0, b_local, m)]
            n_sel = L.mntp_num_predicted(b["labels"]).to(device)
            if ddp:
                dist.all_reduce(n_sel)  # the loss is a mean over the global batch's predicted tokens
            hidden = lambda c: model(c["input_ids"], c["attention_mask"], pool=False)[0]  # noqa: E731
            loss = L.mntp_accumulate(hidden, chunks, mntp[0], n_sel.item(), run.world_size, run.autocast, no_sync,
                                     scaler=run.scaler)
        else:  # the full batch's contrastive loss; more than one chunk per side: gradient caching
            chunks = [[{k: v.to(device) for k, v in tokenize_mixed(encoder, texts[i:i + m], instrs[i:i + m],
                                                                   cfg["max_length"]).items()}
                       for i in range(0, len(texts), m)] for texts, instrs in sides]
            loss = L.grad_cache_step(lambda c: model(**c), chunks, loss_fn, no_sync=no_sync, autocast=run.autocast,
                                     scaler=run.scaler)
        if ddp:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # every rank sees the same value: stop together
        # a non-finite (float32, unscaled) loss stops the run; float16 gradient overflow is skipped and counted
        newest = f"; newest checkpoint: {(ckpts.paths() or ['none (none saved yet)'])[-1]}"
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}{newest}")
        skipped, grad_norm = common.scaled_step(run.optimizer, run.scaler, run.params, cfg["grad_clip"],
                                                f" at step {step}{newest}")
        if skipped:
            run.skipped += 1
            log(f"step {step + 1}: float16 gradients overflowed, step skipped ({run.skipped} so far), loss scale "
                f"now {run.scaler.get_scale():g}")
        run.optimizer.zero_grad(set_to_none=True)
        pbar.update(1)

        done = step + 1
        if done % cfg["log_interval"] == 0 or done == max_steps:
            dt = (time.time() - t0) / (done - t0_step)
            log(f"step {done}/{max_steps}: loss {loss.item():.4f}, lr {lr_now:.2e}, {dt * 1000:.0f} ms/step, "
                f"{texts_per_step / dt:.0f} texts/s" + (f", loss scale {run.scaler.get_scale():g} ({run.skipped} "
                                                        "skipped)" if run.scaler.is_enabled() else ""))
            run.metrics.write({"step": done, "loss": loss.item(), "lr": lr_now, "ms_per_step": dt * 1000,
                               "texts_per_s": texts_per_step / dt,
                               **({"grad_norm": grad_norm.item()} if torch.isfinite(grad_norm) else {}),
                               **({"loss_scale": run.scaler.get_scale(),
                                                                       "skipped_steps": run.skipped}
                                                                      if run.scaler.is_enabled() else {})})
            t0, t0_step = time.time(), done
        if done % cfg["save_interval"] == 0 or done == max_steps:
            if run.master:  # the step is the data position: the sampler and every RNG derive from it
                ckpts.save(done, {"model": common.trainable_state(encoder), "optimizer": run.optimizer.state_dict(),
                                  "config": common.jsonable(cfg), "c2c_before": c2c_before,
                                  "world_size": run.world_size, "scaler": run.scaler.state_dict(),
                                  "skipped_steps": run.skipped})
            if ddp:
                dist.barrier()
    pbar.close()
    return loss


def truncation_counts(encoder, run):
    """The training texts' truncation counts, summed over ranks."""
    trunc = encoder.pop_truncation()
    if run.ddp:
        counts = torch.tensor([trunc[k] for k in ("texts", "truncated", "tokens_cut")], dtype=torch.long, device=run.device)
        dist.all_reduce(counts)
        top = torch.tensor([trunc["max_cut"]], device=run.device)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        trunc = dict(zip(("texts", "truncated", "tokens_cut"), counts.tolist()), max_cut=top.item())
    return trunc


def save_encoder(out_dir, cfg, encoder, base_model, chain, result, log):
    """adapter/ (peft), merged/ (HF model + tokenizer: the out_dir stands alone), cc_adaptor.pt, encoder.json."""
    if cfg["lora_r"]:
        encoder.model.save_pretrained(os.path.join(out_dir, "adapter"))
    merged = M.merge_lora(encoder.model)  # without LoRA: the (unchanged) frozen LLM
    merged.save_pretrained(os.path.join(out_dir, "merged"))
    encoder.tokenizer.save_pretrained(os.path.join(out_dir, "merged"))
    adaptor = None
    if encoder.adaptor is not None:
        a = encoder.adaptor
        common.atomic_torch_save({k: v.detach().cpu() for k, v in a.state_dict().items()},
                                 os.path.join(out_dir, M.CC_ADAPTOR_FILE))
        adaptor = {"file": M.CC_ADAPTOR_FILE, "in_dim": a.in_dim, "out_dim": a.out_dim,
                   "num_blocks": a.num_blocks, "expansion": a.expansion}
    M.write_encoder_config(out_dir, {
        "model_subdir": "merged", "adapter_subdir": "adapter" if cfg["lora_r"] else None,
        "base_model": base_model, "init_from": cfg["init_from"] or None, "chain": chain,
        "objective": cfg["objective"], "dropout": cfg["dropout"], "adaptor": adaptor,
        "pooling": cfg["pooling"], "bidirectional": encoder.settings["bidirectional"],
        "chat_template": encoder.chat_template, "instruction": cfg["instruction"], "max_length": cfg["max_length"],
        "temperature": cfg["temperature"], "lora": {"r": cfg["lora_r"], "alpha": cfg["lora_alpha"],
                                                      "dropout": cfg["lora_dropout"]},
        "steps": result["steps"], "batch_size": cfg["batch_size"], "c2c_before": result["c2c_before"],
        "c2c_after": result["c2c_after"], "code_version": common.code_version()})
    log(f"saved {out_dir}: " + ("adapter/, " if cfg["lora_r"] else "") + "merged/, "
        + (f"{M.CC_ADAPTOR_FILE}, " if adaptor else "")
        + f"{M.ENCODER_CONFIG}; load with model.load_text_encoder({out_dir!r})")


def main(argv=None):
    # --- config, distributed init
    cfg = common.configure({k: globals()[k] for k in config_keys}, argv, __doc__)  # typed: a wrong type fails here
    check_config(cfg)
    common.elastic_restart(cfg)  # restarted by torchrun --max_restarts: resume from the newest checkpoint
    ddp, rank, local_rank, world_size, device = common.setup_distributed()
    master = rank == 0
    device = torch.device(device)
    if cfg["batch_size"] % world_size:
        raise ValueError(f"batch_size={cfg['batch_size']} is not divisible by {world_size} ranks")
    out_dir = cfg["out_dir"]
    log = common.open_run(out_dir, "cc_finetune", master, cfg["resume"], cfg["overwrite"])  # one run per out_dir
    dtype, autocast = common.resolve_dtype(cfg["dtype"], device)  # bf16 weights + autocast on CUDA by default

    # --- data: records, two captions each per step, a deterministic rank-split order
    records, sources, names = read_records(cfg)
    dataset = data.CaptionPairDataset(records, cfg["seed"], sources if cfg["single_source_batches"] else None)
    steps_per_epoch = (sum((b - a) // cfg["batch_size"] for a, b in sources) if cfg["single_source_batches"]
                       else len(records) // cfg["batch_size"])
    max_steps = cfg["max_steps"] if cfg["max_steps"] > 0 else steps_per_epoch
    val_records = data.read_caption_records(cfg["val_captions"]) if cfg["val_captions"] else None

    # --- model and optimizer; then resume what trains and the optimizer from the newest good checkpoint
    base_model, chain = chain_of(cfg)
    encoder, mntp = load_encoder(cfg, base_model, dtype, device)
    params = [p for p in encoder.parameters() if p.requires_grad]  # LoRA and/or adaptor
    optimizer = common.adamw(params, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])  # fused where torch can
    ckpts = common.Checkpoints(out_dir, cfg["keep_checkpoints"], log)
    path, ck = ckpts.newest() if cfg["resume"] else (None, None)
    scaler = common.grad_scaler(dtype, device)  # float16: dynamic loss scaling; else a pass-through
    if ck is not None:
        common.check_resume(path, ck, cfg, RESUME_FREE_KEYS, world_size=world_size, model=encoder,
                            defaults={k: globals()[k] for k in config_keys})
        common.load_trainable_state(encoder, ck["model"] if "model" in ck else ck["trainable"], path)
        optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):  # the loss scale and its growth counter: the resumed run skips where this one would
            scaler.load_state_dict(ck["scaler"])
    start_step = ck["step"] if ck else 0
    model = encoder
    if ddp:  # gradient sync by DDP (no_sync in all but the last re-run of a step); buffers never change
        model = torch.nn.parallel.DistributedDataParallel(encoder, device_ids=[local_rank] if device.type == "cuda"
                                                          else None, broadcast_buffers=False)
    run = types.SimpleNamespace(cfg=cfg, ddp=ddp, rank=rank, world_size=world_size, master=master, device=device,
                                dtype=dtype, autocast=autocast, optimizer=optimizer, params=params, scaler=scaler,
                                skipped=ck.get("skipped_steps", 0) if ck else 0)
    run.metrics = tracking.MetricsLog(out_dir, cfg, master, start_step, log)  # metrics.jsonl (+ W&B, TensorBoard)
    log_setup(log, cfg, encoder, params, run, len(records), steps_per_epoch, start_step, max_steps, path, chain,
              base_model, names, records)

    # --- quality gate before, training, quality gate after
    c2c_before = ck.get("c2c_before") if ck else None
    if val_records is not None and c2c_before is None:
        c2c_before = c2c_before_training(cfg, encoder, val_records, run, log)
        run.metrics.write({"step": 0, "c2c": c2c_before})
    sampler = make_sampler(cfg, len(dataset), sources, names, rank, world_size, start_step, max_steps)
    loss = train(run, encoder, model, dataset, sampler, ckpts, start_step, max_steps, c2c_before, mntp, log)
    encoder.eval()
    trunc = truncation_counts(encoder, run)
    log(common.describe_truncation(trunc, cfg["max_length"]) + " (training texts, instruction included)")
    result = {"steps": max_steps, "final_loss": None if loss is None else loss.item(),
              "c2c_before": c2c_before, "c2c_after": None, "truncation": trunc, "skipped_steps": run.skipped}

    # --- save (rank 0)
    if master:
        if val_records is not None:
            result["c2c_after"] = c2c_eval(encoder, val_records, cfg["instruction"] or None, cfg["max_length"],
                                           cfg["eval_batch_size"])
            b, a = c2c_before["c2c_top1"], result["c2c_after"]["c2c_top1"]
            log(f"c2c before -> after: top1 {b:.2f} -> {a:.2f} ({a - b:+.2f}), reverse "
                f"{c2c_before['c2c_top1_reverse']:.2f} -> {result['c2c_after']['c2c_top1_reverse']:.2f}")
            run.metrics.write({"step": max_steps, "c2c": result["c2c_after"]})
        run.metrics.close()
        save_encoder(out_dir, cfg, encoder, base_model, chain, result, log)
        common.save_run_info(out_dir, cfg, __file__, extra={"result": result, "world_size": world_size, "chain": chain})
        common.unlock_out_dir(out_dir)
    common.cleanup_distributed(ddp)
    return result


if __name__ == "__main__":
    common.run_main(main)
