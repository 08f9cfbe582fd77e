"""The bottom layer: loopscope's error type and the atomic file writer every store uses.

Nothing here imports torch or any other part of loopscope, so every layer above may use it.
"""
