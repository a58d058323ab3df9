"""Task evaluation of model folders: generation metrics, the evaluate runner, the lm-eval bridge."""
