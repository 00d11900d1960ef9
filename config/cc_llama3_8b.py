# Stage 1 for Llama-3-8B-Instruct, the paper's main text model: LLM2CLIP paper / docs/DESIGN.md settings.
# torchrun --nproc_per_node=8 cc_finetune.py config/cc_llama3_8b.py --train_captions=cc3m.jsonl,cc12m.jsonl,yfcc15m.jsonl
text_model = "meta-llama/Meta-Llama-3-8B-Instruct"
bidirectional = True
pooling = "mean"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
dtype = "auto"  # bf16 weights + autocast on GPU
gradient_checkpointing = True
instruction = "Given a caption, retrieve a similar relevant caption."
max_length = 512
batch_size = 2048  # global; the official code used 512
micro_batch_size = 32  # per forward on one 80 GB GPU with checkpointing; gradient caching makes up the rest
max_steps = -1  # one epoch
learning_rate = 2.5e-4  # paper appendix (the official code: 2e-4, config/cc_official.py)
warmup_steps = 300
temperature = 0.05  # the official code used 0.02
out_dir = "out-cc-llama3-8b"
log_interval = 10
save_interval = 200
