"""Small helpers every stage script shares: typed config overrides, distributed init, run records.

Kept apart from model.py so that model.py stays copy-pasteable (torch/transformers/peft/timm only).
"""
import ast
import contextlib
import datetime
import glob
import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import types

import torch
import torch.distributed as dist

import data
# Imported before any init_process_group, on purpose: torch.distributed.nn.functional stores the default
# group in its functions' default arguments when first imported, and loading a transformers model imports
# it (via torchvision and torch._dynamo). Imported after init, it keeps the group alive past
# destroy_process_group; gloo's worker threads then free their last work during interpreter shutdown,
# which can abort a finished run ("terminate called without an active exception", exit code -6).
import torch.distributed.nn  # noqa: F401


# -----------------------------------------------------------------------------
# The boundary: every script's entry point. Bad input is one line and exit status 2; a bug keeps its traceback.

REPO = os.path.dirname(os.path.abspath(__file__))


def _raised_here(exc):
    """True if the innermost frame of exc's traceback is in this repository's code: a `raise` of ours
    (we raise ValueError and OSError only to reject input, naming it) or a builtin such as open() called
    by it, not an error deep inside a library (a library's error on user input is caught where that
    input enters and re-raised naming it)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(REPO + os.sep) \
        and f"{os.sep}.venv{os.sep}" not in tb.tb_frame.f_code.co_filename


def run_main(main, argv=None):
    """Run a script's main as a command: an input error (ValueError or OSError raised by our code, or
    the FloatingPointError that stops a diverged run) prints `<script>: error: <message>` on one line and exits 2; anything else propagates with its
    traceback. LLM2CLIP_TRACEBACK=1 shows the traceback of input errors too. Meanwhile configure() sets torch's
    CPU threads (set_threads): for a command only, never for a main([...]) called in-process (tests)."""
    global _COMMAND
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "llm2clip"
    before, _COMMAND = _COMMAND, True
    try:
        return main(argv)
    except (ValueError, OSError, FloatingPointError) as e:  # FloatingPointError: a diverged run, named by step
        if not _raised_here(e) or os.environ.get("LLM2CLIP_TRACEBACK"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message held
        tqdm = sys.modules.get("tqdm")
        for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
            bar.close()  # now, so that the error stays the last line (not a bar closed at exit)
        print(f"{script}: error: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        _COMMAND = before


# -----------------------------------------------------------------------------
# CPU threads: by default processes x threads stay within the cores (torchrun ranks and DataLoader workers counted)

_COMMAND = False  # run_main sets it: only a command-line run sets torch's threads; main([...]) in a test keeps its own


def cpu_cores():
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a container's --cpus)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for quota, period in (("/sys/fs/cgroup/cpu.max", None), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
                                                             "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            with open(quota) as f:
                q = f.read().split()
            if period:
                with open(period) as f:
                    q.append(f.read().strip())
            if q[0] not in ("max", "-1") and int(q[0]) > 0:
                n = min(n, max(1, int(q[0]) // int(q[1])))
        except (OSError, ValueError, IndexError):
            continue
    return n


def intra_op_threads(cfg=None, env=None):
    """-> (threads, why): torch's intra-op threads for one process of this run. Explicit wins: a `threads` key > 0
    (bench.py), else OMP_NUM_THREADS. Else the node's cores are split so that processes x threads never exceed
    them: each of the LOCAL_WORLD_SIZE ranks (torchrun; 1 without) gets cores // ranks, less one core per
    DataLoader worker of its own (num_workers: each computes with one thread, data_index.worker_init); >= 1."""
    env, cfg = os.environ if env is None else env, cfg or {}
    omp = str(env.get("OMP_NUM_THREADS", "")).strip()
    if isinstance(cfg.get("threads"), int) and cfg["threads"] > 0:
        return cfg["threads"], "the threads key"
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cores, workers = cpu_cores(), cfg.get("num_workers") if isinstance(cfg.get("num_workers"), int) else 0
    ranks = int(env["LOCAL_WORLD_SIZE"]) if str(env.get("LOCAL_WORLD_SIZE", "")).isdigit() else 1
    return max(1, cores // max(1, ranks) - workers), f"{cores} cores / {ranks} rank(s) per node - {workers} worker(s)"


def set_threads(cfg=None):
    """torch.set_num_threads(intra_op_threads(cfg)); -> (threads, why). configure() calls it for a command."""
    n, why = intra_op_threads(cfg)
    torch.set_num_threads(n)
    return n, why


# -----------------------------------------------------------------------------
# Configuration: nanoGPT's `python X.py config/foo.py --key=value`, parsed instead of exec'd.

# Keys renamed so that every stage script uses one name per concept. An old name in a config
# file or on the command line is an error that names the new key: accepting both would let a typo of
# intent (two spellings, one silently ignored) through.
RENAMED = {"lr": "learning_rate", "ckpt_interval": "save_interval", "grad_checkpointing": "gradient_checkpointing",
           "val_batch_size": "eval_batch_size", "model": "text_model"}


def _unknown_key(where, key, defaults):
    if key in RENAMED and RENAMED[key] in defaults:
        return ValueError(f"{where}config key {key!r} was renamed to {RENAMED[key]!r}; use --{RENAMED[key]}=...")
    return ValueError(f"{where}unknown config key {key!r}; valid keys: {', '.join(defaults)}")


def _convert(key, raw, default):
    """Parse `raw` (a string from the command line) into the type of `default`."""
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}={raw}: expected a boolean (true/false), got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            try:
                as_float = float(raw)  # accept 1e3 for an int if it is integral
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise ValueError(f"--{key}={raw}: expected an integer (default {default!r})") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"--{key}={raw}: expected a number (default {default!r})") from None
    if isinstance(default, str):
        return raw
    # None, lists, tuples, dicts: a Python literal, else the plain string (so --out=None works too)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = raw
    return _check_type(f"--{key}", value, default)


def _check_type(where, value, default):
    """A config-file value must have its default's type (an int may stand for a float, a path for a str)."""
    if default is None or value is None:
        return value
    if isinstance(default, str) and isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    scalar = (bool, int, float, str)
    if isinstance(default, scalar) and type(value) is not type(default):
        raise ValueError(f"{where} = {value!r}: expected {type(default).__name__} like the default {default!r}")
    if isinstance(default, dict) and not isinstance(value, dict) \
            or isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} = {value!r}: expected a {type(default).__name__} literal like the default {default!r}")
    return value


