"""Experiment tracking and multi-node runs (CPU, gloo): W&B (offline) and TensorBoard hold exactly the numbers of
metrics.jsonl, also across a torchelastic-style restart (same W&B run, no step twice); cc_finetune.py's
metrics.jsonl holds its log lines' numbers; two torchrun "nodes" (--nnodes=2, c10d rendezvous on localhost)
resuming a one-process checkpoint give the one-process weights; a resume on another world size is refused
when training draws per-rank random numbers (dropout, drop-path)."""
import glob
import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from conftest import free_port, stage2_world  # noqa: E402
import post_train  # noqa: E402
import tracking  # noqa: E402

torch.set_num_threads(1)
PRESET = os.path.join(ROOT, "config", "post_tiny_cpu.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return stage2_world(tmp_path_factory.mktemp("track"), 64, 16)


def args(w, out, *extra):
    return [PRESET, f"--train_manifest={w.train}", f"--cache_dir={w.cache}", "--val_manifest=", f"--out_dir={out}",
            "--num_workers=0", "--batch_size=16", "--log_interval=1", "--warmup_steps=2", "--save_interval=2", *extra]


def by_step(rows):
    """step -> every numeric field of that step's metrics.jsonl records, flattened as the trackers get them."""
    out = {}
    for r in rows:
        out.setdefault(r["step"], {}).update(tracking.flat_numbers(r))
    return out


def wandb_history(path):
    """The history rows of a W&B transaction log (run-<id>.wandb): LevelDB-log blocks of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        buf = f.read()
    assert buf[:7] == b":W&B\xe1\xbe\x00", path  # ident, magic 0xBEE1, version 0
    pos, block, part, run_id, rows = 7, 32768, b"", None, []
    while pos + 7 <= len(buf):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])  # crc, length, FULL=1 FIRST=2 MIDDLE=3 LAST=4
        part, pos = part + buf[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            part = b""
            if rec.WhichOneof("record_type") == "run":
                run_id = rec.run.run_id
            elif rec.WhichOneof("record_type") == "history":
                item = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                rows.append({k: v for k, v in item.items() if not k.startswith("_")} | {"_step": item["_step"]})
    return run_id, rows


def test_wandb_and_tensorboard_hold_metrics_jsonl_across_an_elastic_restart(w, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "run"
    track = ("--wandb_log=True", "--tensorboard_log=True", f"--val_manifest={w.val}", f"--val_cache_dir={w.val_cache}",
             "--eval_interval=2", "--eval_field=long_captions")
    post_train.main(args(w, out, *track, "--max_steps=4"))
    # a torchelastic restart: no --resume (and an --overwrite that must not delete the run), more steps
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    post_train.main(args(w, out, *track, "--max_steps=6", "--overwrite=True"))
    assert "torchelastic restart 1: resuming" in (out / "post_train.log").read_text()
    rows = tracking.read_metrics(str(out / "metrics.jsonl"))
    want = by_step(rows)
    assert sorted(want) == list(range(7)) and "eval/i2t_R@1" in want[6] and "loss" in want[5]

    # W&B: one run id (kept in out_dir) in both offline runs, each step once, the numbers of metrics.jsonl
    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert len(files) == 2
    history = [wandb_history(f) for f in files]
    assert {rid for rid, _ in history} == {run_id}
    steps = [r["_step"] for _, h in history for r in h]
    assert steps == list(range(7))
    for _, h in history:
        for r in h:
            got = {k: v for k, v in r.items() if k != "_step"}
            assert got.keys() == want[r["_step"]].keys()
            assert got == pytest.approx(want[r["_step"]], rel=1e-12), r["_step"]

    # TensorBoard: every field a tag, one event per step, float32 of the same number
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    tags = {k for v in want.values() for k in v}
    assert set(ea.Tags()["scalars"]) == tags
    for tag in tags:
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [s for s in sorted(want) if tag in want[s]], tag
        assert [e.value for e in events] == pytest.approx([want[e.step][tag] for e in events], rel=1e-6, abs=1e-12)

    # embed_captions.py: its throughput, one record
    (emb,) = tracking.read_metrics(os.path.join(w.cache, "metrics.jsonl"))
    assert emb["step"] == 320 and emb["texts_per_s"] > 0 and emb["truncated"] == 0


def test_metrics_log_drops_the_rows_a_resume_replays(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg, quiet = {"tensorboard_log": True}, lambda *a: None
    m = tracking.MetricsLog(str(tmp_path), cfg, start_step=0, log=quiet)
    for s in range(1, 6):  # a run killed after writing step 5, its newest checkpoint at step 3
        m.write({"step": s, "loss": float(s)})
    m.close()
    m = tracking.MetricsLog(str(tmp_path), cfg, start_step=3, log=quiet)
    for s in (4, 5, 6):
        m.write({"step": s, "loss": 10.0 * s, "eval": {"i2t_R@1": 1.5}})
    m.close()
    rows = tracking.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50), (6, 60)]
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50), (6, 60)]
    assert [e.step for e in ea.Scalars("eval/i2t_R@1")] == [4, 5, 6]


LOG_LINE = re.compile(r"step (\d+)/\d+: loss ([\d.]+), lr ([\d.e+-]+), (\d+) ms/step, (\d+) texts/s")


def test_cc_finetune_metrics_match_its_log_and_another_world_size_is_refused_with_dropout(w, tmp_path):
    import cc_finetune
    data = os.path.dirname(w.train)
    out = tmp_path / "cc"
    cc_args = [os.path.join(ROOT, "config", "cc_tiny_cpu.py"), f"--text_model={w.llm}", f"--out_dir={out}",
               f"--train_captions={data}/train_captions.jsonl", f"--val_captions={data}/val_captions.jsonl",
               "--batch_size=8", "--micro_batch_size=8", "--max_steps=2", "--log_interval=1", "--save_interval=2",
               "--max_length=64", "--lora_dropout=0.1"]
    cc_finetune.main(cc_args)
    rows = by_step(tracking.read_metrics(str(out / "metrics.jsonl")))
    log = (out / "cc_finetune.log").read_text()
    lines = [m.groups() for m in LOG_LINE.finditer(log)]
    assert [int(s) for s, *_ in lines] == [1, 2]
    for s, loss, lr, ms, tps in lines:
        r = rows[int(s)]
        assert f"{r['loss']:.4f}" == loss and f"{r['lr']:.2e}" == lr
        assert f"{r['ms_per_step']:.0f}" == ms and f"{r['texts_per_s']:.0f}" == tps
    before, after = re.search(r"c2c before -> after: top1 ([\d.]+) -> ([\d.]+)", log).groups()
    assert f"{rows[0]['c2c/c2c_top1']:.2f}" == before and f"{rows[2]['c2c/c2c_top1']:.2f}" == after

    # the same checkpoint as if written by 2 ranks: LoRA dropout draws per-rank numbers, so 1 rank is refused
    path = common.checkpoint_paths(str(out))[-1]
    common.save_checkpoint({**common.load_checkpoint(path), "world_size": 2}, path)
    with pytest.raises(ValueError, match=r"cannot resume on 1 ranks a run of 2: its dropout/drop-path \(.*lora_dropout"):
        cc_finetune.main(cc_args + ["--resume=True"])


def test_stage2_with_drop_path_refuses_another_world_size(w, tmp_path):
    out = tmp_path / "dp"
    kw = ("--timm_kwargs={'img_size': 32, 'patch_size': 8, 'embed_dim': 64, 'depth': 2, 'num_heads': 2, "
          "'drop_path_rate': 0.1}")
    post_train.main(args(w, out, kw, "--max_steps=2"))
    path = common.checkpoint_paths(str(out))[-1]
    common.save_checkpoint({**common.load_checkpoint(path), "world_size": 2}, path)
    with pytest.raises(ValueError, match=r"cannot resume on 1 ranks a run of 2: .*drop_path.*resume on 2 ranks"):
        post_train.main(args(w, out, kw, "--max_steps=3", "--resume=True"))


def test_two_nodes_resume_a_one_process_run_to_its_weights(w, tmp_path):
    """Stage 2 on another world size continues exactly: 1 process for 2 steps, then two torchrun "nodes" of one
    process each (c10d rendezvous, --node_rank 0/1) resume it to step 4 = one process for 4 steps."""
    out = tmp_path / "two"
    post_train.main(args(w, out, "--max_steps=2"))
    port, torchrun = free_port(), os.path.join(os.path.dirname(sys.executable), "torchrun")
    procs = [subprocess.Popen([torchrun, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={k}", "--rdzv_backend=c10d",
                               f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test{port}",
                               os.path.join(ROOT, "post_train.py"), *args(w, out, "--max_steps=4", "--resume=True")],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    post_train.main(args(w, tmp_path / "one", "--max_steps=4"))  # the reference, while the nodes start
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    one, two = (torch.load(common.checkpoint_paths(str(d))[-1], weights_only=True) for d in (tmp_path / "one", out))
    assert one["step"] == two["step"] == 4 and two["world_size"] == 2
    d = max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"])
    print("2 nodes x 1 process (resumed at step 2) vs 1 process, max |dw| at step 4:", d)
    assert d <= 1e-5
    loss = lambda p: {r["step"]: r["loss"] for r in tracking.read_metrics(str(p / "metrics.jsonl")) if "loss" in r}  # noqa: E731
    assert loss(out) == pytest.approx(loss(tmp_path / "one"), abs=1e-5)
    assert "checkpoint from 1 ranks, now 2" in (out / "post_train.log").read_text()
