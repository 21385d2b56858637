"""Adaptation: which parameters train (rules), low-rank updates (LoRA, DoRA, QLoRA over NF4),
adapters, prefixes and prompts, EWC and rehearsal, and PEFT export. See config.py for the keys."""
