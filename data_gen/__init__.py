"""Synthetic self-correction transcripts for esr-train (the data stage).

The generator pairs an everyday task prompt with an unrelated subject the answer drifts
into, then an explicit restart phrase ("Wait, that's not right...") and a fresh on-topic
answer. Backends write the text (:mod:`data_gen.backends`), filters keep the usable
transcripts (:mod:`data_gen.filters`), and :mod:`data_gen.builder` writes the dataset
(``datasets.load_from_disk``) with the row schema of :mod:`esr_train.rows`. The prompt,
subject and restart banks it reads live in the core (:mod:`esr_train.banks`).
"""
