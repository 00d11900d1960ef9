"""common.py: typed config overrides with clear errors, run records."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, free_port

import common

DEFAULTS = {"lr": 1e-5, "steps": 10, "name": "x", "flag": False, "out": None, "ids": [1, 2]}


def test_typed_overrides_and_config_file(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("steps = 20\nname = 'from_file'\n_private = 3\n")
    cfg = common.configure(DEFAULTS, [str(cfg_file), "--lr=1", "--flag=true", "--out=/tmp/o", "--ids=[3]"])
    assert cfg == {"lr": 1.0, "steps": 20, "name": "from_file", "flag": True, "out": "/tmp/o", "ids": [3]}
    assert isinstance(cfg["lr"], float)
    assert common.configure(DEFAULTS, ["--steps=1e3"])["steps"] == 1000
    assert DEFAULTS["steps"] == 10  # defaults untouched


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'lrr'; valid keys: lr, steps"):
        common.configure(DEFAULTS, ["--lrr=1"])
    bad = tmp_path / "bad.py"
    bad.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match=r"bad.py: unknown config key 'stepz'"):
        common.configure(DEFAULTS, [str(bad)])
    with pytest.raises(ValueError, match="--steps=abc: expected an integer"):
        common.configure(DEFAULTS, ["--steps=abc"])
    with pytest.raises(ValueError, match="expected a boolean"):
        common.configure(DEFAULTS, ["--flag=maybe"])
    with pytest.raises(ValueError, match="config file 'nofile.py' not found"):
        common.configure(DEFAULTS, ["nofile.py"])


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit):
        common.configure(DEFAULTS, ["-h"], doc="Stage X.")
    out = capsys.readouterr().out
    assert "Stage X." in out and "--lr=1e-05" in out and "--out=None" in out


def test_save_run_info_records_config_and_version(tmp_path):
    path = common.save_run_info(str(tmp_path), {"lr": 0.1}, "post_train.py")
    info = json.loads(open(path).read())
    assert path.endswith("run_post_train.json")
    assert info["config"] == {"lr": 0.1} and info["script"] == "post_train.py"
    assert info["code_version"] != "" and "torch" in info
    assert common.read_run_info(str(tmp_path), "post_train.py") == info and info["format_version"] == 1
    old = {k: v for k, v in info.items() if k != "format_version"}  # written before the version existed
    open(path, "w").write(json.dumps(old))
    assert common.read_run_info(str(tmp_path), "post_train.py") == old
    open(path, "w").write(json.dumps({**info, "format_version": 2}))
    with pytest.raises(ValueError, match=r"run_post_train.json: format_version 2 is not one this code reads"):
        common.read_run_info(str(tmp_path), "post_train.py")
    with pytest.raises(ValueError, match=r"run_cc_finetune.json: cannot read the run record"):
        common.read_run_info(str(tmp_path), "cc_finetune.py")


def test_a_function_named_like_a_config_key_is_refused():
    with pytest.raises(TypeError, match=r"config keys \['resume'\] are functions"):
        common.configure({"resume": print}, [])


def test_config_file_values_are_type_checked(tmp_path):
    import pathlib
    f = tmp_path / "c.py"
    f.write_text("import pathlib\nname = pathlib.Path('/a/b')\nlr = 2\n")
    cfg = common.configure(DEFAULTS, [str(f)])
    assert cfg["name"] == "/a/b" and cfg["lr"] == 2.0 and isinstance(cfg["lr"], float)
    f.write_text("steps = '10'\n")
    with pytest.raises(ValueError, match=r"c.py: steps = '10': expected int like the default 10"):
        common.configure(DEFAULTS, [str(f)])
    del pathlib


def test_renamed_keys_name_the_new_key(tmp_path):
    """One name per concept; an old name (command line or config file) names its replacement."""
    defaults = {"learning_rate": 1e-4, "save_interval": 10, "model": "x"}
    with pytest.raises(ValueError, match=r"config key 'lr' was renamed to 'learning_rate'"):
        common.configure(defaults, ["--lr=1"])
    f = tmp_path / "old.py"
    f.write_text("ckpt_interval = 5\n")
    with pytest.raises(ValueError, match=r"old.py: config key 'ckpt_interval' was renamed to 'save_interval'"):
        common.configure(defaults, [str(f)])
    # a renamed key that is a valid key of this script (evaluate.py's --model) is accepted as usual
    assert common.configure(defaults, ["--model=y"])["model"] == "y"


def test_config_argument_must_be_a_py_file(tmp_path):
    """Any existing file given positionally used to be exec'd as Python."""
    other = tmp_path / "train.jsonl"
    marker = tmp_path / "ran"
    other.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(ValueError, match=r"argument '.*train.jsonl': expected a config file ending in .py or --key=value"):
        common.configure(DEFAULTS, [str(other)])
    assert not marker.exists()


