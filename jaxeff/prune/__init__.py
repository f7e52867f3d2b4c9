"""Pruning: Sheared-LLaMA structured pruning (``shear``: hard-concrete masks, Lagrangian, extraction)
and unstructured / N:M pruning (magnitude, Wanda)."""
