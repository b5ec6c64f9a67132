"""Stage 1's model: the calibration model is the first `num_layers` decoder layers of a pretrained
causal LM, with its token embeddings, final norm and LM head (docs/method.md, stage 1).

The result is an ordinary Hugging Face causal LM of the same class with a smaller
`num_hidden_layers`, so `save_pretrained` / `AutoModelForCausalLM.from_pretrained` round-trip it.
At inference, `CalibrationStream` runs it alongside a target with another tokenizer (stage 3).
"""

from __future__ import annotations

import torch
from torch import nn

from calibfuse.models.lm import final_hidden, positions_from_mask


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, layer list) of the model's stack of decoder layers.

    Families name the stack differently (`model.layers` for Llama/Mistral/Gemma, `transformer.h`
    for GPT-2); what they share is one ModuleList with `num_hidden_layers` entries.
    """
    num_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name:
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name), attribute, module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: expected an nn.ModuleList of num_hidden_layers={num_layers} modules")


def build_calibration_model(base: nn.Module, num_layers: int = 3, reinit_non_embedding: bool = False):
    """Cut `base` (a causal LM) down to its first `num_layers` decoder layers, in place, and return it.

    Embeddings, final norm and LM head are kept with their pretrained weights; so are the kept
    layers unless `reinit_non_embedding` (the reference implementation's switch, off by default).
    """
    parent, attribute, layers = find_decoder_layers(base)
    if not 1 <= num_layers <= len(layers):
        raise ValueError(
            f"num_layers={num_layers} but the base model ({type(base).__name__}) has {len(layers)} decoder layers; expected 1 <= num_layers <= {len(layers)}"
        )
    setattr(parent, attribute, nn.ModuleList(list(layers)[:num_layers]))
    config = base.config
    config.num_hidden_layers = num_layers  # GPT-2 maps this onto n_layer
    # Families with per-layer attention types (Gemma-3: sliding / full) validate the list's length.
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    if reinit_non_embedding:
        for module in getattr(parent, attribute).modules():
            # transformers skips tensors flagged as loaded from a checkpoint; clear the flags first.
            for tensor in [module, *module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if hasattr(tensor, "_is_hf_initialized"):
                    tensor._is_hf_initialized = False
            base._init_weights(module)
    return base


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embedding and LM head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class CalibrationStream:
    """The calibration model's state kept in step with the text the target has consumed, when the
    two tokenizers differ.

    Every step the consumed text is tokenized afresh by the calibration tokenizer; tokens that no
    longer match (a word the target has extended) are masked out of the cache, the new ones are
    appended, and the state is read at the last token, so it covers exactly the consumed characters.
    Masked slots stay in the cache but are invisible, and positions count valid tokens only.
    """

    def __init__(self, model, tokenizer, batch_size: int, device):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.valid_ids: list[list[int]] = [[] for _ in range(batch_size)]  # what each row's cache holds, in order
        self.slots: list[list[int]] = [[] for _ in range(batch_size)]  # cache slot of each valid id
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.cache = None
        self.state: torch.Tensor | None = None

    def advance(self, texts: list[str]) -> torch.Tensor:
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        additions = []
        for row, ids in enumerate(encoded):
            keep = 0
            old = self.valid_ids[row]
            while keep < min(len(old), len(ids)) and old[keep] == ids[keep]:
                keep += 1
            for slot in self.slots[row][keep:]:
                self.mask[row, slot] = 0  # retokenized: these tokens no longer describe the text
            self.valid_ids[row], self.slots[row] = old[:keep], self.slots[row][:keep]
            additions.append(ids[keep:])
        width = max(len(a) for a in additions)
        if width == 0:
            return self.state
        pad = self.tokenizer.pad_token_id
        block = torch.full((len(texts), width), pad, dtype=torch.long, device=self.device)
        block_mask = torch.zeros((len(texts), width), dtype=torch.long, device=self.device)
        start = self.mask.shape[1]
        for row, added in enumerate(additions):  # right-aligned, so every row's newest token is last
            if added:
                block[row, width - len(added) :] = torch.tensor(added, device=self.device)
                block_mask[row, width - len(added) :] = 1
                self.valid_ids[row] += added
                self.slots[row] += list(range(start + width - len(added), start + width))
        self.mask = torch.cat([self.mask, block_mask], dim=1)
        hidden, self.cache = final_hidden(
            self.model,
            input_ids=block,
            attention_mask=self.mask,
            position_ids=positions_from_mask(self.mask)[:, -width:],
            past_key_values=self.cache,
            use_cache=True,
        )
        new_state = hidden[:, -1]
        changed = torch.tensor([bool(a) for a in additions], device=self.device)[:, None]
        self.state = new_state if self.state is None else torch.where(changed, new_state, self.state)
        return self.state
