# The CPU demo: a small LLaMA-style character-level model (RoPE, RMSNorm, SwiGLU) on Shakespeare's works
# (data/shakespeare_char/prepare.py). Sized to train in a few minutes on 2 CPU cores and reach a val loss under
# 1.8 nats per character on four works it never sees in training.
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
device = "cpu"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
norm = "rmsnorm"
mlp = "swiglu"
pos_encoding = "rope"
bias = False
dropout = 0.0

batch_size = 32
gradient_accumulation_steps = 1
max_iters = 600
eval_interval = 100
eval_iters = 20
log_interval = 20
gradient_log_interval = 100

learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
lr_schedule = "cosine"
beta2 = 0.99
weight_decay = 0.1
