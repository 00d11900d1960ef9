"""Small helpers every stage script shares: typed config overrides, distributed init, run records.

Kept apart from model.py so that model.py stays copy-pasteable (torch/transformers/peft/timm only).
"""
import ast
import datetime
import json
import os
import subprocess
import sys
import types

import torch
import torch.distributed as dist
# Imported before any init_process_group, on purpose: torch.distributed.nn.functional stores the default
# group in its functions' default arguments when first imported, and loading a transformers model imports
# it (via torchvision and torch._dynamo). Imported after init, it keeps the group alive past
# destroy_process_group; gloo's worker threads then free their last work during interpreter shutdown,
# which can abort a finished run ("terminate called without an active exception", exit code -6).
import torch.distributed.nn  # noqa: F401


# -----------------------------------------------------------------------------
# Configuration: nanoGPT's `python X.py config/foo.py --key=value`, parsed instead of exec'd.

# Keys renamed so that every stage script uses one name per concept (issue 15). An old name in a config
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
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


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
    return value


def configure(defaults, argv=None, doc=""):
    """Resolve a stage's config: `defaults` (name -> value), then config files, then `--key=value`.

    argv items ending in `.py` are config files of plain assignments (nanoGPT style). A bare `--flag`
    means `--flag=True` for a boolean key (an error for any other type). Unknown keys,
    in a file or on the command line, raise ValueError naming the key and listing the valid ones.
    `-h`/`--help` prints every key with its default and exits. Returns a new dict.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(doc.strip() + "\n" if doc else "", end="")
            print("keys (override with --key=value or a config/*.py file):")
            for k, v in defaults.items():
                print(f"  --{k}={v!r}")
            raise SystemExit(0)
        if not arg.startswith("--"):
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
    return config


# -----------------------------------------------------------------------------
# Text-encoder settings: the same keys in every script that loads the LLM caption encoder
# (embed_captions.py, evaluate.py, post_train.py with text_source=online), as model.load_text_encoder
# takes them. None / "" = the encoder's own (a stage-1 out_dir's encoder.json, else the defaults:
# bidirectional, mean pooling, no chat template).

def text_encoder_kwargs(cfg):
    """cfg's `bidirectional`, `pooling`, `chat_template` as load_text_encoder kwargs (validated)."""
    b = cfg["bidirectional"]
    if isinstance(b, str):
        b = {"true": True, "false": False, "": None, "none": None}.get(b.lower(), b)
    if b not in (None, True, False):
        raise ValueError(f"bidirectional={cfg['bidirectional']!r}: expected True, False or None (None = the "
                         "encoder's own: a stage-1 out_dir's encoder.json, else True for a decoder)")
    return {"bidirectional": b, "pooling": cfg["pooling"] or None, "chat_template": cfg["chat_template"] or None}


def describe_text_encoder(encoder, kwargs):
    """One log line: what the loaded encoder does and where each setting came from (set / encoder.json / default)."""
    s = encoder.settings
    own = "encoder.json" if "model_subdir" in s else "default"
    src = lambda k: "set" if kwargs.get(k) is not None else own  # noqa: E731
    return (f"text encoder {s.get('name_or_path')}: {'decoder' if encoder.is_decoder else 'encoder (BERT-like)'}, "
            f"bidirectional={s.get('bidirectional')} ({src('bidirectional')}), pooling={encoder.pooling} "
            f"({src('pooling')}), chat_template={encoder.chat_template or 'none'} ({src('chat_template')})")


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


def save_run_info(out_dir, config, script, extra=None):
    """Write out_dir/run_<script>.json: resolved config, code version, time, torch/transformers versions."""
    import transformers  # local: only the stage scripts need it
    os.makedirs(out_dir, exist_ok=True)
    info = {
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


def atomic_write_text(path, text):
    """Write text to path via a temp file + rename, so a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path):
    """torch.save via temp file + rename (a killed run never leaves a truncated checkpoint)."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
