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

# Small batches, many steps: at this size a step of 8 rows costs about as much per token as one of 32 (the two CPU
# cores stay busy), and four times the updates reach a lower loss in the same time. The schedule is warm-up, a flat
# learning rate, then a linear decay to zero over the last 40% (WSD). Measured side by side in
# docs/benchmarks.md ("The README's main job"): val 1.575 at step 3000 against 1.686 for the earlier batch-32,
# 600-step cosine run, in no more wall time.
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 2600
eval_interval = 500
eval_iters = 20
log_interval = 100
gradient_log_interval = 250

learning_rate = 3e-3
min_lr = 0.0
warmup_iters = 200
lr_schedule = "wsd"
wsd_decay_ratio = 0.4
beta2 = 0.99
weight_decay = 0.1
