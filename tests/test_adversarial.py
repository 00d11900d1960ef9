"""Adversarial inputs for every script, as a user meets them on the command line.

The rule under test (common.run_main): bad input exits with status 2 and one stderr line
`<script>: error: <message>` naming the file (and line), config key or path and what was expected, with
no traceback, and no output that existed before is changed (a run never writes into or deletes another
run's results). Cases are one table per category: config values, model paths, data files, JSONL shape,
images, converter inputs, an out_dir holding another run, a full disk (RLIMIT_FSIZE). A case whose fix
belongs in a file this suite's owner does not edit is xfail(strict=True) with where the fix belongs.

Speed: a script's run costs ~3-5 s of imports (torch, transformers) on a busy 2-core box, times ~260
cases. So the cases run in processes forked from one server that imported those libraries once; each
child runs `<script>.py` through runpy as `__main__` with its own argv, cwd, environment, stdout/stderr
files and resource limits, which is what `python <script>.py ...` does after its imports. A few cases
also run as real `python <script>.py` subprocesses and must give the same result
(ADVERSARIAL_SUBPROCESS=1 runs every case that way). The tiny inputs are built once per module.
"""
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1"}
ENV.pop("LLM2CLIP_TRACEBACK", None)
JOBS = 2  # cases run at once (the machine has 2 cores)


# -----------------------------------------------------------------------------
# The harness: a fork server that has paid the imports once

SERVER = r'''
import json, os, resource, runpy, sys, time, traceback
import numpy, PIL.Image, torch, transformers, timm, safetensors.torch, tqdm  # noqa: the imports paid once
import transformers.models.auto.modeling_auto  # noqa
import common, data, cache, data_index, model, loss, metrics, zoo, downstream, pipeline  # noqa
jobs = int(sys.argv[1])
print(json.dumps({"ready": True}), flush=True)


def run_script(req):
    """In this process: the script as __main__ with req's argv -> exit status (as the interpreter gives it)."""
    sys.argv = list(req["argv"])
    try:
        runpy.run_path(os.path.abspath(sys.argv[0]), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def child(req):
    """A forked case: stdin from /dev/null, stdout/stderr to files. With a file size limit (a full disk),
    the script runs in a grandchild whose output goes to /dev/null and a pipe (limits apply to regular files
    only), copied to the files here."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills it with everything it started
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
        os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        os.chdir(req["cwd"])
        os.environ.update(req.get("env") or {})
        if not req.get("fsize"):
            code = run_script(req)
        else:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                os.dup2(w, 2)
                resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
                os._exit(run_script(req))
            os.close(w)
            while chunk := os.read(r, 1 << 16):
                os.write(2, chunk)
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        os._exit(code)


def main():
    """Read every request, then run them `jobs` at a time; a case past its timeout is killed (rc -9)."""
    pending, running = [json.loads(line) for line in sys.stdin][::-1], {}
    while pending or running:
        while pending and len(running) < jobs:
            req = pending.pop()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(req)
            running[pid] = (req, time.time())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            req, t0 = running.pop(pid)
            print(json.dumps({"id": req["id"], "rc": os.waitstatus_to_exitcode(status), "wall": time.time() - t0}),
                  flush=True)
            continue
        for pid, (req, t0) in running.items():
            if time.time() - t0 > req["timeout"]:
                try:
                    os.killpg(pid, 9)
                except ProcessLookupError:  # exited meanwhile: reaped on the next round
                    pass
        time.sleep(0.02)


main()
'''


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    wall: float

    @property
    def last_line(self):
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def _request(rid, argv, logdir, fsize=None, env=None, timeout=180):
    return {"id": rid, "argv": argv, "cwd": ROOT, "fsize": fsize, "env": env or {}, "timeout": timeout,
            "stdout": os.path.join(logdir, f"{rid}.out"), "stderr": os.path.join(logdir, f"{rid}.err")}


def _read(req, rc, wall):
    def text(p):
        with open(p, errors="replace") as f:
            return f.read()
    return Result(rc, text(req["stdout"]), text(req["stderr"]), wall)


def run_forked(requests, jobs=JOBS):
    """Run requests ({id, argv, fsize, ...}) in children of one fork server -> {id: Result}."""
    if not requests:
        return {}
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(jobs)], cwd=ROOT, env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert json.loads(server.stdout.readline()).get("ready"), "fork server did not start"
    for req in requests:
        server.stdin.write(json.dumps(req) + "\n")
    server.stdin.close()
    done = {}
    for line in server.stdout:
        msg = json.loads(line)
        done[msg["id"]] = msg
    server.wait(timeout=60)
    by_id = {r["id"]: r for r in requests}
    missing = set(by_id) - set(done)
    assert not missing, f"fork server lost cases {sorted(missing)}"
    return {rid: _read(by_id[rid], m["rc"], m["wall"]) for rid, m in done.items()}


def run_subprocess(req, timeout=300):
    """The same request as a real `python <script>.py ...` process (a size limit: stderr through a pipe)."""
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
    t0 = time.time()
    with open(req["stdout"], "w") as out, open(req["stderr"], "w") as err:
        p = subprocess.run([sys.executable] + req["argv"], cwd=req["cwd"], env={**ENV, **req["env"]},
                           stdout=subprocess.DEVNULL if req.get("fsize") else out,
                           stderr=subprocess.PIPE if req.get("fsize") else err, stdin=subprocess.DEVNULL,
                           preexec_fn=limit if req.get("fsize") else None, timeout=timeout)
        if req.get("fsize"):
            err.write(p.stderr.decode(errors="replace"))
    return _read(req, p.returncode, time.time() - t0)


# -----------------------------------------------------------------------------
# Snapshots: every file under a folder with its content hash (logs: append-only)

