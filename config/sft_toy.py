# SFT on CPU in minutes: a tiny GPT-2-family model on the toy chat data (python data/toy_chat/make_toy.py), with
# the Tulu chat template of the gpt2 tokenizer and loss on the assistant tokens only.
#   python data/toy_chat/make_toy.py && python train.py config/sft_toy.py
out_dir = "out-sft-toy"
objective = "sft"
dataset = "data/toy_chat/sft.jsonl"
tokenizer = "gpt2"
device = "cpu"
preset = "tiny_gpt2"
block_size = 64
max_seq_length = 64
packing = True
val_fraction = 0.05

batch_size = 16
gradient_accumulation_steps = 1
num_train_epochs = 2
learning_rate = 2e-3
min_lr = 2e-4
lr_schedule = "linear"
warmup_ratio = 0.03
weight_decay = 0.0
eval_interval = 50
eval_iters = 8
log_interval = 10
gradient_log_interval = 0
keep_last_n_checkpoints = 1
