"""`evaluate.py --task=c2c` through model.load_text_encoder (skipped until model.py is importable)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import evaluate  # noqa: E402
import metrics  # noqa: E402

torch.set_num_threads(1)
CAPTIONS = [["a dog runs on the grass", "a brown dog running in a park", "dog outside"],
            ["two cats sleep on a sofa", "cats asleep on a couch"],
            ["a red car parked on the street", "a car that is red"],
            ["a bowl of fruit on a table", "fruit in a bowl"],
            ["a man rides a bike", "a person on a bicycle"]]


def test_c2c_cli_errors_before_loading_a_model(tmp_path):
    with pytest.raises(ValueError, match="--task=c2c needs --text_model=PATH and --captions=FILE"):
        evaluate.main(["--task=c2c", "--text_model=x"])
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"id": 1, "captions": ["only one"]}) + "\n")
    with pytest.raises(data.DataError, match=r"c.jsonl:1: expected >= 2 captions per record"):
        evaluate.main(["--task=c2c", "--text_model=x", f"--captions={bad}"])


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    words = sorted({w for caps in CAPTIONS for c in caps for w in c.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    d = str(tmp_path_factory.mktemp("tiny_bert"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    return d


def test_c2c_cli_with_load_text_encoder(tmp_path, tiny_bert, capsys):
    import model
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"id": i, "captions": c}) + "\n" for i, c in enumerate(CAPTIONS)))
    out = tmp_path / "c2c.json"
    got = evaluate.main(["--task=c2c", f"--text_model={tiny_bert}", f"--captions={caps}", f"--out={out}",
                         "--max_length=32", "--batch_size=2"])
    want = metrics.c2c_eval(model.load_text_encoder(tiny_bert), CAPTIONS, max_length=32, batch_size=5)
    assert got == pytest.approx(want) and got["n"] == 5
    saved = json.loads(out.read_text())
    assert {k: saved[k] for k in got} == got and saved["config"]["max_length"] == 32
    printed = capsys.readouterr().out
    assert f"| 5 | {got['c2c_top1']:.1f} | {got['c2c_top1_reverse']:.1f} |" in printed


def test_c2c_scores_a_raw_decoder_causal_when_asked(tmp_path, tiny_models, capsys):
    """--bidirectional=False keeps a raw decoder causal (Table 1's raw LLM row); the
    default (bidirectional) is logged, and the results file records what was used."""
    import model
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"id": i, "captions": c}) + "\n" for i, c in enumerate(CAPTIONS)))
    llm = tiny_models("llama")
    causal = evaluate.main(["--task=c2c", f"--text_model={llm}", f"--captions={caps}", "--bidirectional=False",
                            f"--out={tmp_path / 'causal.json'}"])
    assert "bidirectional=False (set)" in capsys.readouterr().out
    ref = model.load_text_encoder(llm, bidirectional=False)
    assert causal == pytest.approx(metrics.c2c_eval(ref, CAPTIONS, max_length=512))
    ref_q1 = ref.encode([c[0] for c in CAPTIONS])
    bi_q1 = model.load_text_encoder(llm).encode([c[0] for c in CAPTIONS])
    assert (ref_q1 - bi_q1).abs().max() > 1e-3  # the two settings really embed differently
    saved = json.loads((tmp_path / "causal.json").read_text())["text_encoder"]
    assert saved == {"bidirectional": False, "pooling": "mean", "chat_template": "", "instruction": "", "max_length": 512}
    evaluate.main(["--task=c2c", f"--text_model={llm}", f"--captions={caps}"])
    assert "bidirectional=True (default)" in capsys.readouterr().out
