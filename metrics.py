"""The scores every script reports, in one place: evaluate.py and downstream.py print them as tables,
post_train.py (retrieval on its val set) and cc_finetune.py (its caption-to-caption quality gate) log
them while training. One rank rule for all of them, so a number means the same thing everywhere.

Retrieval follows LAION CLIP_benchmark: image->text is a hit at k if ANY of the image's captions is in
its top k; text->image is scored per caption. Ties are broken by lowest index (see `rank_of_target`).
Imports torch and common only: no model, data or script, so any stage can use it.
"""
import datetime
import json
import os

import torch
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# ranks and recall


def rank_of_target(scores, target):
    """Rank (0 = best) of column target[r] in each row r of scores (R, N), deterministically:
    rank = #columns with a strictly higher score + #columns with an equal score and a lower index,
    i.e. ties go to the lowest index, like a stable sort by descending score."""
    s = scores.gather(1, target[:, None])
    cols = torch.arange(scores.shape[1], device=scores.device)
    return (scores > s).sum(1) + ((scores == s) & (cols[None, :] < target[:, None])).sum(1)


def percent(hits):
    """Share of True in a bool tensor, in percent (exact count, float64 division; 0 for an empty one)."""
    return 100.0 * hits.sum().item() / max(1, hits.numel())


def chunk_rows(n_cols):
    """Query rows per score chunk: ~64 MB of float32 scores, so 5K x 25K fits anywhere."""
    return max(1, 2 ** 24 // max(1, n_cols))


def ranks(queries, gallery, target):
    """rank_of_target for queries @ gallery.T, computed in row chunks."""
    out, step = [], chunk_rows(gallery.shape[0])
    for lo in range(0, queries.shape[0], step):
        out.append(rank_of_target(queries[lo:lo + step] @ gallery.T, target[lo:lo + step]))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def check_finite(features, what):
    """Refuse non-finite embeddings instead of scoring them: a NaN row ranks anywhere and the recalls
    would be silently wrong."""
    bad = (~torch.isfinite(features)).any(dim=-1) if features.numel() else torch.zeros(0, dtype=torch.bool)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{len(rows)} of {features.shape[0]} {what} embeddings are not finite (rows "
                         f"{', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''}); expected finite "
                         "features: the model or its inputs are broken, refusing to score them")


def retrieval_metrics(image_features, text_features, text_to_image, ks=(1, 5, 10)):
    """Recall@k in percent, both directions: {"i2t_R@1": .., "i2t_R@5": .., ..., "t2i_R@10": ..}.

    Features should be L2-normalised (scores are dot products). text_to_image[t] is the image of
    caption t; any number of captions per image (5 for Flickr30k/COCO, 1 for 1:1 sets). Image->text
    is a hit at k if ANY of the image's captions ranks < k: that is the rank of its best caption
    (highest score, lowest index among equal scores). Text->image is scored per caption. Ties follow
    `rank_of_target`. Similarities are computed in chunks, so 5K images x 25K captions stay small.
    """
    img, txt = image_features.float(), text_features.float()
    check_finite(img, "image")
    check_finite(txt, "text")
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
    i2t_rank, step = [], chunk_rows(n_txt)
    for lo in range(0, n_img, step):
        s = img[lo:lo + step] @ txt.T                                           # (c, T)
        pos = t2i[None, :] == torch.arange(lo, lo + s.shape[0], device=img.device)[:, None]
        best = s.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)        # best caption's score
        first = torch.where(pos & (s == best), cols, n_txt).amin(1)             # ... lowest index among ties
        i2t_rank.append(rank_of_target(s, first))
    i2t_rank, t2i_rank = torch.cat(i2t_rank), ranks(txt, img, t2i)
    out = {f"i2t_R@{k}": percent(i2t_rank < k) for k in ks}
    out.update({f"t2i_R@{k}": percent(t2i_rank < k) for k in ks})
    return out


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
    out = {"c2c_top1": percent(ranks(q1, d2, target) == 0),
           "c2c_top1_reverse": percent(ranks(q2, d1, target) == 0), "n": len(caps)}
    if counts:
        out["truncated"] = encoder.truncation["truncated"] - cut0  # texts cut to max_length
    return out


# -----------------------------------------------------------------------------
# config lists, result tables and results files

def split_specs(value, key):
    """A comma-separated config value (--model=A,B, --data=x,y) -> its non-empty items; none is an error."""
    items = [s.strip() for s in value.split(",") if s.strip()]
    if not items:
        raise ValueError(f"--{key} is empty; give one or more comma-separated values")
    return items


def markdown_table(results, datasets):
    """Rows: models; columns: I2T and T2I R@1 per dataset and their average (the paper's Table 2)."""
    head = ["model"] + [f"{d} {x}" for d in datasets for x in ("I2T", "T2I")] + ["avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per in results.items():
        vals = [per[d][f"{x}_R@1"] for d in datasets for x in ("i2t", "t2i")]
        cells = [name] + [f"{v:.1f}" for v in vals] + [f"{sum(vals) / len(vals):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_results_path(path):
    """Fail at start, not after every model is scored, if the results file `path` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out={path!r}: cannot create {folder} ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK) or os.path.isdir(path):
        raise ValueError(f"out={path!r}: not a writable file path")


def write_results(path, payload, cfg):
    """payload + the resolved config, code version and time -> the JSON results file (atomically)."""
    payload.update(config=cfg, code_version=common.code_version(),
                   time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    common.atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
