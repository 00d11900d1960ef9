"""Plots and a summary table of training runs and their evaluations, PNG + markdown, from the files the
stages already write (nothing is recomputed):

    python report.py out/post_a out/post_b --out=report/               (an ablation: the runs overlaid)
    python report.py out-tiny/cc out-tiny/post --results=out-tiny/results.json --out=out-tiny/report

Each OUT_DIR is an out_dir of cc_finetune.py, post_train.py or embed_captions.py: its metrics.jsonl
(tracking.MetricsLog: one record per line, `step` and that step's numbers) is read; evaluate.py results
files are the `--results` list plus every results*.json inside the OUT_DIRs. Written into --out:

  curves.png    training curves: loss, learning rate, logit scale, throughput; one line per run
  eval.png      held-out recall over steps (post_train's eval/i2t_R@1, eval/t2i_R@1; cc_finetune's c2c top-1)
  results.png   per dataset, the first model of a results file (the baseline) against the others (R@1 or top-1)
  report.md     a table of the runs (last step, loss, throughput, last eval) and each results file's table

matplotlib (requirements-extra.txt) is imported only here, with the Agg backend (no display needed).
"""
import glob
import json
import math
import os
import sys

import common
import tracking

# -----------------------------------------------------------------------------
# config (override with --key=value); the run folders are the positional arguments
out = "report"  # folder the PNGs and report.md are written to
results = ""  # evaluate.py --out files (comma-separated), besides the results*.json inside the run folders
width, height = 12.0, 7.0  # figure size in inches: PNG pixels = inches x dpi
dpi = 100
config_keys = ["out", "results", "width", "height", "dpi"]
RULES = {"width": common.positive, "height": common.positive, "dpi": common.positive_int}
PATHS = {"out": "out", "results": "files"}
# the panels of curves.png: (title, the metrics.jsonl fields it shows; the first present in a run is drawn)
CURVES = [("loss", ("loss",)), ("learning rate", ("lr",)), ("logit scale", ("logit_scale",)),
          ("throughput (samples/s or texts/s)", ("samples_per_s", "texts_per_s"))]
EVALS = [("image -> text R@1", "eval/i2t_R@1"), ("text -> image R@1", "eval/t2i_R@1"), ("c2c top-1", "c2c/c2c_top1")]
# -----------------------------------------------------------------------------


def read_runs(dirs):
    """label -> [(step, flat numbers)] per run folder, in order; ValueError naming a folder without metrics.jsonl."""
    runs = {}
    for d in dirs:
        path = os.path.join(d, "metrics.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"{d}: no metrics.jsonl (expected an out_dir of cc_finetune.py, post_train.py or "
                             "embed_captions.py)")
        label = os.path.basename(os.path.normpath(d)) or d
        label = label if label not in runs else os.path.normpath(d)  # two runs named alike: their paths
        runs[label] = [(r["step"], tracking.flat_numbers(r)) for r in tracking.read_metrics(path)]
    return runs


def series(rows, key):
    """(steps, values) of `key` over a run's records."""
    pts = [(s, v[key]) for s, v in rows if key in v and math.isfinite(v[key])]
    return [s for s, _ in pts], [v for _, v in pts]


def read_results(paths):
    """results file -> {dataset: {model: {metric: value}}} for retrieval (i2t/t2i R@1) and classify/linear_probe
    (top-1/top-5) results; other tasks are left out. ValueError naming a file that is not a results file."""
    out = {}
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                res = json.load(f)
            task, per_model = res["task"], res["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{p}: not an evaluate.py results file ({type(e).__name__}: {e})") from None
        if task == "retrieval":
            table = {}
            for model, per_data in per_model.items():
                for ds, m in per_data.items():
                    table.setdefault(ds, {})[model] = {k: m[k] for k in ("i2t_R@1", "t2i_R@1") if k in m}
        elif task in ("classify", "linear_probe"):
            ds = os.path.basename(os.path.normpath(str(res.get("data", task))))
            table = {ds: {model: {k: m[k] for k in ("top1", "top5") if k in m} for model, m in per_model.items()}}
        else:
            continue
        out[p] = table
    return out


def plot_lines(plt, path, panels, runs, cfg):
    """One subplot per (title, keys) panel, one line per run (the first of `keys` the run has)."""
    cols = 2
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(cfg["width"], cfg["height"]), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for i, (label, rows) in enumerate(runs.items()):
            key = next((k for k in keys if series(rows, k)[0]), None)
            if key is not None:  # a run keeps its colour in every panel
                ax.plot(*series(rows, key), marker="." if len(series(rows, key)[0]) < 30 else None, label=label,
                        color=f"C{i % 10}")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize="small")
            if title == "learning rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=cfg["dpi"])  # no bbox_inches="tight": the PNG is exactly width x height x dpi
    plt.close(fig)


