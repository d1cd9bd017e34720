"""The data side: what turns text into the token ids training reads. Token bins and their batches (bins), tokenizers,
the preparation of bins from a corpus (prepare), record readers shared by every tool (records), chat formats and
SFT/DPO data sets (chat, chat_data), and the demo corpus (corpus, fetch)."""
