"""Torch reference model: decoder LLM with a static KV cache, vision tower, projectors.

Imports torch; the device runtime (edge_vila top level) never imports this at import time.
"""
