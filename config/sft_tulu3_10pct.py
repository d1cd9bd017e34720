# Tulu 3 SFT on a 10% subset: the same settings at max length 2048 on the first ~94K conversations, for quick
# ablations before a full run (exec'd on top of sft_tulu3.py's values by listing both files:
#   torchrun --standalone --nproc_per_node=8 train.py config/sft_tulu3.py config/sft_tulu3_10pct.py).
out_dir = "out-sft-tulu3-10pct"
max_seq_length = 2048
block_size = 2048
max_examples = 93_900
