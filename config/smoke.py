# Ten steps of a tiny model on CPU: checks that a family trains end to end. Pick the family with --preset:
#   python train.py config/smoke.py --preset=tiny_llama3      (tiny_gpt2 | tiny_llama | tiny_llama3 | tiny_qwen3)
out_dir = "out-smoke"
dataset = "shakespeare_char"
device = "cpu"
preset = "tiny_gpt2"
block_size = 64
batch_size = 4
max_iters = 10
eval_interval = 10
eval_iters = 2
log_interval = 1
gradient_log_interval = 5
warmup_iters = 2
learning_rate = 1e-3
min_lr = 1e-4
keep_last_n_checkpoints = 1
