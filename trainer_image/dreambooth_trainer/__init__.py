"""DreamBooth trainer: diffusers' train_dreambooth(_lora).py behaviour with exact, preemption-safe resume."""

__version__ = "0.2.0"