def snapshot(root):
    """{relative path: sha256} of every file under root (the lock file is bookkeeping, not a result)."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            if n == ".lock" or not os.path.isfile(p):
                continue
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def changed_files(before, after):
    """Files of `before` that are gone or differ in `after`; a .log may only have grown (appended)."""
    bad = []
    for rel, old in before.items():
        new = after.get(rel)
        if new is None:
            bad.append(f"{rel} deleted")
        elif new != old and not (rel.endswith(".log") and new.startswith(old)):
            bad.append(f"{rel} changed ({hashlib.sha256(old).hexdigest()[:8]} -> {hashlib.sha256(new).hexdigest()[:8]})")
    return bad


# -----------------------------------------------------------------------------
# The tiny world: good inputs (data, a tiny LLM, a tiny CLIP, an embedding cache, a post_train export, class
# folders), a previous run's results, and every bad input the cases name

class World:
    pass


def write_bytes(path, raw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(raw)
    return str(path)


def jsonl(*objs):
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def png_header(width, height, bit_depth=8, colour=2):
    """A PNG signature + IHDR chunk claiming width x height (no pixel data): what a decompression bomb shows
    before any byte of it is decoded."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_images(d):
    """Odd images: name -> path. Decoding must fail naming the file (truncated, zero-byte, bomb) or give an
    RGB image (16-bit grey, palette, CMYK, grey+alpha)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    out = {}
    os.makedirs(d, exist_ok=True)
    good = os.path.join(d, "good.png")
    rgb.save(good)
    raw = open(good, "rb").read()
    out["truncated"] = write_bytes(os.path.join(d, "truncated.png"), raw[:len(raw) // 2])
    out["zero_byte"] = write_bytes(os.path.join(d, "zero_byte.png"), b"")
    out["bomb"] = write_bytes(os.path.join(d, "bomb.png"), png_header(40000, 40000))
    out["not_an_image"] = write_bytes(os.path.join(d, "not_an_image.jpg"), b"<html>404 not found</html>\n")
    Image.fromarray((rng.integers(0, 65535, (32, 32))).astype(np.uint16)).save(os.path.join(d, "grey16.png"))
    out["grey16"] = os.path.join(d, "grey16.png")
    rgb.convert("P").save(os.path.join(d, "palette.png"))
    out["palette"] = os.path.join(d, "palette.png")
    rgb.convert("CMYK").save(os.path.join(d, "cmyk.jpg"))
    out["cmyk"] = os.path.join(d, "cmyk.jpg")
    rgb.convert("LA").save(os.path.join(d, "grey_alpha.png"))
    out["grey_alpha"] = os.path.join(d, "grey_alpha.png")
    return out


def make_bad_files(d, w):
    """Every malformed input file, by name (the cases refer to them as {bad[name]})."""
    b = {}
    caps = [json.loads(ln) for ln in open(w.train_caps, encoding="utf-8")]
    man = [json.loads(ln) for ln in open(w.train, encoding="utf-8")]
    good_caps, good_man = jsonl(*caps), jsonl(*man)
    # caption files (cc_finetune train/val captions, evaluate c2c)
    for name, raw in {
        "caps_truncated": good_caps[:len(good_caps) - len(json.dumps(caps[-1])) // 2 - 1],
        "caps_one_caption": jsonl(caps[0], {"id": "x", "captions": ["only one caption"]}),
        "caps_string": jsonl(caps[0], {"id": "x", "captions": "a red circle, a blue square"}),
        "caps_numbers": jsonl(caps[0], {"id": "x", "captions": [1, 2]}),
        "caps_array_line": jsonl(caps[0]) + b'["a red circle", "a blue square"]\n',
        "caps_invalid_utf8": jsonl(caps[0]) + b'{"id": "x", "captions": ["caf\xe9 \xff", "b c"]}\n',
        "caps_surrogate": jsonl(caps[0]) + b'{"id": "x", "captions": ["a \\ud800 b", "c d"]}\n',
        "caps_nul": jsonl(caps[0]) + b"\0" * 40 + b"\n",
        "caps_nul_in_caption": jsonl(caps[0]) + b'{"id": "x", "captions": ["a \\u0000 b", "c d"]}\n',
        "caps_empty": b"",
        "pairs_wrong_type": jsonl({"query": "a red circle", "positive": 3}),
    }.items():
        b[name] = write_bytes(os.path.join(d, name + ".jsonl"), raw)
    # manifests (post_train, embed_captions, evaluate retrieval): images are resolved from the data folder
    root = os.path.dirname(w.train)
    for name, raw in {
        "man_truncated": good_man[:len(good_man) - len(json.dumps(man[-1])) // 2 - 1],
        "man_captions_string": jsonl(man[0], {**man[1], "captions": "a red circle"}),
        "man_image_number": jsonl(man[0], {**man[1], "image": 7}),
        "man_invalid_utf8": jsonl(man[0]) + b'{"image": "images/x.png", "captions": ["caf\xe9"]}\n',
        "man_surrogate": jsonl(man[0]) + ('{"image": "%s", "captions": ["a \\udc80 b"]}\n' % man[1]["image"]).encode(),
        "man_nul": jsonl(man[0]) + b"\0" * 40 + b"\n",
        "man_missing_image": jsonl(man[0], {**man[1], "image": "images/does_not_exist.png"}),
        "man_empty": b"",
    }.items():
        b[name] = write_bytes(os.path.join(root, name + ".jsonl"), raw)  # beside train.jsonl: same image root
    # BOM + CRLF: a file saved by a Windows editor must be ACCEPTED as it is
    b["caps_bom_crlf"] = write_bytes(os.path.join(d, "caps_bom_crlf.jsonl"), b"\xef\xbb\xbf" + good_caps.replace(b"\n", b"\r\n"))
    b["man_bom_crlf"] = write_bytes(os.path.join(root, "man_bom_crlf.jsonl"), b"\xef\xbb\xbf" + good_man.replace(b"\n", b"\r\n"))
    # manifests of the training records with every image replaced by an odd one (same texts: the cache matches)
    for kind, path in w.images.items():
        copies = []
        for i in range(len(man)):
            stem, ext = os.path.splitext(path)
            copies.append(f"{stem}_{i}{ext}")
            shutil.copyfile(path, copies[-1])
        b[f"man_img_{kind}"] = write_bytes(os.path.join(d, f"man_img_{kind}.jsonl"),
                                           jsonl(*[{**r, "image": c} for r, c in zip(man, copies)]))
    b["dir"] = os.path.join(d, "a_folder.jsonl")  # a folder where a file is expected
    os.makedirs(b["dir"], exist_ok=True)
    b["dangling"] = os.path.join(d, "dangling.jsonl")
    os.symlink(os.path.join(d, "gone.jsonl"), b["dangling"])
    b["cfg_wrong_type"] = write_bytes(os.path.join(d, "cfg_wrong_type.py"), b'batch_size = "big"\n')
    b["cfg_unknown_key"] = write_bytes(os.path.join(d, "cfg_unknown_key.py"), b"learning_rat = 1e-4\n")
    # converter inputs of another format's shape
    karpathy = {"images": [{"split": "test", "filepath": "val2014", "filename": "a.jpg",
                            "sentences": [{"raw": f"caption {i}"} for i in range(5)]}]}
    sharegpt = [{"image": "a.jpg", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "long"}]}]
    xm = {"image/key": "abc", "de": {"caption": ["ein bild"]}}
    for name, raw in {
        "karpathy.json": json.dumps(karpathy).encode(), "karpathy_indented.json": json.dumps(karpathy, indent=1).encode(),
        "sharegpt4v.json": json.dumps(sharegpt).encode(), "xm3600.jsonl": jsonl(xm),
        "karpathy_images_dict.json": json.dumps({"images": {"0": karpathy["images"][0]}}).encode(),
        "karpathy_no_sentences.json": json.dumps({"images": [{"split": "test", "filename": "a.jpg", "sentences": "x"}]}).encode(),
        "sharegpt4v_dict.json": json.dumps({"annotations": sharegpt}).encode(),
        "sharegpt4v_string_turns.json": json.dumps([{"image": "a.jpg", "conversations": "gpt: long"}]).encode(),
        "docci_list.jsonl": b'[{"image_file": "a.jpg", "description": "d", "split": "test"}]\n',
        "docci_number.jsonl": jsonl({"image_file": 3, "description": 4, "split": "test"}),
        "xm3600_caption_string.jsonl": jsonl({"image/key": "abc", "de": {"caption": "ein bild"}}),
        "flickr30k_cn_json.txt": json.dumps(karpathy).encode(),
        "not_utf8.txt": b"1000092795.jpg#zhc#0\t\xff\xfe\xfa\n",
        "truncated.json": json.dumps(karpathy).encode()[:40],
        "xm3600_bom_crlf.jsonl": b"\xef\xbb\xbf" + jsonl(xm, {**xm, "image/key": "abd"}).replace(b"\n", b"\r\n"),
        "f30k_bom_crlf.txt": b"\xef\xbb\xbf" + "1.jpg#zhc#0\t一只狗\r\n1.jpg#zhc#1\t一只黑狗\r\n".encode(),
    }.items():
        b["conv_" + name.split(".")[0]] = write_bytes(os.path.join(d, "conv", name), raw)
    os.makedirs(os.path.join(d, "conv", "empty_folder"), exist_ok=True)
    b["conv_empty_folder"] = os.path.join(d, "conv", "empty_folder")
    return b


def make_previous_run(d):
    """A previous run's results, as the stage scripts leave them (the cases copy it and must not change it)."""
    import torch
    import common
    os.makedirs(os.path.join(d, "checkpoints"), exist_ok=True)
    for script in ("cc_finetune", "post_train", "embed_captions"):
        common.atomic_write_text(os.path.join(d, f"run_{script}.json"), json.dumps(
            {"format_version": 1, "script": f"{script}.py", "config": {"out_dir": str(d)}}) + "\n")
    common.save_checkpoint({"step": 2, "model": {"w": torch.ones(3)}}, os.path.join(d, "checkpoints", "step_00000002.pt"))
    for name, text in (("post_train.log", "step 2: loss 1.0\n"), ("cc_finetune.log", "step 2: loss 1.0\n"),
                       ("metrics.jsonl", '{"step": 2, "loss": 1.0}\n'), ("results.json", '{"task": "retrieval"}\n'),
                       ("manifest.jsonl", '{"image": "a.jpg", "captions": ["a"]}\n'),
                       ("llm2clip.json", '{"format_version": 1}\n'), ("vision_tower.pt", "weights\n"),
                       ("features/meta.json", "{}\n"), ("config.json", "{}\n")):
        write_bytes(os.path.join(d, name), text.encode())
    return str(d)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    import torch
    import data
    import embed_captions
    import pipeline
    import post_train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("adversarial")
    w = World()
    w.dir, w.clip = str(d), tiny_clip
    data.make_synthetic_dataset(str(d / "data"), 8, seed=0, image_size=32, split="train")
    data.make_synthetic_dataset(str(d / "data"), 8, seed=1, image_size=32, split="val")
    w.train, w.val = str(d / "data" / "train.jsonl"), str(d / "data" / "val.jsonl")
    w.train_caps, w.val_caps = str(d / "data" / "train_captions.jsonl"), str(d / "data" / "val_captions.jsonl")
    w.llm = pipeline.build_tiny_text_model(str(d / "llm"), texts=[" ".join(data.synthetic_vocabulary())] * 8)
    embed_captions.main([f"--text_model={w.llm}", f"--manifest={w.train}", f"--out_dir={d / 'cache'}"])
    w.cache = str(d / "cache")
    w.export = str(d / "export")
    post_train.main([os.path.join(ROOT, "config", "post_tiny_cpu.py"), f"--train_manifest={w.train}",
                     f"--cache_dir={w.cache}", "--val_manifest=", f"--out_dir={w.export}", "--num_workers=0",
                     "--batch_size=8", "--max_steps=0", f"--train_index={d / 'export_index'}",
                     "--vision_model=vit_base_patch16_clip_224.openai"])  # OpenAI-CLIP style: export_hf writes it
    from PIL import Image
    for split in ("train", "val"):
        for c, colour in enumerate(("red", "blue")):
            for i in range(2):
                p = d / "classes" / split / colour / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (200 * (c == 0), 0, 200 * (c == 1))).save(p)
    w.classes = str(d / "classes")
    w.images = make_images(str(d / "images"))
    w.bad = make_bad_files(str(d / "bad"), w)
    w.prev = make_previous_run(d / "previous_run")
    w.inputs = {k: snapshot(getattr(w, k)) for k in ("llm", "cache", "export", "classes")}
    w.inputs["data"] = snapshot(str(d / "data"))
    w.inputs["bad"] = snapshot(str(d / "bad"))
    torch.set_num_threads(threads)
    return w