def configure(defaults, argv=None, doc=""):
    """Resolve a stage's config: `defaults` (name -> value), then config files, then `--key=value`.

    argv items ending in `.py` are config files of plain assignments (nanoGPT style). A bare `--flag`
    means `--flag=True` for a boolean key (an error for any other type). Unknown keys,
    in a file or on the command line, raise ValueError naming the key and listing the valid ones.
    `-h`/`--help` prints every key with its default and exits. Returns a new dict.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    shadowed = [k for k, v in defaults.items() if callable(v)]
    if shadowed:  # a function defined after the config section with a key's name replaced its default
        raise TypeError(f"config keys {shadowed} are functions, not values: rename the function")
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(doc.strip() + "\n" if doc else "", end="")
            print("keys (override with --key=value or a config/*.py file):")
            for k, v in defaults.items():
                print(f"  --{k}={v!r}")
            raise SystemExit(0)
        if not arg.startswith("--"):
            if not arg.endswith(".py"):  # exec'ing any other file (a manifest, a checkpoint) would be a surprise
                raise ValueError(f"argument {arg!r}: expected a config file ending in .py or --key=value")
            if not os.path.isfile(arg):
                raise ValueError(f"config file {arg!r} not found (expected a config/*.py file or --key=value)")
            scope = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), {}, scope)
            for k, v in scope.items():
                if k.startswith("_") or isinstance(v, types.ModuleType):  # `import math` in a preset is fine
                    continue
                if k not in defaults:
                    raise _unknown_key(f"{arg}: ", k, defaults)
                config[k] = _check_type(f"{arg}: {k}", v, defaults[k])
            continue
        key, eq, raw = arg[2:].partition("=")
        if key not in defaults:
            raise _unknown_key("", key, defaults)
        if not eq:  # a bare `--flag` sets a boolean key; any other type needs its value
            if not isinstance(defaults[key], bool):
                raise ValueError(f"--{key}: expected --{key}=value ({type(defaults[key]).__name__}, "
                                 f"default {defaults[key]!r}); only boolean keys may be given as a bare flag")
            raw = "true"
        config[key] = _convert(key, raw, defaults[key])
    if _COMMAND:  # a command (run_main): torch's threads by intra_op_threads, once the keys are known
        set_threads(config)
    return config


# -----------------------------------------------------------------------------
# Text-encoder settings: the same keys in every script that loads the LLM caption encoder
# (embed_captions.py, evaluate.py, post_train.py with text_source=online), as model.load_text_encoder
# takes them. None / "" = the encoder's own (a stage-1 out_dir's encoder.json, else the defaults:
# bidirectional, mean pooling, no chat template).

def text_encoder_kwargs(cfg):
    """cfg's `bidirectional`, `pooling`, `chat_template` (and `official_extraction` where the script has
    it; False = the encoder's own) as load_text_encoder kwargs (validated)."""
    b = cfg["bidirectional"]
    if isinstance(b, str):
        b = {"true": True, "false": False, "": None, "none": None}.get(b.lower(), b)
    if b not in (None, True, False):
        raise ValueError(f"bidirectional={cfg['bidirectional']!r}: expected True, False or None (None = the "
                         "encoder's own: a stage-1 out_dir's encoder.json, else True for a decoder)")
    return {"bidirectional": b, "pooling": cfg["pooling"] or None, "chat_template": cfg["chat_template"] or None,
            "official_extraction": cfg.get("official_extraction") or None}