def plot_results(plt, path, tables, cfg):
    """Per (results file, dataset) a subplot: grouped bars, one group per metric, one bar per model."""
    panels = [(f"{os.path.basename(p)}: {ds}", models) for p, t in tables.items() for ds, models in t.items()]
    cols = min(2, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(cfg["width"], cfg["height"]), squeeze=False)
    for ax, (title, models) in zip(axes.flat, panels):
        metrics = list(dict.fromkeys(k for m in models.values() for k in m))
        w = 0.8 / max(1, len(models))
        for i, (model, m) in enumerate(models.items()):
            xs = [j + (i - (len(models) - 1) / 2) * w for j in range(len(metrics))]
            bars = ax.bar(xs, [m.get(k, 0) for k in metrics], w, label=("baseline: " if i == 0 else "") + model)
            ax.bar_label(bars, fmt="%.1f", fontsize="small")
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_title(title)
        ax.set_ylabel("%")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=cfg["dpi"])
    plt.close(fig)


def summary(runs, tables):
    """report.md: one row per run (its last values), then each results file's R@1 / top-1 table."""
    def last(rows, *keys):
        for k in keys:
            _, vals = series(rows, k)
            if vals:
                return f"{vals[-1]:.4g}"
        return ""
    lines = ["# Report", "", "| run | last step | loss (first -> last) | lr | logit scale | throughput /s | "
             "eval i2t R@1 | eval t2i R@1 | c2c top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for label, rows in runs.items():
        losses = series(rows, "loss")[1]
        loss = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
        lines.append(f"| {label} | {max((s for s, _ in rows), default='')} | {loss} | {last(rows, 'lr')} | "
                     f"{last(rows, 'logit_scale')} | {last(rows, 'samples_per_s', 'texts_per_s')} | "
                     f"{last(rows, 'eval/i2t_R@1')} | {last(rows, 'eval/t2i_R@1')} | {last(rows, 'c2c/c2c_top1')} |")
    for p, table in tables.items():
        for ds, models in table.items():
            metrics = list(dict.fromkeys(k for m in models.values() for k in m))
            lines += ["", f"## {p}: {ds}", "", "| model | " + " | ".join(metrics) + " |",
                      "|---" * (len(metrics) + 1) + "|"]
            base = next(iter(models.values()))  # the first model: the baseline the others are measured against
            lines += [f"| {model} | " + " | ".join(f"{m[k]:.1f}" + (f" ({m[k] - base[k]:+.1f})" if i and k in base else "")
                                                  if k in m else "" for k in metrics) + " |"
                      for i, (model, m) in enumerate(models.items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    dirs = [a for a in argv if not a.startswith("-") and not a.endswith(".py")]  # the run folders
    cfg = common.configure({k: globals()[k] for k in config_keys}, [a for a in argv if a not in dirs], __doc__)
    relations = [(lambda c: dirs, "expected one or more run folders: python report.py OUT_DIR [OUT_DIR ...] --out=DIR")]
    common.check_config(cfg, RULES, relations, PATHS)
    runs = read_runs(dirs)
    files = [p.strip() for p in cfg["results"].split(",") if p.strip()]
    files += sorted(p for d in dirs for p in glob.glob(os.path.join(d, "results*.json")) if p not in files)
    tables = read_results(files)

    import matplotlib
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    os.makedirs(cfg["out"], exist_ok=True)
    written = [os.path.join(cfg["out"], "curves.png")]
    plot_lines(plt, written[0], CURVES, runs, cfg)
    evals = [(t, (k,)) for t, k in EVALS if any(series(rows, k)[0] for rows in runs.values())]  # panels with data
    if evals:
        written.append(os.path.join(cfg["out"], "eval.png"))
        plot_lines(plt, written[-1], evals, runs, cfg)
    if any(tables.values()):
        written.append(os.path.join(cfg["out"], "results.png"))
        plot_results(plt, written[-1], {p: t for p, t in tables.items() if t}, cfg)
    written.append(os.path.join(cfg["out"], "report.md"))
    common.atomic_write_text(written[-1], summary(runs, tables))
    print(f"report of {len(runs)} run(s), {len(tables)} results file(s): {', '.join(written)}")
    return written


if __name__ == "__main__":
    common.run_main(main)