# -----------------------------------------------------------------------------
# The cases. argv items and `name` are formatted with the world's paths: {llm}, {train}, {bad[...]},
# {images[...]}, and per case {case} (its own folder) and {prev} (its copy of a previous run's results,
# which must come out unchanged). `name`: what the error line must name (a key, file or path).

@dataclass
class Case:
    id: str
    category: str
    argv: list
    name: str
    fsize: int = None  # RLIMIT_FSIZE in bytes: the disk is full past it
    rc: int = 2
    extra: dict = field(default_factory=dict)


CC = ["cc_finetune.py", "config/cc_tiny_cpu.py", "--text_model={llm}", "--train_captions={train_caps}",
      "--val_captions=", "--out_dir={case}/out", "--max_steps=1", "--batch_size=4", "--micro_batch_size=4",
      "--max_length=64"]
EMBED = ["embed_captions.py", "--text_model={llm}", "--manifest={train}", "--out_dir={case}/out"]
POST = ["post_train.py", "config/post_tiny_cpu.py", "--train_manifest={train}", "--cache_dir={cache}",
        "--val_manifest=", "--out_dir={case}/out", "--train_index={case}/index", "--num_workers=0", "--batch_size=8",
        "--max_steps=1", "--warmup_steps=0", "--save_interval=1000"]
RETRIEVAL = ["evaluate.py", "--task=retrieval", "--model={clip}", "--data={val}", "--captions_per_image=0",
             "--num_workers=0", "--out={prev}/results.json"]
