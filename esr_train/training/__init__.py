"""LoRA fine-tuning: turn structured transcript rows into masked token sequences and train.

``tokenize`` renders each row with the model's own chat template and masks the user prompt
and the distraction, so the adapter learns only to restart and answer, and to stop.
"""