def describe_text_encoder(encoder, kwargs):
    """One log line: what the loaded encoder does and where each setting came from (set / encoder.json / default)."""
    s = encoder.settings
    own = "encoder.json" if "model_subdir" in s else "default"
    src = lambda k: "set" if kwargs.get(k) is not None else own  # noqa: E731
    return (f"text encoder {s.get('name_or_path')}: {'decoder' if encoder.is_decoder else 'encoder (BERT-like)'}, "
            f"bidirectional={s.get('bidirectional')} ({src('bidirectional')}), pooling={encoder.pooling} "
            f"({src('pooling')}), chat_template={encoder.chat_template or 'none'} ({src('chat_template')})"
            + (", official_extraction=True (llm2vec's layout and truncation)" if encoder.official_extraction else ""))


# -----------------------------------------------------------------------------
# Distributed: works under torchrun on GPUs (nccl) and on CPUs (gloo), and without torchrun.

def setup_distributed():
    """Init the process group when launched by torchrun. Returns (ddp, rank, local_rank, world_size, device)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device = "cpu"
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
    else:
        rank, local_rank, world_size = 0, 0, 1
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ddp, rank, local_rank, world_size, device


def cleanup_distributed(ddp):
    if ddp and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Run records: every output directory says which config and which code produced it.

def code_version():
    """The git commit of this checkout (+ '-dirty' if there are uncommitted changes), or 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def jsonable(v):
    """Plain JSON types only (anything else -> its repr): for run records and config comparisons."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return repr(v)


RUN_INFO_VERSION = 1


def save_run_info(out_dir, config, script, extra=None):
    """Write out_dir/run_<script>.json: resolved config, code version, time, torch/transformers versions
    (read back by read_run_info)."""
    import transformers  # local: only the stage scripts need it
    os.makedirs(out_dir, exist_ok=True)
    info = {
        "format_version": RUN_INFO_VERSION,
        "script": script,
        "config": jsonable(config),
        "code_version": code_version(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **(jsonable(extra) if extra else {}),
    }
    path = os.path.join(out_dir, f"run_{os.path.splitext(os.path.basename(script))[0]}.json")
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")
    return path


def read_run_info(out_dir, script):
    """run_<script>.json of out_dir (files without format_version are version 1); ValueError naming the
    file if it is missing, not JSON, or newer than this code."""
    path = os.path.join(out_dir, f"run_{os.path.splitext(os.path.basename(script))[0]}.json")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the run record ({e}); expected a file {script} wrote") from None
    version = info.get("format_version", 1) if isinstance(info, dict) else None
    if not isinstance(version, int) or version > RUN_INFO_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not one this code reads (<= {RUN_INFO_VERSION})")
    return info


def atomic_write_text(path, text):
    """Write text to path via a temp file + rename, so a crash never leaves a half-written file."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    data.atomic_write(path, write)