C2C = ["evaluate.py", "--task=c2c", "--text_model={llm}", "--captions={val_caps}", "--out={prev}/results.json"]
CONVERT = ["evaluate.py", "--task=convert", "--out={prev}/manifest.jsonl"]
CLASSIFY = ["evaluate.py", "--task=classify", "--model={clip}", "--data={classes}/val", "--num_workers=0",
            "--out={prev}/results.json"]
PROBE = ["downstream.py", "--task=linear_probe", "--model={clip}", "--data={classes}", "--num_workers=0",
         "--feature_dir={case}/features", "--probe_epochs=1", "--out={prev}/results.json"]
EXPORT = ["downstream.py", "--task=export_hf", "--model={export}", "--out={case}/out/hf"]
BENCH = ["bench.py", "--benchmarks=a", "--repeats=1", "--warmup=0", "--cache_records=8"]
BENCH_DATA = ["bench_data.py", "--work_dir={case}/out", "--sizes=100", "--kinds=manifest"]
PIPELINE = ["pipeline.py", "--out_dir={case}/out", "--num_train=64", "--num_val=8", "--num_test=8", "--cc_steps=1",
            "--post_steps=1"]

LEAD = "fix belongs in {}, owned by the lead"
DATA_OWNER = "fix belongs in {}, owned by the data-readers helper"
CASES = []


def label(base):
    """cc_finetune, evaluate-retrieval, downstream-export_hf, ...: the script and its task."""
    task = next((a.split("=", 1)[1] for a in base if a.startswith("--task=")), None)
    return base[0].split(".")[0] + (f"-{task}" if task else "")


def add(category, base, rows):
    """rows: (id, extra argv (a str: one item), name[, options]) -> Cases on the `base` command."""
    for row in rows:
        cid, extra, name = row[:3]
        opts = row[3] if len(row) > 3 else {}
        extra = [extra] if isinstance(extra, str) else list(extra)
        case = Case(f"{label(base)}-{cid}", category, base + extra, name, **opts)
        assert case.id not in {c.id for c in CASES}, f"duplicate case id {case.id}"
        CASES.append(case)


# --- 1. config values: wrong type, out of range, non-finite, micro batch, unknown keys and enum values
add("config", CC, [
    ("batch_size-not-int", "--batch_size=abc", "batch_size"),
    ("config-file-wrong-type", "{bad[cfg_wrong_type]}", "batch_size"),
    ("config-file-unknown-key", "{bad[cfg_unknown_key]}", "learning_rat"),
    ("unknown-key", "--bogus_key=1", "bogus_key"),
    ("renamed-key", "--lr=1e-4", "lr"),
    ("learning_rate-zero", "--learning_rate=0", "learning_rate"),
    ("learning_rate-negative", "--learning_rate=-1e-4", "learning_rate"),
    ("learning_rate-nan", "--learning_rate=nan", "learning_rate"),
    ("temperature-zero", "--temperature=0", "temperature"),
    ("temperature-nan", "--temperature=nan", "temperature"),
    ("temperature-inf", "--temperature=inf", "temperature"),
    ("micro-batch-not-dividing", ["--batch_size=4", "--micro_batch_size=3"], "micro_batch_size"),
    ("micro-batch-zero", "--micro_batch_size=0", "micro_batch_size"),
    ("warmup-negative", "--warmup_steps=-1", "warmup_steps"),
    ("grad_clip-nan", "--grad_clip=nan", "grad_clip"),
    ("lora_dropout-above-1", "--lora_dropout=1.5", "lora_dropout"),
    ("mntp_mask_prob-above-1", ["--objective=mntp", "--mntp_mask_prob=2"], "mntp_mask_prob"),
    ("objective-unknown", "--objective=simclr", "objective"),
    ("pooling-unknown", "--pooling=max", "pooling"),
    ("dtype-unknown", "--dtype=fp8", "dtype"),
    ("chat_template-unknown", "--chat_template=llama2", "chat_template"),
    ("source_weights-not-numbers", ["--single_source_batches=True", "--source_weights=a,b"], "source_weights"),
    ("bool-not-bool", "--resume=maybe", "resume"),
])
add("config", EMBED, [
    ("batch_tokens-zero", "--batch_tokens=0", "batch_tokens"),
    ("chunk_rows-not-int", "--chunk_rows=many", "chunk_rows"),
    ("dtype-unknown", "--dtype=fp8", "dtype"),
    ("pooling-unknown", "--pooling=max", "pooling"),
    ("bidirectional-not-bool", "--bidirectional=sometimes", "bidirectional"),
    ("unknown-key", "--batch_size=4", "batch_size"),
    ("fields-unknown", "--fields=titles", "fields"),
])
add("config", POST, [
    ("learning_rate-zero", "--learning_rate=0", "learning_rate"),
    ("learning_rate-negative", "--learning_rate=-1e-3", "learning_rate"),
    ("min_lr-negative", "--min_lr=-1e-5", "min_lr"),
    ("min_lr-above-learning_rate", ["--learning_rate=1e-4", "--min_lr=1e-3"], "min_lr"),
    ("logit_scale_init-nan", "--logit_scale_init=nan", "logit_scale_init"),
    ("logit_scale_init-inf", "--logit_scale_init=inf", "logit_scale_init"),
    ("max_logit_scale-nan", "--max_logit_scale=nan", "max_logit_scale"),
    ("micro-batch-not-dividing", ["--batch_size=8", "--micro_batch_size=3"], "micro_batch_size"),
    ("batch-zero", "--batch_size=0", "batch_size"),
    ("crop_scale-reversed", "--crop_scale=(1.0,0.5)", "crop_scale"),
    ("crop_scale-not-a-pair", "--crop_scale=abc", "crop_scale"),
    ("real_caption_ratio-above-1", "--real_caption_ratio=1.5", "real_caption_ratio"),
    ("layer_decay-negative", "--layer_decay=-0.5", "layer_decay"),
    ("weight_decay-nan", "--weight_decay=nan", "weight_decay"),
    ("timm_kwargs-not-dict", "--timm_kwargs=img_size", "timm_kwargs"),
    ("losses-unknown", "--losses=e", "losses"),
    ("text_source-unknown", "--text_source=disk", "text_source"),
    ("adaptor-unknown", "--adaptor=mlp", "adaptor"),
    ("eval_field-unknown", ["--val_manifest={val}", "--eval_field=titles"], "eval_field"),
    ("dtype-unknown", "--dtype=fp8", "dtype"),
    ("vision_model-unknown", "--vision_model=vit_nonexistent_patch3", "vision_model"),
    ("unknown-key", "--epochs=3", "epochs"),
    ("renamed-key", "--ckpt_interval=5", "ckpt_interval"),
])
add("config", RETRIEVAL, [
    ("task-unknown", "--task=rank", "task"),
    ("batch_size-zero", "--batch_size=0", "batch_size"),
    ("num_workers-negative", "--num_workers=-1", "num_workers"),
    ("caption_field-unknown", "--caption_field=titles", "caption_field"),
    ("captions_per_image-not-int", "--captions_per_image=five", "captions_per_image"),
    ("max_length-negative", "--max_length=-5", "max_length"),
    ("device-unknown", "--device=tpu", "device"),
    ("amp-not-bool", "--amp=maybe", "amp"),
    ("unknown-key", "--model_name=x", "model_name"),
    ("data-unknown-name", "--data=imagenet21k", "imagenet21k"),
    ("data-blank", "--data=", "data"),
    ("out-is-a-folder", "--out={case}", "out"),
])
add("config", C2C, [
    ("dtype-unknown", "--dtype=float8", "dtype"),
    ("pooling-unknown", "--pooling=max", "pooling"),
    ("batch_size-not-int", "--batch_size=1.5", "batch_size"),
])
add("config", CONVERT, [
    ("format-unknown", ["--format=laion", "--src={bad[conv_karpathy]}"], "format"),
    ("num-negative", ["--format=sharegpt4v", "--src={bad[conv_sharegpt4v]}", "--num=-1"], "num"),
    ("split-unknown", ["--format=karpathy", "--src={bad[conv_karpathy]}", "--split=tset"], "split"),
])
add("config", PROBE, [
    ("probe_lr-zero", "--probe_lr=0", "probe_lr"),
    ("probe_lr-nan", "--probe_lr=nan", "probe_lr"),
    ("probe_epochs-zero", "--probe_epochs=0", "probe_epochs"),
    ("probe_batch_size-negative", "--probe_batch_size=-8", "probe_batch_size"),
    ("probe_momentum-above-1", "--probe_momentum=1.5", "probe_momentum"),
    ("device-unknown", "--device=tpu", "device"),
    ("task-unknown", "--task=retrieval", "task"),
])
add("config", BENCH, [
    ("benchmarks-unknown", "--benchmarks=xyz", "benchmarks"),
    ("repeats-zero", "--repeats=0", "repeats"),
    ("threads-zero", "--threads=0", "threads"),
    ("clock-unknown", "--clock=tsc", "clock"),
    ("device-unknown", "--device=tpu", "device"),
    ("dtype-unknown", "--dtype=fp8", "dtype"),
    ("batch_size-zero", "--batch_size=0", "batch_size"),
    ("unknown-key", "--steps_per_repeat=3", "steps_per_repeat"),
])
add("config", BENCH_DATA, [
    ("sizes-not-ints", "--sizes=ten,100", "sizes"),
    ("sizes-zero", "--sizes=0", "sizes"),
    ("kinds-unknown", "--kinds=parquet", "kinds"),
    ("shard_size-zero", "--shard_size=0", "shard_size"),
    ("batch_size-zero", "--batch_size=0", "batch_size"),
    ("num_workers-negative", "--num_workers=-2", "num_workers"),
    ("unknown-key", "--size=100", "size"),
])
add("config", PIPELINE, [
    ("arch-unknown", "--arch=gpt2", "arch"),
    ("num_train-zero", "--num_train=0", "num_train"),
    ("cc_steps-not-int", "--cc_steps=few", "cc_steps"),
    ("unknown-key", "--steps=3", "steps"),
])