def test_failed_write_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    import errno
    import os
    import torch

    def disk_full(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    path = tmp_path / "ckpt.pt"
    with pytest.raises(OSError, match=rf"cannot write {path}: No space left on device"):
        common.atomic_torch_save({"a": 1}, str(path))
    with pytest.raises(OSError, match=rf"cannot write {path}"):
        common.save_checkpoint({"a": 1}, str(path))
    assert os.listdir(tmp_path) == []


def test_checkpoint_checksum_and_fallback(tmp_path):
    import torch
    paths = [str(tmp_path / f"step_{i}.pt") for i in (1, 2)]
    for i, p in enumerate(paths):
        common.save_checkpoint({"step": i + 1, "w": torch.arange(1000.0)}, p)
    assert common.load_checkpoint(paths[1])["step"] == 2
    raw = bytearray(open(paths[1], "rb").read())
    at = raw.find(torch.arange(1000.0).numpy().tobytes()) + 400
    raw[at] ^= 0x10  # inside the tensor data: torch.load alone does not notice
    open(paths[1], "wb").write(bytes(raw))
    os.remove(paths[1] + ".sha256")
    assert not torch.equal(torch.load(paths[1], weights_only=True)["w"], torch.arange(1000.0))  # silently wrong
    common.save_checkpoint({"step": 2, "w": torch.arange(1000.0)}, paths[1])
    raw = bytearray(open(paths[1], "rb").read())
    raw[at] ^= 0x10
    open(paths[1], "wb").write(bytes(raw))
    with pytest.raises(common.CheckpointError, match=rf"{paths[1]}: checksum mismatch"):
        common.load_checkpoint(paths[1])
    lines = []
    path, state = common.load_newest_checkpoint(paths, lines.append)
    assert path == paths[0] and state["step"] == 1 and "falling back" in lines[0] and paths[1] in lines[0]
    open(paths[1], "wb").write(open(paths[0], "rb").read()[:100])  # truncated, no checksum
    os.remove(paths[1] + ".sha256")
    with pytest.raises(common.CheckpointError, match=rf"{paths[1]}: cannot load checkpoint"):
        common.load_checkpoint(paths[1])
    common.remove_checkpoint(paths[1])
    common.remove_checkpoint(paths[1])  # already gone: pruning never crashes a run
    assert sorted(os.listdir(tmp_path)) == ["step_1.pt", "step_1.pt.sha256"]


def test_bare_flag_sets_a_boolean_key():
    """`--flag` means `--flag=True` for a boolean key; for any other type it is an error
    naming the key and its type."""
    assert common.configure(DEFAULTS, ["--flag"])["flag"] is True
    assert common.configure(DEFAULTS, ["--flag", "--flag=false"])["flag"] is False
    with pytest.raises(ValueError, match=r"--steps: expected --steps=value \(int, default 10\)"):
        common.configure(DEFAULTS, ["--steps"])
    with pytest.raises(ValueError, match="unknown config key 'flagg'"):
        common.configure(DEFAULTS, ["--flagg"])


def test_bare_verify_flag_on_a_stage_script():
    """`embed_captions.py --verify` and `post_train.py --batch_size` as users type them."""
    import embed_captions
    import post_train
    defaults = {k: getattr(embed_captions, k) for k in embed_captions.config_keys}
    assert common.configure(defaults, ["--verify", "--verify_only"])["verify_only"] is True
    defaults = {k: getattr(post_train, k) for k in post_train.config_keys}
    with pytest.raises(ValueError, match=r"--batch_size: expected --batch_size=value \(int, default 4096\)"):
        common.configure(defaults, ["--batch_size"])


def _tiny_run(fused, steps, state=None, resume_fused=None):
    """A LayerNorm MLP + a 0-d param (like the logit scale) in two AdamW groups, `steps` steps on fixed data;
    state: (params, optimizer state_dict) to resume from. Returns (params, optimizer)."""
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    scale = torch.nn.Parameter(torch.tensor(2.0))
    params = list(net.parameters()) + [scale]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = common.adamw(groups, fused=fused if state is None else resume_fused, lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    if state is not None:
        with torch.no_grad():
            for p, q in zip(params, state[0]):
                p.copy_(q)
        opt.load_state_dict(state[1])
    for step in range(0 if state is None else 3, steps):  # a resume continues the data at step 3
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
        loss = ((net(x) - y) ** 2).mean() * scale
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params], opt


def test_fused_adamw_matches_plain_and_a_resume_keeps_the_checkpoints_kind():
    import copy
    import torch
    start = [p.clone() for p in _tiny_run(False, 0)[0]]
    plain, opt_plain = _tiny_run(False, 6)
    fused, opt_fused = _tiny_run(None, 6)  # None: fused where torch has the kernel (CPU in torch >= 2.4)
    assert opt_plain.param_groups[0]["fused"] is False and opt_fused.param_groups[0]["fused"] is True
    assert min((a - b).abs().max() for a, b in zip(plain, start)) > 1e-3  # every param moved
    assert max((a - b).abs().max() for a, b in zip(plain, fused)) < 1e-6
    assert max((a - b).abs().max() for a, b in zip(plain, fused)) > 0  # two implementations, not one
    # resume after 3 steps: the optimizer takes the checkpoint's kind, whatever it was built with -> bitwise
    for kind, full in ((False, plain), (True, fused)):
        mid, opt = _tiny_run(kind, 3)
        state = torch.load(_roundtrip(copy.deepcopy(opt.state_dict())), weights_only=True)
        resumed, opt2 = _tiny_run(None, 6, (mid, state), resume_fused=not kind)
        assert opt2.param_groups[0]["fused"] is kind
        assert all(torch.equal(a, b) for a, b in zip(resumed, full)), kind


def _roundtrip(obj):
    import io
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf



_GLOO_EXIT = """
import json, os, torch, torch.distributed as dist
import common
def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
before = threads()
ddp = common.setup_distributed()[0]
import torch.distributed.nn  # what loading a transformers model does (via torchvision and torch._dynamo)
flag = torch.ones(1)
dist.broadcast(flag, 0)
common.cleanup_distributed(ddp)
print(json.dumps({"ddp": ddp, "before": before, "after": threads()}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")
def test_cleanup_distributed_leaves_no_gloo_threads_for_interpreter_shutdown():
    """cleanup_distributed must really free the process group, also when torch.distributed.nn is first
    imported after init (loading a transformers model does): gloo worker threads still alive at
    interpreter shutdown can free a tensor that needs the GIL and abort the process (exit code -6)."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-c", _GLOO_EXIT], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["ddp"] and out["after"] == out["before"], out


