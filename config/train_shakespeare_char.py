# The CPU demo: a small LLaMA-style character-level model (RoPE, RMSNorm, SwiGLU) on Shakespeare's works
# (data/shakespeare_char/prepare.py). Sized to train in about four minutes on 2 CPU cores and reach a val loss under
# 1.60 nats per character on four works it never sees in training.
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
device = "cpu"

n_layer = 4
n_head = 4
n_embd = 96
block_size = 128
norm = "rmsnorm"
mlp = "swiglu"
pos_encoding = "rope"
bias = False
dropout = 0.0

# Chosen by measuring (docs/benchmarks.md, "The README's main job"): at this budget a narrower model (96 wide,
# 0.46M parameters) that sees more characters beats the earlier 128-wide one, smaller batches (16 rows) take more
# steps for about the same cost per character, and warm-up, a flat learning rate, then a linear decay to zero over
# the last 40% (WSD) ends lower than a cosine to 10%. float32 on CPUs without native bfloat16 (dtype=auto).
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 2000
eval_interval = 500
eval_iters = 40  # 40 x 16 x 128 = 82K characters a split, as many as the earlier 20 x 32 x 128
log_interval = 100
gradient_log_interval = 250

learning_rate = 3e-3
min_lr = 0.0
warmup_iters = 200
lr_schedule = "wsd"
wsd_decay_ratio = 0.4
beta2 = 0.99
weight_decay = 0.1