# --- 2. model paths: a path-looking value that does not exist is an error naming its key, never a hub lookup
for value in ("/nonexistent/dir", "./x"):
    tag = "absolute" if value.startswith("/") else "relative"
    add("model path", CC, [(f"text_model-{tag}", f"--text_model={value}", "text_model"),
                           (f"init_from-{tag}", f"--init_from={value}", "init_from")])
    add("model path", EMBED, [(f"text_model-{tag}", f"--text_model={value}", "text_model")])
    add("model path", POST, [(f"text_model-{tag}", ["--text_source=online", f"--text_model={value}"], "text_model"),
                             (f"vision_weights-{tag}", f"--vision_weights={value}/w.pt", "vision_weights"),
                             (f"clip_text-{tag}", ["--losses=b", f"--clip_text={value}"], "clip_text"),
                             (f"cache_dir-{tag}", f"--cache_dir={value}", "cache_dir")])
    add("model path", RETRIEVAL, [(f"model-{tag}", f"--model={value}", "model")])
    add("model path", C2C, [(f"text_model-{tag}", f"--text_model={value}", "text_model")])
    add("model path", PROBE, [(f"model-{tag}", f"--model={value}", "model")])
    add("model path", EXPORT, [(f"model-{tag}", f"--model={value}", "model")])
add("model path", CLASSIFY, [("classnames-missing", "--classnames=/nonexistent/names.txt", "/nonexistent/names.txt"),
                             ("templates-missing", "--templates=./no_templates.txt", "no_templates.txt"),
                             ("model-not-a-model", "--model={classes}", "model")])
add("model path", EXPORT, [("model-not-an-export", "--model={llm}", "model")])
add("model path", RETRIEVAL, [("model-second-of-two-missing", "--model={clip},./no_such_clip", "model")])

# --- 3. data files: missing, a folder, a dangling link, truncated, empty
for key, base, good in (("train_captions", CC, "caps"), ("val_captions", CC, "caps"), ("manifest", EMBED, "man"),
                        ("train_manifest", POST, "man"), ("data", RETRIEVAL, "man"), ("captions", C2C, "caps")):
    add("data file", base, [
        (f"{key}-missing", f"--{key}=/nonexistent/{key}.jsonl", f"/nonexistent/{key}.jsonl"),
        (f"{key}-folder", f"--{key}={{bad[dir]}}", "{bad[dir]}"),
        (f"{key}-dangling-link", f"--{key}={{bad[dangling]}}", "{bad[dangling]}"),
        (f"{key}-truncated", f"--{key}={{bad[{good}_truncated]}}", f"{{bad[{good}_truncated]}}"),
        (f"{key}-empty", f"--{key}={{bad[{good}_empty]}}", f"{{bad[{good}_empty]}}"),
    ])
add("data file", POST, [
    ("val_manifest-missing", "--val_manifest=/nonexistent/val.jsonl", "/nonexistent/val.jsonl"),
    ("train_shards-missing", ["--train_manifest=", "--train_shards=/nonexistent/{{00000..00001}}.tar"], "/nonexistent/"),
    ("image_root-missing", "--image_root=/nonexistent/images", "/nonexistent/images"),
    ("cache-of-other-texts", "--train_manifest={val}", "{cache}"),
])
# truncated artefacts of earlier stages (a copy per case): the error names the file
add("data file", POST, [(f"cache-{name}-truncated", "--cache_dir={case}/cache", "{case}/cache/" + name,
                         {"extra": {"copy": ["cache"], "truncate": ["cache/" + name]}})
                        for name in ("embeddings.npy", "meta.json")])  # index.npz: never read by stage 2