# --- the out_dir rules: one run at a time, a fresh run never mixes with an older one's files

def test_a_killed_runs_orphaned_child_does_not_hold_the_lock(tmp_path):
    """A run SIGKILLed while a forked DataLoader worker lives on: the resume takes the lock at once."""
    import signal
    import subprocess
    import sys
    out = tmp_path / "run"
    code = (f"import os, signal, sys, time; sys.path.insert(0, {common.REPO!r}); import common; "
            f"common.lock_out_dir({str(out)!r}); pid = os.fork()\n"
            "if pid == 0:\n    time.sleep(60)\nelse:\n    print(pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    try:
        assert p.wait(timeout=60) == -signal.SIGKILL
        os.kill(child, 0)  # the orphan is alive, holding the lock file open
        common.lock_out_dir(str(out), resume=True)  # and the lock is free
        common.unlock_out_dir(str(out))
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_fresh_run_refuses_another_runs_files_unless_told(tmp_path):
    out = tmp_path / "run"
    os.makedirs(out / "checkpoints")  # an empty folder is no result
    common.lock_out_dir(str(out), resume=False)
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"out_dir='.*run' holds another run's files \(1: metrics.jsonl\); expected an "
                                         r"empty or new folder: pass --resume"):
        common.lock_out_dir(str(out), resume=False)
    assert (out / "metrics.jsonl").read_text() == "{}\n"  # refused, nothing touched
    common.lock_out_dir(str(out), resume=True)  # told to continue it
    common.lock_out_dir(str(out), resume=False, overwrite=True)  # told to replace it
    assert not (out / "metrics.jsonl").exists()
    common.unlock_out_dir(str(out))


