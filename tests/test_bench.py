"""bench.py end to end at toy sizes (config/bench_smoke_cpu.py): every row present with a positive median,
each ratio computed from the printed medians, its floor verdict consistent, the paper's FLOPs arithmetic
right, the two caption batchings giving the same embeddings, and gradient caching using far less memory."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def result():
    return bench.main([os.path.join(ROOT, "config", "bench_smoke_cpu.py")])


def test_table_rows_and_ratios(result, capsys):
    rows = result["rows"]
    assert [r["bench"] for r in rows] == ["a", "a", "b", "c", "c", "c", "d", "d", "d", "d", "d", "d"]
    assert all(r["median"] > 0 for r in rows), rows
    med = [r["median"] for r in rows]
    expected = {1: [med[1] / med[0]],  # (a) cache / vision
                2: [med[2] / med[1]],  # (b) online / cache
                5: [med[5] / med[3], med[5] / med[4]],  # (c) token-budget / fixed, / sorted fixed throughput
                8: [med[8] / med[7], med[8] / med[6]],  # (d) grad cache / plain global, / plain chunk memory
                10: [med[10] / med[9]]}  # (d) grad cache / plain global step time
    for i, r in enumerate(rows):
        got = [x["ratio"] for x in r["ratios"]]
        assert got == pytest.approx(expected.get(i, [])), (i, r)
        for x in r["ratios"]:
            if not x["floor"]:  # a finding without a floor
                assert x["ok"] is None
                continue
            op, floor = x["floor"].split()
            assert x["ok"] == (x["ratio"] <= float(floor) if op == "<=" else x["ratio"] >= float(floor))
    assert [x["floor"] for r in rows for x in r["ratios"]] == ["<= 1.05", ">= 3", ">= 2", "", "<= 0.5", "<= 1.5", ""]
    assert all(r["mfu"] is None for r in rows)  # no MFU on CPU
    bench.print_report(rows, result["info"], result["config"], peak=0.0)
    out = capsys.readouterr().out
    for r in rows:  # the printed table has every row with its median
        assert r["name"] in out and f"{r['median']:.1f}" in out
    env = result["info"]["env"]  # the environment, to judge the numbers by
    assert env["torch"] == torch.__version__ and len(env["load_start"]) == len(env["load_end"]) == 3
    assert f"torch {torch.__version__}" in out and "load average (1, 5, 15 min) at start" in out
    assert result["info"]["adamw"] == "fused"  # post_train's optimizer: fused where torch has it (CPU here)
    ph = result["info"]["phases"]
    assert list(ph) == ["vision", "cache"] and list(ph["cache"]) == ["cache rows", "fwd+bwd", "grad clip", "AdamW", "clamp"]
    assert all(v > 0 for p in ph.values() for v in p.values())


def test_flops_arithmetic(result):
    info = result["info"]
    # ViT-L/14-224: 303.6M matmul weights (24 blocks of width 1024 + patch conv) x 257 tokens, 768-d head
    blocks = 24 * (4 * 1024 * 1024 + 2 * 1024 * 4096)
    vit = 2 * (blocks + 3 * 14 * 14 * 1024) * 257 + 4 * 24 * 257 ** 2 * 1024 + 2 * 1024 * 768
    # Llama-3-8B without embeddings/LM head: 32 x (q,o 4096^2, k,v 4096x1024, 3 MLP 4096x14336), 128 tokens
    llm = 2 * 32 * (2 * 4096 ** 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) * 128 + 4 * 32 * 128 ** 2 * 4096
    assert info["paper_vision_gflops"] == pytest.approx(vit / 1e9)
    assert info["paper_text_gflops"] == pytest.approx(llm / 1e9)
    assert 10.5 < info["paper_ratio"] < 11.5
    assert info["ratio"] == pytest.approx(info["paper_ratio"], rel=0.02)  # the solved caption length matches it
    assert info["scale"] == pytest.approx(info["paper_vision_gflops"] / info["vision_gflops"])


def test_same_embeddings_and_memory(result):
    info = result["info"]
    assert info["embed_diff"] < 1e-4  # all three batchings give the same embeddings
    padded = info["embed_padded"]
    assert min(padded["fixed"], padded["sorted_fixed"]) > padded["sorted"] >= info["embed_tokens"]
    d = [r for r in result["rows"] if r["bench"] == "d"]
    plain_chunk, plain_global, grad_cache = (r["median"] for r in d[:3])
    assert grad_cache < 0.5 * plain_global and plain_chunk < plain_global
    assert set(info["mem_step_ms"]) == {"baseline", "plain_chunk", "plain_global", "grad_cache"}
    assert d[3]["median"] == info["mem_step_ms"]["plain_global"] and d[4]["median"] == info["mem_step_ms"]["grad_cache"]
    assert 0 < d[5]["median"] < info["embed_total_mib"]  # embed_captions.py's rank: its own peak, below the process's


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="unknown config key 'batchsize'"):
        bench.main(["--batchsize=3"])
