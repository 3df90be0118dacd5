"""Training: the fine-tuning recipe for the served ResNeSt (python -m train --help)."""
