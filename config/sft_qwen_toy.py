# SFT of a tiny Qwen3-family model on the toy chat data, on CPU in minutes, in Qwen3's own chat template (the qwen3
# tokenizer's default): the toy answers carry no reasoning, so each final reply learns an empty think block first
# (add enable_thinking = False for the no-think rendering, or chat_format = "chatml" for Qwen3-2507's):
#   python data/toy_chat/make_toy.py && python train.py config/sft_qwen_toy.py
out_dir = "out-sft-qwen-toy"
objective = "sft"
dataset = "data/toy_chat/sft.jsonl"
tokenizer = "qwen3"
chat_format = "qwen3"
device = "cpu"
preset = "tiny_qwen3"
block_size = 64
max_seq_length = 64
packing = True
val_fraction = 0.05
batch_size = 16
num_train_epochs = 1
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
