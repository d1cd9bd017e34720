# Tulu 3 DPO on a 10% subset of the preference mixture, for quick ablations:
#   torchrun --standalone --nproc_per_node=8 train.py config/dpo_tulu3.py config/dpo_tulu_10pct.py
out_dir = "out-dpo-tulu3-10pct"
max_examples = 27_300
