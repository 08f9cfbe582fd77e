"""Training loopscope's own looped models: the training loop, held-out evaluation, named
configurations (litgpt-style) and checkpoint export with a model card."""