add("data file", EMBED, [("existing-cache-meta-truncated", "--out_dir={case}/cache", "{case}/cache/meta.json",
                          {"extra": {"copy": ["cache"], "truncate": ["cache/meta.json"]}})])
add("data file", RETRIEVAL, [(f"export-{name}-truncated", "--model={case}/export", "{case}/export/" + name,
                              {"extra": {"copy": ["export"], "truncate": ["export/" + name]}})
                             for name in ("vision_tower.pt", "adaptor.pt", "llm2clip.json")])
add("data file", EXPORT, [("export-vision_tower-truncated", "--model={case}/export", "{case}/export/vision_tower.pt",
                           {"extra": {"copy": ["export"], "truncate": ["export/vision_tower.pt"]}})])
add("data file", CC, [("train_pairs-missing", ["--train_captions=", "--train_pairs=/nonexistent/p.jsonl"], "/nonexistent/p.jsonl")])
add("data file", CLASSIFY, [("data-missing", "--data=/nonexistent/classes", "/nonexistent/classes"),
                            ("data-no-class-folders", "--data={classes}/val/red", "{classes}/val/red")])
add("data file", PROBE, [("data-missing", "--data=/nonexistent/classes", "/nonexistent/classes"),
                         ("data-no-train-split", "--data={classes}/val", "{classes}/val/train")])

# --- 4. JSONL of the wrong shape (the same files through every script that reads that kind)
for key, base in (("train_captions", CC), ("captions", C2C)):
    add("jsonl shape", base, [
        (f"{key}-{kind}", f"--{key}={{bad[caps_{kind}]}}", f"{{bad[caps_{kind}]}}")
        for kind in ("one_caption", "string", "numbers", "array_line", "invalid_utf8", "surrogate", "nul")])
add("jsonl shape", CC, [("train_pairs-wrong-type", ["--train_captions=", "--train_pairs={bad[pairs_wrong_type]}"],
                         "{bad[pairs_wrong_type]}")])
for key, base in (("manifest", EMBED), ("train_manifest", POST), ("data", RETRIEVAL)):
    add("jsonl shape", base, [  # embed_captions reads no image: a missing image file is not its concern
        (f"{key}-{kind}", f"--{key}={{bad[man_{kind}]}}", f"{{bad[man_{kind}]}}")
        for kind in ("captions_string", "image_number", "invalid_utf8", "surrogate", "nul", "missing_image")
        if not (base is EMBED and kind == "missing_image")])
add("jsonl shape", RETRIEVAL, [("data-5-captions-protocol", ["--data={val}", "--captions_per_image=5"], "{val}")])

# --- 5. odd images: decoding fails naming the image file (in the main process and in loader workers)
for kind in ("truncated", "zero_byte", "bomb", "not_an_image"):  # each record has its own copy: images/<kind>_<i>
    add("image", RETRIEVAL, [(f"image-{kind}", "--data={bad[man_img_%s]}" % kind, "{dir}/images/%s_" % kind)])
    add("image", POST, [(f"image-{kind}", "--train_manifest={bad[man_img_%s]}" % kind, "{dir}/images/%s_" % kind)])
add("image", RETRIEVAL, [("image-truncated-in-worker", ["--data={bad[man_img_truncated]}", "--num_workers=1"],
                          "{dir}/images/truncated_")])
add("image", POST, [("image-truncated-in-worker", ["--train_manifest={bad[man_img_truncated]}", "--num_workers=1"],
                     "{dir}/images/truncated_")])

# --- 6. converter inputs of another format's shape (evaluate.py --task=convert)
add("converter", CONVERT, [
    (f"{fmt}-fed-{src}", [f"--format={fmt}", f"--src={{bad[conv_{src}]}}"] + (["--num=1"] if fmt == "sharegpt4v" else [])
     + (["--lang=de"] if fmt == "xm3600" else []), f"{{bad[conv_{src}]}}")
    for fmt, src in (("karpathy", "sharegpt4v"), ("karpathy", "xm3600"), ("karpathy", "karpathy_images_dict"),
                     ("karpathy", "karpathy_no_sentences"), ("karpathy", "truncated"), ("karpathy", "not_utf8"),
                     ("sharegpt4v", "karpathy"), ("sharegpt4v", "sharegpt4v_dict"),
                     ("sharegpt4v", "sharegpt4v_string_turns"), ("urban1k", "karpathy"), ("urban1k", "empty_folder"),
                     ("docci", "karpathy_indented"), ("docci", "docci_list"), ("docci", "docci_number"),
                     ("xm3600", "karpathy_indented"), ("xm3600", "sharegpt4v"), ("xm3600", "xm3600_caption_string"),
                     ("coco_cn", "karpathy"), ("flickr30k_cn", "karpathy"), ("flickr30k_cn", "empty_folder"),
                     ("flickr30k_cn", "not_utf8"))])
add("converter", CONVERT, [("xm3600-wrong-lang", ["--format=xm3600", "--src={bad[conv_xm3600]}", "--lang=fr"],
                            "{bad[conv_xm3600]}")])

# --- 7. an out_dir that holds another run's results: a fresh run refuses it; a resume never rewrites it
add("out_dir", CC, [("fresh-run-into-another-run", "--out_dir={prev}", "out_dir"),
                    ("resume-with-bad-data", ["--out_dir={prev}", "--resume=True", "--train_captions={bad[caps_nul]}"],
                     "{bad[caps_nul]}")])
add("out_dir", POST, [("fresh-run-into-another-run", "--out_dir={prev}", "out_dir"),
                      ("resume-with-bad-data", ["--out_dir={prev}", "--resume=True", "--train_manifest={bad[man_nul]}"],
                       "{bad[man_nul]}")])
add("out_dir", EMBED, [("fresh-run-into-another-run", "--out_dir={prev}", "out_dir"),
                       ("existing-cache-other-texts", ["--out_dir={case}/cache", "--manifest={val}"], "{case}/cache",
                        {"extra": {"copy": ["cache"]}}),
                       ("existing-cache-bad-manifest", ["--out_dir={case}/cache", "--manifest={bad[man_nul]}"],
                        "{bad[man_nul]}", {"extra": {"copy": ["cache"]}})])
add("out_dir", EXPORT, [("out-is-another-run", "--out={prev}", "out")])
add("out_dir", BENCH_DATA, [("work_dir-unwritable", "--work_dir=/proc/llm2clip", "work_dir")])

# --- 8. disk full while saving (RLIMIT_FSIZE: a write past the limit fails with EFBIG): an OSError naming the file
add("disk full", CONVERT, [("disk-full", ["--format=xm3600", "--src={bad[conv_xm3600]}", "--lang=de",
                                        "--out={case}/out/manifest.jsonl"], "{case}/out/manifest.jsonl", {"fsize": 16})])
