"""Shipped examples for multi-turn episodes (issue 24): a calculator tool and a number-guessing
environment, with their prompt sets in rlhf/data/ (calculator_*.jsonl, guess_*.jsonl)."""
