"""Knowledge distillation (method `distill`)."""
