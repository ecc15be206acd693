"""Integrations with training frameworks, imported on demand: dps_fast.integrations.hf (the
Hugging Face Trainer), dps_fast.integrations.lightning (PyTorch Lightning)."""
