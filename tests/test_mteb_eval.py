"""evaluate.py --task=mteb: mteb scores our stage-2 export (an image-text task) and our stage-1 encoder (a text
task) through mteb_eval's encoders, equal to the same metric computed by hand from our own encoders."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mteb")
import evaluate  # noqa: E402
import mteb_local_tasks as local  # noqa: E402
import model as M  # noqa: E402
from data import eval_transform  # noqa: E402

torch.set_num_threads(1)
TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mteb_local_tasks.py")


def by_hand(q, d):
    """Query i's relevant document is document i: MRR@10 and recall@1 from the rank of document i."""
    sim = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
    rank = (sim > sim.diag()[:, None]).sum(1)
    return {"mrr_at_10": torch.where(rank < 10, 1.0 / (rank + 1), 0.0).mean().item(),
            "recall_at_1": (rank == 0).float().mean().item()}


def test_mteb_scores_the_stage2_export_and_the_stage1_encoder(tmp_path, tiny_llm2clip_run):
    out_dir, llm = tiny_llm2clip_run
    tasks = f"{TASKS}:NoiseT2I,{TASKS}:CaptionsT2T"
    res = evaluate.main(["--task=mteb", f"--model={out_dir}", f"--text_model={llm}", f"--tasks={tasks}",
                         f"--out={tmp_path / 'mteb.json'}"])["results"]
    assert set(res) == {out_dir, llm} and set(res[llm]) == {"LocalCaptionsT2T"}  # text only: no image task
    image_encoder, text_encoder = M.load_llm2clip(out_dir)
    tf = eval_transform(image_encoder.data_config)
    with torch.no_grad():
        img = image_encoder(torch.stack([tf(im.convert("RGB")) for im in local.images()]))
    queries, docs, stage1 = local.captions(1), local.captions(2), M.load_text_encoder(llm)
    want = {(out_dir, "LocalNoiseT2I"): by_hand(text_encoder.encode(queries), img),
            (out_dir, "LocalCaptionsT2T"): by_hand(text_encoder.encode(queries), text_encoder.encode(docs)),
            (llm, "LocalCaptionsT2T"): by_hand(stage1.encode(queries), stage1.encode(docs))}
    for (row, task), w in want.items():
        got = res[row][task]
        scores = got["scores"]["test"][0]
        assert got["main_score"] == pytest.approx(w["mrr_at_10"], abs=1e-5), (row, task, got["main_score"], w)
        assert scores["recall_at_1"] == pytest.approx(w["recall_at_1"], abs=1e-5), (row, task)
    assert 0 < want[(out_dir, "LocalNoiseT2I")]["mrr_at_10"] < 1
    saved = json.loads((tmp_path / "mteb.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert saved["tasks"] == ["LocalNoiseT2I", "LocalCaptionsT2T"] and f"| {llm} | - |" in saved["table"]


def test_mteb_task_needs_tasks_and_a_model():
    with pytest.raises(ValueError, match=r"--task=mteb needs --tasks="):
        evaluate.main(["--task=mteb", "--model=openai/clip-vit-base-patch16"])
    with pytest.raises(ValueError, match=r"--task=mteb needs --model=.*and/or --text_model="):
        evaluate.main(["--task=mteb", "--tasks=STSBenchmark"])
    import mteb_eval
    with pytest.raises(ValueError, match=r"tasks: 'NoSuchTask123' is not an mteb task"):
        mteb_eval.resolve_tasks("NoSuchTask123")
