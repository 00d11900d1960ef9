# Stage 1 of the tiny CPU pipeline: a random tiny Llama (pipeline.build_tiny_text_model) on the
# synthetic shapes captions (data.make_synthetic_dataset). A minute on 2 cores; c2c rises visibly.
# The inputs are what `python pipeline.py` writes; the output is a folder of its own, so running this preset
# (e.g. with --objective=mntp) never replaces the pipeline's stage 1 (out-tiny/cc) that its cache was made from.
text_model = "out-tiny/text_model"
train_captions = "out-tiny/data/train_captions.jsonl"
val_captions = "out-tiny/data/val_captions.jsonl"
out_dir = "out-tiny/cc_preset"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0
dtype = "float32"
gradient_checkpointing = False  # tiny activations: recomputing them only costs time
max_length = 96  # BOS + the 38-token instruction + the longest synthetic caption (48 tokens): nothing is cut
batch_size = 32
micro_batch_size = 16  # exercises gradient caching (2 chunks per side)
max_steps = 60
learning_rate = 1e-3  # a random model with few steps needs a larger step than the paper's 2e-4
warmup_steps = 5
log_interval = 10
save_interval = 30
