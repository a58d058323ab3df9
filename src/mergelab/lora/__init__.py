"""PEFT LoRA adapters in and out: adapters as merge inputs (``adapted``) and extraction from a fine-tune
(``extract``), both in peft's on-disk format (``peft_format``)."""
