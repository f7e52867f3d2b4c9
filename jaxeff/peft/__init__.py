"""Parameter-efficient fine-tuning: LoRA, QLoRA, BitFit (methods `lora`, `qlora`, `bitfit`)."""
