"""Distillation machinery around models: capturing internals, pairing teacher and student."""
