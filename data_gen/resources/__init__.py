"""Bundled input banks (prompts, off-topic subjects, restart phrases) as JSONL package data."""
