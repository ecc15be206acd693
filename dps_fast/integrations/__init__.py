"""Integrations with training frameworks (imported on demand: dps_fast.integrations.hf)."""
