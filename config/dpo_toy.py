# DPO on CPU in minutes, starting from the toy SFT model (run config/sft_toy.py first): chosen answers are always
# right and rejected ones near misses, so reward accuracy should climb well above 0.5.
#   python train.py config/dpo_toy.py
out_dir = "out-dpo-toy"
objective = "dpo"
dataset = "data/toy_chat/dpo.jsonl"
init_from = "out-sft-toy"
device = "cpu"
max_seq_length = 64
val_fraction = 0.05

dpo_beta = 0.1
dpo_loss_type = "sigmoid"
batch_size = 16
gradient_accumulation_steps = 1
num_train_epochs = 1
learning_rate = 5e-4
min_lr = 0.0
lr_schedule = "linear"
warmup_ratio = 0.1
weight_decay = 0.0
eval_interval = 20
eval_iters = 4
log_interval = 5
gradient_log_interval = 0
keep_last_n_checkpoints = 1
