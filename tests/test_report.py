"""report.py: PNG plots and report.md from run folders' metrics.jsonl (written through tracking.MetricsLog, as the
stages write it) and evaluate.py results files; a folder without metrics.jsonl is a one-line error, exit 2."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import report  # noqa: E402
import tracking  # noqa: E402


def fake_run(d, kind, loss_scale=1.0):
    """A post_train-like (training rows + evals) or cc_finetune-like (training rows + c2c gate) metrics.jsonl."""
    d.mkdir()
    m = tracking.MetricsLog(str(d), {}, start_step=0, log=lambda *a: None)
    if kind == "cc":
        m.write({"step": 0, "c2c": {"c2c_top1": 5.0, "c2c_top1_reverse": 6.0, "n": 16}})
    for s in range(10, 101, 10):
        rec = {"step": s, "loss": loss_scale * 4 / (1 + s / 50), "lr": 1e-3 * (1 - s / 100)}
        rec.update({"texts_per_s": 900.0 + s, "ms_per_step": 30.0} if kind == "cc" else
                   {"logit_scale": 14 + s / 10, "samples_per_s": 500.0 + s, "data_wait": 0.1, "loss_scale": 1024.0})
        m.write(rec)
        if kind == "post" and s % 50 == 0:
            m.write({"step": s, "eval": {"i2t_R@1": s / 4, "t2i_R@1": s / 5, "chance_R@1": 2.0}})
    m.write({"step": 100, "c2c": {"c2c_top1": 25.0}} if kind == "cc" else {"step": 100, "bad_images": 0})
    m.close()
    return str(d)


def test_report_draws_the_curves_evals_and_baseline_bars(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    runs = [fake_run(tmp_path / "post_a", "post"), fake_run(tmp_path / "post_b", "post", 0.8),
            fake_run(tmp_path / "cc", "cc")]
    results = tmp_path / "post_a" / "results.json"  # found inside the run folder
    results.write_text(json.dumps({"task": "retrieval", "results": {
        "openai/clip-vit-base-patch16": {"coco": {"i2t_R@1": 52.4, "t2i_R@1": 33.1}, "flickr30k": {"i2t_R@1": 82.0, "t2i_R@1": 62.1}},
        "out/post_a": {"coco": {"i2t_R@1": 60.1, "t2i_R@1": 45.0}, "flickr30k": {"i2t_R@1": 88.5, "t2i_R@1": 73.2}}}}))
    classify = tmp_path / "imagenet.json"  # given with --results
    classify.write_text(json.dumps({"task": "classify", "data": "data/imagenet/val", "results": {
        "openai/clip-vit-base-patch16": {"top1": 68.3, "top5": 91.0, "n": 50000}, "out/post_a": {"top1": 70.2, "top5": 92.1}}}))
    out = tmp_path / "rep"
    written = report.main([*runs, f"--results={classify}", f"--out={out}", "--width=6", "--height=4", "--dpi=50"])
    assert [os.path.basename(p) for p in written] == ["curves.png", "eval.png", "results.png", "report.md"]
    for name in ("curves.png", "eval.png", "results.png"):
        assert Image.open(out / name).size == (300, 200), name  # width x dpi, height x dpi
    md = (out / "report.md").read_text()
    assert "| post_b | 100 | 2.6667 -> 1.0667 |" in md  # first -> last loss of the ablation's second run
    assert "| cc | 100 |" in md and "| 25 |" in md  # its c2c gate after training
    assert "| out/post_a | 88.5 (+6.5) | 73.2 (+11.1) |" in md and "imagenet.json: val" in md and "| out/post_a | 70.2 (+1.9) | 92.1 (+1.1) |" in md


def test_report_without_metrics_is_a_one_line_error(tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        common.run_main(report.main, [str(empty), f"--out={tmp_path / 'rep'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"error: {empty}: no metrics.jsonl (expected an out_dir of cc_finetune.py, post_train.py or "
                        "embed_captions.py)") and "\n" not in err
    assert not (tmp_path / "rep").exists()  # refused before anything is written
