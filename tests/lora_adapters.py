"""PEFT LoRA adapters for the tests: random ones saved as PEFT saves them, and PEFT's own generate() with one, the
reference that served adapters must equal."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

MAX_NEW_TOKENS = 10


def save_adapter(
    base: torch.nn.Module, folder: Path, rank: int, alpha: int, targets: list[str], seed: int, **extra: object
) -> Path:
    """A random PEFT LoRA adapter of `base` (B nonzero, as after training), saved as PEFT saves one."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
    adapted = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # large enough to move the tiny model's greedy choices
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.mul_(4)
    adapted.save_pretrained(folder)
    return folder


def peft_generate(base: torch.nn.Module, adapter: Path | None, prompt: list[int], **kwargs: object) -> list[int]:
    """The reference: PEFT's model (or the plain base) generating for this request alone."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval() if adapter is not None else base
    if "seed" in kwargs:
        torch.manual_seed(kwargs.pop("seed"))
    with torch.inference_mode():
        output = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, eos_token_id=[], pad_token_id=0, **kwargs
        )
    return output[0, len(prompt) :].tolist()