add("disk full", RETRIEVAL, [("disk-full", "--out={case}/out/results.json", "{case}/out/results.json", {"fsize": 256})])
add("disk full", CC, [("disk-full", "--out_dir={case}/out", "{case}/out", {"fsize": 64 << 10})])
add("disk full", EMBED, [("disk-full", [], "{case}/out", {"fsize": 1 << 10})])
add("disk full", POST, [("disk-full", [], "{case}/out", {"fsize": 64 << 10})])
add("disk full", EXPORT, [("disk-full", [], "{case}/out/hf", {"fsize": 64 << 10})])

# --- accepted: a BOM + CRLF file and odd but valid images run as their plain versions would
ok = {"rc": 0}
add("accepted", RETRIEVAL, [("accept-bom-crlf", ["--data={bad[man_bom_crlf]}", "--out={case}/out/r.json"], "", ok)] + [
    (f"accept-image-{kind}", ["--data={bad[man_img_%s]}" % kind, "--out={case}/out/r.json"], "", ok)
    for kind in ("grey16", "palette", "cmyk", "grey_alpha")])
add("accepted", C2C, [("accept-bom-crlf", ["--captions={bad[caps_bom_crlf]}", "--out={case}/out/r.json"], "", ok)])
add("accepted", EMBED, [("accept-bom-crlf", "--manifest={bad[man_bom_crlf]}", "", ok)])
add("accepted", CC, [("accept-bom-crlf", "--train_captions={bad[caps_bom_crlf]}", "", ok)])
add("accepted", POST, [("accept-bom-crlf", "--train_manifest={bad[man_bom_crlf]}", "", ok)])
add("accepted", CONVERT, [("accept-xm3600-bom-crlf", ["--format=xm3600", "--src={bad[conv_xm3600_bom_crlf]}",
                                                      "--lang=de", "--out={case}/out/m.jsonl"], "", ok),
                          ("accept-flickr30k_cn-bom-crlf", ["--format=flickr30k_cn", "--src={bad[conv_f30k_bom_crlf]}",
                                                            "--out={case}/out/m.jsonl"], "", ok)])
ACCEPT = [c for c in CASES if c.category == "accepted"]

# Cases that fail today with the fix in a file this suite's owner does not edit (strict: a fix makes them XPASS,
# which fails until the entry is removed). Reproduce one: the case's argv with the world's paths, or
# `ADVERSARIAL_REPORT=/tmp/r.tsv pytest tests/test_adversarial.py -k <id>` (exit status, last stderr line).
XFAIL = {}  # cases whose fix belongs elsewhere, each with where (strict: a fixed case must leave this list)


# -----------------------------------------------------------------------------
# Running the selected cases once per module

def _fmt(s, w, case_dir):
    return s.format_map({**vars(w), "case": case_dir, "prev": os.path.join(case_dir, "prev")})


@pytest.fixture(scope="module")
def results(world, request):
    """{case id: (Result, files before, files after, the name formatted)} for every case selected in this session."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module.__name__ == __name__ and hasattr(item, "callspec") and "case" in item.callspec.params]
    logdir = os.path.join(world.dir, "logs")
    os.makedirs(logdir, exist_ok=True)
    reqs, before, names = [], {}, {}
    for case in selected:
        d = os.path.join(world.dir, "cases", case.id)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(world.prev, os.path.join(d, "prev"))
        for name in case.extra.get("copy", ()):  # a case's own copy of an input it may damage: {case}/<name>
            shutil.copytree(getattr(world, name), os.path.join(d, name))
        for rel in case.extra.get("truncate", ()):  # keep the first half of the file's bytes
            with open(os.path.join(d, rel), "r+b") as f:
                f.truncate(os.path.getsize(os.path.join(d, rel)) // 2)
        before[case.id] = snapshot(d)
        names[case.id] = _fmt(case.name, world, d)
        reqs.append(_request(case.id, [_fmt(a, world, d) for a in case.argv], logdir, case.fsize))
    t0 = time.time()
    if os.environ.get("ADVERSARIAL_SUBPROCESS") == "1":
        got = {r["id"]: run_subprocess(r) for r in reqs}
    else:
        got = run_forked(reqs)
    print(f"{len(reqs)} cases in {time.time() - t0:.1f}s; slowest: " + ", ".join(
        f"{k} {v.wall:.1f}s" for k, v in sorted(got.items(), key=lambda kv: -kv[1].wall)[:5]))
    if os.environ.get("ADVERSARIAL_REPORT"):  # one line per case: exit status and the last stderr line
        with open(os.environ["ADVERSARIAL_REPORT"], "w") as f:
            f.writelines(f"{cid}\t{r.rc}\t{r.wall:.1f}\t{'TB ' if 'Traceback' in r.stderr else ''}{r.last_line}\n"
                         for cid, r in got.items())
    return {cid: (got[cid], before[cid], snapshot(os.path.join(world.dir, "cases", cid)), names[cid]) for cid in got}


PATH_RE = re.compile(r"(?:[\w.~-]*/)+[\w.:{}-]*")  # a path in an error line: /a/b.jsonl:3:, ./x, a/b


def names_input(line, name):
    """Does the error line name `name`? A key as a word outside every path (learning_rate, not
    min_learning_rate, and not inside a folder name); a path as it is."""
    if re.fullmatch(r"\w+", name):
        return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", PATH_RE.sub("<path>", line)) is not None
    return name in line


def _params(cases):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=XFAIL[c.id], strict=True)] if c.id in XFAIL else [])
            for c in cases]


def check(case, results):
    r, before, after, name = results[case.id]
    script = case.argv[0]
    tail = r.stderr[-3000:]
    assert "Traceback" not in r.stderr, f"{script} printed a traceback:\n{tail}"
    assert r.rc == case.rc, f"{script} exited {r.rc}, expected {case.rc}:\n{tail}"
    if case.rc == 2:
        prefix = f"{script}: error: "
        assert r.last_line.startswith(prefix) and names_input(r.last_line[len(prefix):], name), \
            f"the error line does not name {name!r}:\n{r.last_line}"
    bad = changed_files(before, after)
    assert not bad, f"files that existed before the run changed: {bad}"


@pytest.mark.parametrize("case", _params([c for c in CASES if c.category != "accepted"]))
def test_bad_input_is_one_named_line_exit_2(case, results):
    check(case, results)


@pytest.mark.parametrize("case", _params(ACCEPT))
def test_accepted_input_runs(case, results):
    check(case, results)


def test_xfail_entries_name_cases():
    assert set(XFAIL) <= {c.id for c in CASES}, set(XFAIL) - {c.id for c in CASES}


def test_no_input_file_changed(world, results):
    """Every case ran (the results fixture) and none wrote into what it read: data, models, caches, bad files."""
    now = {k: snapshot(getattr(world, k)) for k in ("llm", "cache", "export", "classes")}
    now["data"] = snapshot(os.path.join(world.dir, "data"))
    now["bad"] = snapshot(os.path.join(world.dir, "bad"))
    bad = {k: changed_files(world.inputs[k], now[k]) for k in now}
    assert not any(bad.values()), bad


PARITY = ("cc_finetune-learning_rate-zero", "evaluate-retrieval-model-absolute", "evaluate-convert-disk-full")


@pytest.mark.parametrize("cid", PARITY)
def test_forked_case_matches_a_real_subprocess(world, results, cid):
    """The fork server's result of a case is what `python <script>.py ...` gives: exit status, last line."""
    if cid not in results:
        pytest.skip(f"{cid} not selected")
    case = next(c for c in CASES if c.id == cid)
    d = os.path.join(world.dir, "parity", cid)
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(world.prev, os.path.join(d, "prev"))
    req = _request(f"parity-{cid}", [_fmt(a, world, d) for a in case.argv], os.path.join(world.dir, "logs"), case.fsize)
    real = run_subprocess(req)
    forked = results[cid][0]
    norm = lambda line: line.replace(d, "<case>").replace(os.path.join(world.dir, "cases", cid), "<case>")  # noqa: E731
    assert (real.rc, norm(real.last_line)) == (forked.rc, norm(forked.last_line))
    assert ("Traceback" in real.stderr) == ("Traceback" in forked.stderr)


