# Stage 1 for Llama-3.2-1B-Instruct, the paper's small text model; same recipe as config/cc_llama3_8b.py.
text_model = "meta-llama/Llama-3.2-1B-Instruct"
bidirectional = True
pooling = "mean"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
gradient_checkpointing = True
instruction = "Given a caption, retrieve a similar relevant caption."
max_length = 512
batch_size = 2048
micro_batch_size = 128  # a 1B model fits larger forward passes
max_steps = -1
learning_rate = 2.5e-4  # paper appendix (the official code: 2e-4, config/cc_official.py)
warmup_steps = 300
temperature = 0.05
out_dir = "out-cc-llama3.2-1b"