def _torch_save(obj, path):
    """torch.save whose write failures (a full disk makes torch raise RuntimeError, not OSError) are OSErrors
    naming the file."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        raise OSError(f"cannot write {path} ({' '.join(str(e).split())[:200]}); is the disk full?") from None


def atomic_torch_save(obj, path):
    """torch.save via temp file + rename (a killed run never leaves a truncated checkpoint)."""
    data.atomic_write(path, lambda tmp: _torch_save(obj, tmp))


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(root):
    """Delete `*.tmp<pid>` files under root whose writer is dead (a run killed mid-write: at ViT-L scale
    each is gigabytes). Call it with root's lock held (lock_out_dir). Returns the removed paths."""
    removed = []
    for d, _, names in os.walk(root):
        for n in names:
            m = re.search(r"\.tmp(\d+)$", n)
            if m and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(d, n))
                    removed.append(os.path.join(d, n))
    return removed


# -----------------------------------------------------------------------------
# The training skeleton both stages share: compute dtype, checkpoints and the resume rules

def resolve_dtype(name, device):
    """A stage's `dtype` key -> (torch dtype, autocast context): the one reading of it. "auto" is
    bfloat16 on CUDA and float32 elsewhere (CPU autocast is slow and not what a GPU run does, so the tiny
    CPU runs stay float32); a dtype given by name is honoured on every device (CPU autocast runs bfloat16
    and float16). The context is reusable; float32 gives a null context."""
    import model as M
    kind = torch.device(device).type
    dtype = (torch.bfloat16 if kind == "cuda" else torch.float32) if name == "auto" else M.resolve_dtype(name)
    ctx = torch.autocast(kind, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    return dtype, ctx


MIN_LOSS_SCALE = 1e-4  # fairseq's min_loss_scale: float16 gradients that overflow even below it have diverged


def grad_scaler(dtype, device):
    """Dynamic loss scaling for float16 (torch.amp.GradScaler of the device's kind: from 2^16, halved on an
    overflow, doubled after 2000 clean steps); disabled for other dtypes, where scale() and step() pass
    through. Its state_dict() (plain floats and ints; {} when disabled) goes into the checkpoints."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)


def scaled_step(optimizer, scaler, params, grad_clip, where=""):
    """Unscale the gradients, clip their norm (grad_clip > 0), step through the scaler, update its scale.
    -> (skipped, grad_norm): skipped is True when the scaler skipped the step: float16 gradients overflowed
    (inf/nan), the weights and the optimizer state stay, the scale halves; that is the scaler's routine, not
    divergence. grad_norm: the total norm of the unscaled gradients before clipping (a 0-dim tensor, not
    synced: read it at log time). A scale driven below MIN_LOSS_SCALE means the gradients are non-finite
    at any scale: FloatingPointError (`where` names the step and the newest checkpoint), as for a non-finite loss."""
    params = [p for p in params if p.grad is not None]
    enabled = scaler is not None and scaler.is_enabled()
    if enabled:
        before = scaler.get_scale()
        scaler.unscale_(optimizer)
    # max_norm=inf measures without clipping (the gradients are multiplied by exactly 1)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if not enabled:
        optimizer.step()
        return False, norm
    scaler.step(optimizer)  # skipped if unscale_ found inf/nan
    scaler.update()
    scale = scaler.get_scale()
    if scale < MIN_LOSS_SCALE:
        raise FloatingPointError(f"float16 gradients overflow at every loss scale (now {scale:g} < "
                                 f"{MIN_LOSS_SCALE:g}){where}: the run diverged")
    return scale < before, norm


def trainable_state(module):
    """What trains (parameters with requires_grad: LoRA, adaptor, vision tower, ...) as CPU tensors: a
    checkpoint holds these, never a frozen LLM (16 GB at Llama-3-8B, and the same in every save)."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module, state, path):
    """Copy a trainable_state back; every trainable parameter must be in it (CheckpointError naming
    `path` and the first missing or unexpected names). Older checkpoints with frozen weights load too."""
    own = dict(module.named_parameters())
    missing = [n for n, p in own.items() if p.requires_grad and n not in state]
    unexpected = [n for n in state if n not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for n, v in state.items():
            own[n].copy_(v)


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def per_rank(obj, ddp, world_size):
    """[obj of rank 0, obj of rank 1, ...] on every rank (all_gather_object), [obj] without DDP."""
    if not ddp:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class Checkpoints:
    """out_dir/checkpoints/step_<8 digits>.pt: plain-types dicts (torch.load(weights_only=True) reads them),
    each written atomically with a sha256 sidecar, the newest `keep` kept (0: all). `newest()` loads the
    newest one that passes its checksum, falling back to the previous one (with a log line) when the
    newest is corrupt or truncated. A stage-1 out_dir of older code has one `ckpt.pt`: it is read too."""

    def __init__(self, out_dir, keep=2, log=print):
        self.out_dir, self.keep, self.log = out_dir, keep, log

    def paths(self):
        legacy = os.path.join(self.out_dir, "ckpt.pt")
        return ([legacy] if os.path.isfile(legacy) else []) + checkpoint_paths(self.out_dir)

    def save(self, step, state):
        """Write step `step`'s checkpoint (call on rank 0 only), then prune older ones. Returns its path."""
        bad = [n for n, v in state.get("model", {}).items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # never saved: the previous checkpoint stays the newest good one
            raise FloatingPointError(f"step {step}: non-finite weights in {', '.join(bad[:3])}"
                                     f"{', ...' if len(bad) > 3 else ''}; not saved (newest checkpoint: "
                                     f"{(self.paths() or ['none'])[-1]})")
        path = os.path.join(self.out_dir, "checkpoints", f"step_{step:08d}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint({**state, "step": step, "code_version": code_version()}, path)
        for old in self.paths()[:-self.keep] if self.keep > 0 else []:
            remove_checkpoint(old)
        return path

    def newest(self):
        """(path, state) of the newest loadable checkpoint, or (None, None) if there is none."""
        paths = self.paths()
        return load_newest_checkpoint(paths, self.log) if paths else (None, None)


def check_resume(path, ck, cfg, free_keys, data_id=None, world_size=None, model=None, defaults=None):
    """The resume rules, the same for both stages: every config key outside `free_keys` (keys that do not
    change what is computed) must equal the checkpoint's, and the data it was trained on must be this
    run's (`data_id`, compared by content, not path); another `world_size` only when `model` draws no random
    numbers in training. A key the checkpoint's code did not have yet is accepted at its default in
    `defaults` (a new key's default keeps the old behaviour). ValueError naming the checkpoint and each difference."""
    old_key = lambda k: k not in ck["config"] and defaults is not None and cfg[k] == defaults.get(k)  # noqa: E731
    differ = {k: (ck["config"].get(k), jsonable(cfg[k])) for k in cfg
              if k not in free_keys and not old_key(k) and jsonable(cfg[k]) != ck["config"].get(k)}
    if differ:
        raise ValueError(f"{path}: cannot resume, training settings differ: "
                         + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in differ.items())
                         + ". Use the checkpoint's settings or a new out_dir.")
    if data_id is not None:
        import data_index
        other = data_index.identity_mismatch(ck.get("data"), data_id)
        if other:
            raise data.DataError(f"{path}: checkpoint was trained on other data: " + "; ".join(other))
    # another world size: the step is the data position (each global batch is a function of the step, split
    # over whatever ranks there are), so the run continues exactly -- unless training draws random numbers
    # (dropout, drop-path), whose streams are per rank: then it would not replay, and it is refused
    rng = [n for n, m in (model.named_modules() if model is not None else ()) if _draws_random(m)]
    if world_size is not None and ck.get("world_size", world_size) != world_size and rng:
        raise ValueError(f"{path}: cannot resume on {world_size} ranks a run of {ck['world_size']}: its dropout/"
                         f"drop-path ({rng[0]}, ...) draws per-rank random numbers, so another world size would not "
                         f"replay it; resume on {ck['world_size']} ranks (nnodes x nproc_per_node) or use a new out_dir")


def _draws_random(m):
    p = m.p if isinstance(m, torch.nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
    p = getattr(m, "attention_dropout", None) if p is None else p  # HF attention modules
    return isinstance(p, float) and p > 0


def elastic_restart(cfg):
    """torchrun --max_restarts=N restarts a failed worker group with TORCHELASTIC_RESTART_COUNT > 0: its
    workers continue the run they replace (resume=True: the newest checkpoint; never overwrite, which would
    delete it). -> the restart count (0: a first start or no torchelastic); open_run logs it."""
    n = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if n > 0:
        cfg.update(resume=True, overwrite=False)
    return n



# -----------------------------------------------------------------------------
# Checkpoints with a checksum, and one run per out_dir

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: truncated, corrupt, or not matching its checksum."""


def file_sha256(path, block=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(obj, path):
    """atomic_torch_save plus a sha256 sidecar `{path}.sha256` (written before the rename, so a .pt file
    never exists without its checksum) that load_checkpoint checks: a bit flip is caught, not trained on."""
    def write(tmp):
        _torch_save(obj, tmp)
        atomic_write_text(path + ".sha256", file_sha256(tmp) + "\n")
    data.atomic_write(path, write)


def load_checkpoint(path):
    """torch.load(weights_only=True) after checking the sha256 sidecar. CheckpointError names the path and
    what is wrong (checksum mismatch, truncated/unreadable). A file without a sidecar (older runs) loads."""
    side = path + ".sha256"
    if os.path.isfile(side):
        with open(side) as f:
            want = f.read().strip()
        have = file_sha256(path)
        if have != want:
            raise CheckpointError(f"{path}: checksum mismatch (sha256 {have[:16]}..., {side} says {want[:16]}...): "
                                  "the file is corrupt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, missing file
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def load_newest_checkpoint(paths, log=print):
    """(path, state) of the newest loadable checkpoint among `paths` (oldest first): a corrupt or truncated
    newest one is skipped with a log line naming it, and the previous one is used."""
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            log(f"warning: {e}; falling back to the previous checkpoint")
    raise CheckpointError(f"none of the {len(paths)} checkpoints can be loaded: {', '.join(paths)}")


def remove_checkpoint(path):
    """Delete a checkpoint and its checksum; a file already gone is fine (pruning must not crash a run)."""
    for p in (path, path + ".sha256"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


def checkpoint_paths(out_dir):
    """Checkpoints in out_dir, oldest first (zero-padded step numbers sort)."""
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*.pt")))


_LOCKS = {}  # lock file -> fd held by this process


def lock_out_dir(out_dir, key="out_dir", resume=None, overwrite=False):
    """Make out_dir (ValueError naming `key` if it cannot be written) and take an exclusive lock on
    out_dir/.lock for this run: a second run in the same out_dir is refused with the holder's pid, since
    two runs would interleave logs and overwrite each other's checkpoints. The lock is a POSIX record lock
    (fcntl.lockf): the OS drops it when the holder dies, and, unlike flock, forked children (DataLoader
    workers) do not inherit it, so a killed run's orphaned worker never blocks the resume.
    resume (None: no rule) and overwrite: a fresh run (resume=False) refuses an out_dir that holds another
    run's files, unless overwrite=True, which deletes them first. Then stale temp files are removed.
    Returns the removed temp files."""
    import errno
    import fcntl
    path = os.path.abspath(os.path.join(out_dir, ".lock"))
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"{key}={out_dir!r}: cannot write there ({e.strerror or e})") from None
    old = _LOCKS.pop(path, None)
    if old is not None:  # an earlier main() in this process that raised: its run is over
        os.close(old)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        raise ValueError(f"{key}={out_dir!r} is in use by another run ({holder}; lock {path}); wait for it to end "
                         "or choose another out_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _LOCKS[path] = fd
    removed = remove_stale_temp_files(out_dir)
    if resume is False:
        _fresh_out_dir(out_dir, key, overwrite)
    return removed


def _fresh_out_dir(out_dir, key, overwrite):
    """A fresh run never mixes with (or silently deletes) an older run's files."""
    import shutil
    def holds_files(p):  # an empty folder (what a killed run's removed temp file left) holds no results
        return not os.path.isdir(p) or any(names for _, _, names in os.walk(p))
    others = sorted(n for n in os.listdir(out_dir) if n != ".lock" and holds_files(os.path.join(out_dir, n)))
    if not others:
        return
    if not overwrite:
        raise ValueError(f"{key}={out_dir!r} holds another run's files ({len(others)}: {', '.join(others[:4])}"
                         f"{', ...' if len(others) > 4 else ''}); expected an empty or new folder: pass --resume "
                         "to continue that run, --overwrite to replace it, or choose another out_dir")
    for n in others:
        p = os.path.join(out_dir, n)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def open_run(out_dir, name, master, resume, overwrite):
    """A training stage's start on its out_dir: the lock and the fresh-run rule (lock_out_dir, rank 0),
    then the Logger to <name>.log, which names the temp files a killed run left (now removed)."""
    stale = lock_out_dir(out_dir, resume=resume, overwrite=overwrite) if master else []
    log = Logger(out_dir, name, master)
    if stale:
        log(f"removed {len(stale)} temp file(s) of a killed run: {', '.join(stale)}")
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
        log(f"torchelastic restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming from the newest checkpoint")
    return log


def unlock_out_dir(out_dir):
    fd = _LOCKS.pop(os.path.abspath(os.path.join(out_dir, ".lock")), None)
    if fd is not None:
        os.close(fd)


def describe_truncation(t, max_length):
    """One log line for model.TextEncoder.truncation counts (summed over ranks if need be)."""
    if not t["truncated"]:
        return f"truncation: none of {t['texts']} texts exceeded max_length={max_length}"
    return (f"truncation: {t['truncated']} of {t['texts']} texts ({100 * t['truncated'] / max(1, t['texts']):.1f}%) "
            f"were cut to max_length={max_length}: {t['tokens_cut']} tokens dropped, at most {t['max_cut']} from one text")


# Declared config: each script declares its keys' ranges (RULES) and relations (RELATIONS) beside its
# defaults, and which keys are paths of what kind (PATHS); check_config runs them all before any data or
# model is read. A key's type is its default's (configure checks it).

def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


positive = (lambda v: _finite(v) and v > 0, "a finite number > 0")
non_negative = (lambda v: _finite(v) and v >= 0, "a finite number >= 0")
finite = (_finite, "a finite number")
probability = (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]")
positive_int = (lambda v: v > 0, "a positive integer")  # a key whose default is an int: configure checks the type
non_negative_int = (lambda v: v >= 0, "an integer >= 0")
chat_template = (lambda v: v in ("", "none", "auto", *__import__("model").CHAT_TEMPLATES),
                 "'' (the encoder's own), 'none', 'auto' (the model family's) or one of "
                 + ", ".join(__import__("model").CHAT_TEMPLATES))


def one_of(*values):
    return (lambda v: v in values, "one of " + ", ".join(repr(x) for x in values))


def in_range(lo, hi, what=None):
    return (lambda v: _finite(v) and lo <= v <= hi, what or f"a number in [{lo}, {hi}]")


def _path_looking(v):
    """A value the user meant as a filesystem path (not a hub name like org/model): absolute, relative
    with ./ ../ ~, or with more than one '/'."""
    return v.startswith(("/", "./", "../", "~", ".")) or v.count("/") > 1 or os.sep != "/" and os.sep in v


def _check_path(key, value, kind):
    """One path key against its declared kind -> the problem, or None. Kinds: file, dir, files (comma-
    separated files), model (a folder, or a hub name; a path-looking value must exist), out (a folder this
    run writes: it or its nearest existing parent must be a writable folder)."""
    if not value or not isinstance(value, str):
        return None
    if kind == "files":
        return next((p for p in (_check_path(key, x.strip(), "file") for x in value.split(",") if x.strip()) if p), None)
    path = os.path.expanduser(value)
    if kind == "file" and not os.path.isfile(path):
        return f"{key}={value!r}: " + ("is a folder" if os.path.isdir(path) else "no such file") + "; expected a file"
    if kind == "dir" and not os.path.isdir(path):
        return f"{key}={value!r}: " + ("is a file" if os.path.exists(path) else "no such folder") + "; expected a folder"
    if kind == "model" and value.startswith("open_clip:"):  # open_clip:NAME/PRETRAINED, PRETRAINED a tag or a file
        pretrained = value[len("open_clip:"):].partition("/")[2]
        if pretrained and _path_looking(pretrained) and not os.path.isfile(os.path.expanduser(pretrained)):
            return f"{key}={value!r}: no such file {pretrained!r}; expected an open_clip tag or checkpoint file"
        return None
    if kind == "model" and not os.path.exists(path) and _path_looking(value):
        return f"{key}={value!r}: no such folder; expected a model folder (or a hub name such as org/model)"
    if kind == "out":
        if os.path.exists(path) and not os.path.isdir(path):
            return f"{key}={value!r}: is a file; expected a folder to write into"
        parent = os.path.abspath(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        try:  # a probe file, gone at once: os.access says yes for root on read-only mounts such as /proc
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as e:
            return f"{key}={value!r}: cannot write there ({parent}: {e.strerror or e}); expected a folder this run can write"
    return None


def check_config(cfg, rules=None, relations=(), paths=None):
    """Every declared rule before any data or model is read: rules: key -> (predicate, what is allowed);
    relations: (predicate(cfg), message or message(cfg)) for rules between keys; paths: key -> kind (see _check_path).
    ValueError naming every key that fails and what was expected."""
    def ok(pred, v):
        try:
            return bool(pred(v))
        except (TypeError, ValueError, KeyError):
            return False
    bad = [f"{k}={cfg[k]!r}: expected {what}" for k, (pred, what) in (rules or {}).items() if not ok(pred, cfg[k])]
    bad += [msg(cfg) if callable(msg) else msg for pred, msg in relations if not bad and not ok(pred, cfg)]
    bad += [p for p in (_check_path(k, cfg[k], kind) for k, kind in (paths or {}).items()) if p]
    if bad:
        raise ValueError("; ".join(bad))


def adamw(params, fused=None, **kwargs):
    """torch.optim.AdamW, fused where torch has the kernel for the params' device (CUDA; CPU since torch
    2.4): one kernel over all tensors instead of about ten ops per tensor. Same update up to float
    rounding (tests/test_common.py: 1e-6); at bench.py's tiny sizes it cut the stage-2 optimizer step
    from ~23 to ~2.5 ms on one CPU thread. fused=None: fused if possible, else torch's default.

    A checkpoint's param_groups carry `fused`, and optimizer.load_state_dict takes them: a resumed run
    keeps the implementation it started with, so its updates continue bitwise."""
    params = list(params)
    if fused is None:
        try:  # torch refuses fused=True for a device without the kernel (or non-float params)
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except RuntimeError:
            fused = False
    return torch.optim.AdamW(params, fused=fused, **kwargs)


class Logger:
    """Print on rank 0 and append the same line to out_dir/<name>.log."""

    def __init__(self, out_dir, name, master_process=True):
        self.master = master_process
        self.path = os.path.join(out_dir, f"{name}.log") if out_dir else None
        if self.master and self.path:
            os.makedirs(out_dir, exist_ok=True)

    def __call__(self, *msg):
        if not self.master:
            return
        line = " ".join(str(m) for m in msg)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


# -----------------------------------------------------------------------------
# FLOPs estimates (forward, per item): 2 per matmul weight per token + attention's two T x T products.
# Training costs ~3x forward. Used for MFU in post_train.py and for the ratios in bench.py.

def matmul_params(module):
    """Weights that multiply every token (Linear and Conv2d), i.e. what costs 2 FLOPs per token."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def vit_flops(vit):
    """Forward FLOPs per image of a timm VisionTransformer (the head runs on one pooled token)."""
    T = vit.patch_embed.num_patches + vit.num_prefix_tokens
    per_token = matmul_params(vit.blocks) + matmul_params(vit.patch_embed)
    return 2 * per_token * T + 4 * len(vit.blocks) * T * T * vit.embed_dim + 2 * matmul_params(vit.head)


def llm_flops(llm, T, params=None):
    """Forward FLOPs per text of T tokens of a HF decoder without LM head (params: precomputed matmul_params)."""
    c = llm.config
    return 2 * (params or matmul_params(llm)) * T + 4 * c.num_hidden_layers * T * T * c.hidden_size