def test_non_finite_weights_are_never_saved(tmp_path):
    ck = common.Checkpoints(str(tmp_path), keep=2)
    good = ck.save(1, {"model": {"w": torch.ones(2)}})
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite weights in w; not saved \(newest checkpoint: .*step_00000001.pt\)"):
        ck.save(2, {"model": {"w": torch.tensor([1.0, float("nan")])}})
    assert ck.paths() == [good] and ck.newest()[1]["step"] == 1


def test_run_main_prints_one_line_and_exits_2_for_input_errors_only(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["post_train.py"])

    def bad_input(argv):
        raise ValueError("train_manifest='x.jsonl': no such file;\nexpected a file")
    with pytest.raises(SystemExit) as e:
        common.run_main(bad_input)
    assert e.value.code == 2
    assert capsys.readouterr().err == "post_train.py: error: train_manifest='x.jsonl': no such file; expected a file\n"

    def library_bug(argv):  # a ValueError raised inside a library is not an input error of ours: traceback
        json.loads("{")
    with pytest.raises(json.JSONDecodeError):
        common.run_main(library_bug)


def test_check_resume_accepts_keys_an_older_checkpoint_lacks_only_at_their_default():
    import common
    ck = {"config": {"learning_rate": 1e-3}}  # written before `contrastive_loss` existed
    defaults = {"learning_rate": 1e-3, "contrastive_loss": "softmax"}
    common.check_resume("ck.pt", ck, dict(defaults), set(), defaults=defaults)  # the old behaviour: resumes
    with pytest.raises(ValueError, match=r"ck.pt: cannot resume.*contrastive_loss \(checkpoint None, now 'sigmoid'\)"):
        common.check_resume("ck.pt", ck, {**defaults, "contrastive_loss": "sigmoid"}, set(), defaults=defaults)
    with pytest.raises(ValueError, match="learning_rate"):  # a key the checkpoint has must still match
        common.check_resume("ck.pt", ck, {**defaults, "learning_rate": 2e-3}, set(), defaults=defaults)


def test_scaled_step_reports_the_gradient_norm_and_leaves_unclipped_gradients_bitwise():
    import common
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    (w.sin().sum() * 3).backward()
    g = w.grad.clone()
    opt = torch.optim.SGD([w], lr=0.0)
    skipped, norm = common.scaled_step(opt, None, [w], grad_clip=0.0)
    assert not skipped and torch.equal(w.grad, g)  # measured, not clipped
    assert norm.item() == pytest.approx(g.double().pow(2).sum().sqrt().item(), rel=1e-6)
    skipped, norm = common.scaled_step(opt, None, [w], grad_clip=0.1)
    assert w.grad.norm().item() == pytest.approx(0.1, rel=1e-4) and norm.item() > 0.1  # the norm before clipping
