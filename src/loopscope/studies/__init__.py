"""Whole studies built from the layers below: the architecture ablations, stages of inference
against a feedforward model, adaptive depth, and the bundled demo."""
