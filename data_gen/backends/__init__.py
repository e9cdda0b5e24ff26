"""Transcript backends: each one turns generation jobs into :class:`esr_train.rows.Transcript` rows.

Backends differ in who writes the text (an LLM endpoint, a steered local model, templates),
but all yield validated transcripts with their provenance (``backend``, ``model``, ``seed``),
so the dataset builder can mix them and the trainer never needs to know which one ran.
"""
