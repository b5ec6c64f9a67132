"""Stage 1's model: the calibration model is the first `num_layers` decoder layers of a pretrained
causal LM, with its token embeddings, final norm and LM head (docs/method.md, stage 1).

The result is an ordinary Hugging Face causal LM of the same class with a smaller
`num_hidden_layers`, so `save_pretrained` / `AutoModelForCausalLM.from_pretrained` round-trip it.
"""

from __future__ import annotations

from torch import nn


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
