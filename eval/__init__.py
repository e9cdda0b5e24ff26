"""Evaluation stage of esr-train: the ESR protocol of "Endogenous Resistance to Activation
Steering in Language Models".

Steered and unsteered trials (:mod:`eval.harness`), the judges that split each response
into attempts and score them (:mod:`eval.offline_judge`, :mod:`eval.llm_judge`), the
per-condition metrics with their intervals (:mod:`eval.metrics`) and the reports
(:mod:`eval.report`). Restart phrases themselves are core text utilities
(:mod:`esr_train.restart_text`).
"""
