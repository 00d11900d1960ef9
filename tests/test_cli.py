"""The top-level scripts as a user meets them: `python <script> -h` lists the config keys and exits 0,
and the import graph stays one-way (a stage script imports no other script; no module imports itself
back through another), so each script can be read, and copied, without the others."""
import ast
import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT

STAGES = ("embed_captions", "cc_finetune", "post_train")  # the training stages: scripts import them, not back


def _scripts():
    """Every top-level .py with a __main__ block, by module name."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        with open(path) as f:
            if 'if __name__ == "__main__"' in f.read():
                out.append(os.path.splitext(os.path.basename(path))[0])
    return out


SCRIPTS = _scripts()


@pytest.fixture(scope="module")
def helps():
    """`python <script> -h` for every script, started together (each spends its seconds importing torch)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    procs = {s: subprocess.Popen([sys.executable, os.path.join(ROOT, f"{s}.py"), "-h"], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for s in SCRIPTS}
    return {s: (p.communicate(timeout=300)[0], p.returncode) for s, p in procs.items()}


def test_every_documented_script_is_found():
    assert set(STAGES) | {"evaluate", "downstream", "bench", "bench_data", "pipeline", "report"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_config_keys_and_exits_0(helps, script):
    text, rc = helps[script]
    assert rc == 0, f"{script}.py -h exited {rc}:\n{text[-2000:]}"
    keys = [ln for ln in text.splitlines() if ln.startswith("  --") and "=" in ln]
    assert "keys (override with --key=value" in text and len(keys) >= 3, f"{script}.py -h:\n{text[-2000:]}"


def _local_imports(name, modules):
    """Top-level modules of this repo that `name`.py imports anywhere (lazy imports in functions too)."""
    with open(os.path.join(ROOT, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & modules - {name}


def test_import_graph_is_one_way():
    modules = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    graph = {m: _local_imports(m, modules) for m in modules}
    for stage in STAGES:
        assert not graph[stage] & set(SCRIPTS), f"{stage}.py imports the script(s) {graph[stage] & set(SCRIPTS)}"

    def cycle_from(m, path):
        if m in path:
            return path[path.index(m):] + [m]
        return next((c for n in sorted(graph[m]) if (c := cycle_from(n, path + [m]))), None)

    for m in sorted(modules):
        cycle = cycle_from(m, [])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_codebase_stays_small_enough_to_read():
    """No top-level file over 900 lines, no stage-script function over 150 (each stage reads top to
    bottom: config, setup, data, model, optimizer, loop, save)."""
    import ast
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        src = open(path).read()
        assert len(src.splitlines()) <= 900, path
        if os.path.basename(path) in ("cc_finetune.py", "embed_captions.py", "post_train.py"):
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, ast.FunctionDef):
                    assert node.end_lineno - node.lineno + 1 <= 150, (path, node.name)
