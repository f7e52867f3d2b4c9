"""The `peft` config section: parameter-efficient fine-tuning (methods lora, qlora, bitfit)."""

from jaxeff.schema import Section


class PeftConfig(Section):
    pass