# -----------------------------------------------------------------------------
# Property tests, in-process: any value of any key, any bytes in a JSONL line

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # the table above runs without it
    hypothesis = None
needs_hypothesis = pytest.mark.skipif(hypothesis is None, reason="pip install hypothesis")
SCRIPTS = ("cc_finetune", "embed_captions", "post_train", "evaluate", "downstream", "bench", "bench_data")
# what each script needs set for its defaults to pass its RELATIONS (the property then changes one key)
BASELINE = {"cc_finetune": ["--train_captions=c.jsonl"], "post_train": ["--train_manifest=m.jsonl"],
            "embed_captions": ["--text_model=m", "--manifest=m.jsonl", "--out_dir=o"]}


def _declared(name):
    import importlib
    m = importlib.import_module(name)
    return m, {k: getattr(m, k) for k in m.config_keys}


def _raw_values():
    return st.one_of(st.sampled_from(["", "0", "-1", "1e309", "-inf", "nan", "1.5", "true", "None", "()", "(1,)", "{}",
                                      "[1, 2]", "'x'", "a,b", "/nonexistent", "./x", "\u00e9", "9" * 30]),
                     st.text(max_size=12), st.integers(-10**6, 10**6).map(str), st.floats().map(repr))


@pytest.mark.parametrize("script", SCRIPTS)
def test_config_keys_are_the_settings_only(script):
    """Every config key is a lower-case setting: no constant imported above the config section."""
    m, defaults = _declared(script)
    assert all(k.islower() for k in defaults), [k for k in defaults if not k.islower()]


@needs_hypothesis
@pytest.mark.parametrize("script", SCRIPTS)
def test_any_value_of_any_key_is_accepted_or_names_the_key(script):
    """configure + the script's declared RULES/RELATIONS: a value is either taken or refused with a ValueError
    naming the key (never a TypeError, never an error blaming nothing)."""
    import common
    m, defaults = _declared(script)
    rules, relations = getattr(m, "RULES", {}), getattr(m, "RELATIONS", ())

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True, database=None)
    @hypothesis.given(key=st.sampled_from(sorted(defaults)), raw=_raw_values())
    def prop(key, raw):
        try:
            cfg = common.configure(defaults, BASELINE.get(script, []) + [f"--{key}={raw}"])
            common.check_config(cfg, rules, relations)
        except ValueError as e:
            assert key in str(e), f"--{key}={raw!r}: {e}"
    prop()


def _jsonl_lines():
    """Caption/manifest lines: mostly JSON of the right or a near shape, sometimes raw bytes; LF or CRLF."""
    text = st.text(st.characters(codec="utf-8"), max_size=8) | st.sampled_from(["", " ", "\ud800", "a\u0000b", "\ufeff"])
    value = st.recursive(st.none() | st.booleans() | st.integers() | text, lambda c: st.lists(c, max_size=3)
                         | st.dictionaries(text, c, max_size=3), max_leaves=6)
    obj = st.fixed_dictionaries({}, optional={"id": value, "captions": st.lists(text, max_size=3) | value,
                                              "long_captions": st.lists(text, max_size=3) | value,
                                              "image": st.sampled_from(["images/train_000000.png", "", "x.png"]) | value})
    line = obj.map(lambda o: json.dumps(o).encode()) | st.binary(max_size=24) | value.map(lambda v: json.dumps(v).encode())
    return st.lists(st.tuples(line, st.sampled_from([b"\n", b"\r\n"])).map(b"".join), min_size=1, max_size=3)


@needs_hypothesis
@pytest.mark.parametrize("reader", ["read_caption_records", "read_manifest"])
def test_any_jsonl_bytes_give_valid_records_or_a_named_error(world, tmp_path, reader):
    """data's readers on arbitrary lines: records whose captions are non-empty strings that encode as UTF-8, or
    a DataError naming the file; nothing else escapes."""
    import data
    path = os.path.join(os.path.dirname(world.train), f"hypothesis_{reader}.jsonl")  # the data folder: images resolve

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @hypothesis.given(lines=_jsonl_lines(), bom=st.booleans())
    def prop(lines, bom):
        with open(path, "wb") as f:
            f.write((b"\xef\xbb\xbf" if bom else b"") + b"".join(lines))
        try:
            records = getattr(data, reader)(path)
        except data.DataError as e:
            assert str(e).startswith(path), e
            return
        for r in records:
            for c in r.get("captions", []) + r.get("long_captions", []):
                assert isinstance(c, str) and c.strip() and c.encode("utf-8") and "\0" not in c
    try:
        prop()
    finally:
        os.remove(path)


def test_odd_but_valid_images_decode_to_their_rgb(world):
    """What the accepted image cases fed the scripts: 8-bit RGB of the right size, 16-bit grey scaled (not clipped)."""
    import numpy as np
    from PIL import Image
    import data
    for kind in ("grey16", "palette", "cmyk", "grey_alpha"):
        img = data.open_image({"image": world.images[kind]})
        assert img.mode == "RGB" and img.size == (32, 32), (kind, img.mode, img.size)
    src = np.asarray(Image.open(world.images["grey16"])).astype(np.int64)
    got = np.asarray(data.open_image({"image": world.images["grey16"]}))[..., 0].astype(np.int64)
    assert np.abs(got - src * 255 // 65535).max() <= 1
