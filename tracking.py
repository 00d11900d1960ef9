"""The run's metrics: out_dir/metrics.jsonl (the record, always written) and, when asked, the same numbers in
Weights & Biases and TensorBoard. One implementation for every stage (cc_finetune.py, embed_captions.py,
post_train.py) and its reader for report.py.

Each such script declares the config keys `wandb_log`, `wandb_project`, `wandb_run_name`, `tensorboard_log`
(nanoGPT's names; off by default), adds KEYS to its RESUME_FREE_KEYS and RELATIONS to its RELATIONS, and
writes its records through MetricsLog on rank 0. wandb and tensorboard are imported only when switched on
(requirements-extra.txt); WANDB_MODE=offline works without a network, WANDB_DIR moves W&B's files (default:
<out_dir>/wandb).
"""
import importlib.util
import json
import os
import secrets

import common

KEYS = ("wandb_log", "wandb_project", "wandb_run_name", "tensorboard_log")  # they change nothing computed
RELATIONS = [  # checked with the script's own (common.check_config): a missing package fails at the start
    (lambda c: not c["wandb_log"] or c["wandb_project"], "wandb_project: expected a W&B project with wandb_log=True"),
    *[(lambda c, k=k, m=m: not c[k] or importlib.util.find_spec(m) is not None,
       f"{k}=True: the {m} package is not installed (pip install {m}; see requirements-extra.txt)")
      for k, m in (("wandb_log", "wandb"), ("tensorboard_log", "tensorboard"))]]
RUN_FILE = "wandb_run.json"  # the out_dir's W&B run id: a resumed run continues that run


def flat_numbers(rec, prefix=""):
    """A record's numeric fields, nested dicts flattened with '/' (eval/i2t_R@1); `step` and non-numbers left out.
    Every such field is tracked, whichever stage or option added it (no list of names to keep up to date)."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and f"{prefix}{k}" != "step":
            out[f"{prefix}{k}"] = v
    return out


def read_metrics(path):
    """metrics.jsonl -> its records, oldest first (a line cut short by a killed run is skipped)."""
    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]


class MetricsLog:
    """out_dir/metrics.jsonl, one JSON object per line (`step` and that step's numbers): the run's record.
    With cfg's wandb_log / tensorboard_log, rank 0 also sends every numeric field, flattened, at the record's
    step to W&B / TensorBoard (<out_dir>/tensorboard).

    start_step: where a training run starts, 0 (from scratch) or its checkpoint's step. The rows an
    interrupted run wrote after it are dropped (the resumed run writes them again, the same numbers: the
    step is the data position) and TensorBoard purges them; from a checkpoint the W&B run whose id is in
    out_dir/wandb_run.json continues (resume="allow") and is sent only the steps it lacks (a W&B run's steps
    only increase; online, W&B itself would drop the others). None (embed_captions.py): append only."""

    def __init__(self, out_dir, cfg, master=True, start_step=None, log=print):
        self.path, self.master, self.tb, self.wandb = os.path.join(out_dir, "metrics.jsonl"), master, None, None
        self.sent = -1  # the W&B run already holds the steps up to this one
        old = read_metrics(self.path) if master else []
        kept = old if start_step is None else [r for r in old if 0 < start_step and r["step"] <= start_step]
        if len(kept) < len(old):  # from scratch (0) every row is written again, from a checkpoint those after it
            common.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            log(f"metrics.jsonl: dropped {len(old) - len(kept)} rows after step {start_step}: this run writes them again")
        if master and cfg.get("tensorboard_log"):
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                    purge_step=None if start_step is None else start_step + 1 if start_step else 0)
        if master and cfg.get("wandb_log"):
            self._start_wandb(out_dir, cfg, start_step, old, log)

    def _start_wandb(self, out_dir, cfg, start_step, old, log):
        import wandb
        id_file, state = os.path.join(out_dir, RUN_FILE), None
        if start_step != 0 and os.path.isfile(id_file):
            try:
                with open(id_file, encoding="utf-8") as f:
                    state = json.load(f)
                run_id = state["id"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{id_file}: cannot read the W&B run id ({e}); delete it to start a new W&B run") from None
            self.sent = max((r["step"] for r in old), default=-1)
        else:
            run_id = "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(8))  # W&B's style
        self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or None, id=run_id,
                                resume="allow", config=common.jsonable(cfg), dir=os.environ.get("WANDB_DIR") or out_dir,
                                settings=wandb.Settings(console="off"))  # the script's own .log holds the console
        common.atomic_write_text(id_file, json.dumps({"format_version": 1, "id": run_id}) + "\n")
        log(f"wandb: {'continuing' if state else 'new'} run {run_id} in project {cfg['wandb_project']}"
            + (f" (it holds steps <= {self.sent})" if state and self.sent >= 0 else ""))

    def write(self, rec):
        """Append one record {"step": int, ...} (rank 0; a no-op elsewhere) and send its numbers on."""
        if not self.master:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        numbers = flat_numbers(rec)
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, rec["step"])
            self.tb.flush()  # a killed run keeps every step it logged
        if self.wandb is not None and rec["step"] > self.sent:
            self.wandb.log(numbers, step=rec["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tb = self.wandb = None
