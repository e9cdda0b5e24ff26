"""Evaluation harness for esr-train.

Pure-Python pieces that reproduce the ESR protocol of "Endogenous Resistance to
Activation Steering in Language Models": splitting a response into attempts at
explicit restart language (``eval.attempts``) and the per-condition metrics with
their intervals (``eval.metrics``). Kept free of heavy imports (no torch) so the
metrics can be computed and tested anywhere.
"""
