"""What a model costs before it is loaded: its config (no weights, no network), its parameters counted on
the meta device, and the memory and compute of training or running it (calibfuse.plan).

Memory per device, in bytes:
  weights               params x bytes of the dtype (bf16/fp16 2, fp32 4)
  training (mixed)      trainable params x 16 (fp32 weights 4, gradients 4, Adam moments 8), divided
                        over the devices under FSDP, whole on every device under DDP
  activations           tokens x hidden x layers x 34 bytes (bf16, no recomputation; Korthikanti et al.
                        2022) + the LM head's logits, tokens x vocab x 10 (bf16 logits, fp32 softmax and grad)
  KV cache              2 x layers x kv_heads x head_dim x tokens x 2 bytes
Compute: 6 N per trained token, 2 N per generated or scored token (N: parameters less the embedding
table, which is a lookup), at a stated utilisation of the device's peak.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from calibfuse.models.embedded import EMBEDDED_MODELS

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "16-mixed": 2, "bf16-mixed": 2, "32": 4, "32-true": 4}
# Hub ids without a shipped config whose shape is a shipped one's (fine-tunes keep their base's shape)
SAME_SHAPE = {
    "georgesung/llama2_7b_chat_uncensored": "meta-llama/Llama-2-7b-chat-hf",
    "AdaptLLM/medicine-chat": "meta-llama/Llama-2-7b-chat-hf",
    "AdaptLLM/finance-chat": "meta-llama/Llama-2-7b-chat-hf",
    "meta-llama/Llama-2-7b-hf": "meta-llama/Llama-2-7b-chat-hf",
}
GiB = 1024**3  # memory is counted and printed in GiB


def shipped_config(hub_id: str) -> Path | None:
    path = Path(str(resources.files("calibfuse") / "resources" / "model_configs" / (hub_id.replace("/", "--") + ".json")))
    return path if path.is_file() else None


def model_config(name_or_path: str, gguf_file: str | None = None, cache_dir: str = "~/.cache/calibfuse"):
    """The model's transformers config: shipped with calibfuse (the embedded and the paper's models), else
    from an embedded GGUF, a local dir or .gguf, or the local hub cache; never the network."""
    from transformers import AutoConfig, PretrainedConfig

    shipped = shipped_config(SAME_SHAPE.get(name_or_path, name_or_path))  # the embedded models' too: reading a GGUF takes ~20 s
    if shipped is not None:
        values = json.loads(shipped.read_text())
        return AutoConfig.for_model(values.pop("model_type"), **values) if "model_type" in values else PretrainedConfig(**values)
    if name_or_path in EMBEDDED_MODELS:
        from calibfuse.models.loading import ModelSpec, resolve

        source, gguf_file = resolve(ModelSpec(name_or_path, cache_dir=cache_dir))
        return AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return AutoConfig.from_pretrained(str(path.parent if path.is_file() else path), gguf_file=path.name if path.is_file() else gguf_file)
    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except OSError:
        raise FileNotFoundError(
            f"no config for {name_or_path!r} without the network: not embedded, not a local path, not in "
            "calibfuse/resources/model_configs/, not in the local hub cache; expected one of those "
            f"(download its config.json once: hf download {name_or_path} config.json)"
        ) from None


@dataclass
class Size:
    total: int  # distinct parameters (a tied head counted once)
    embedding: int  # the input embedding table
    tied: bool  # the LM head is the embedding table
    layers: int
    hidden: int
    vocab: int
    kv_width: int  # kv_heads x head_dim

    @property
    def compute(self) -> int:
        """Parameters that do a multiply-add per token: all but the embedding lookup (a tied table is the head)."""
        return self.total if self.tied else self.total - self.embedding


def size_of(config, num_layers: int | None = None) -> Size:
    """Parameters of the model `config` describes, cut to its first `num_layers` decoder layers (stage 1
    keeps embeddings, final norm and head), counted on the meta device: nothing is allocated."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = config.__class__.from_dict(config.to_dict())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if num_layers is not None:
        if not 1 <= num_layers <= text.num_hidden_layers:
            raise ValueError(f"num_layers={num_layers}; the model has {text.num_hidden_layers} layers")
        text.num_hidden_layers = num_layers
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[:num_layers]
    classifier = any("SequenceClassification" in a for a in getattr(config, "architectures", None) or [])
    with torch.device("meta"):  # a classifier: Detoxify's BERT with its label head
        model = (AutoModelForSequenceClassification if classifier else AutoModelForCausalLM).from_config(config)
    distinct = {id(p): p for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    head = None if classifier else model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    total = sum(p.numel() for p in distinct.values())
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Size(total, embedding.numel(), tied, text.num_hidden_layers, text.hidden_size, text.vocab_size, heads * head_dim)


def dtype_bytes(dtype: str | None, device: str = "cuda") -> int:
    """Bytes per parameter as calibfuse would load it (`auto`: bf16 on a GPU, on a CPU bf16 where it is native)."""
    if dtype in (None, "auto"):
        from calibfuse.models.loading import cpu_has_native_bf16

        return 2 if str(device) != "cpu" or cpu_has_native_bf16() else 4
    return DTYPE_BYTES[str(dtype).removeprefix("torch.")]


def training_bytes(trainable: int, frozen_bytes: int, strategy: str | None, devices: int) -> int:
    """fp32 weights, gradients and Adam moments of the trainable parameters (16 bytes each), plus frozen weights."""
    state = 16 * trainable
    return (state // max(devices, 1) if strategy and "fsdp" in str(strategy) else state) + frozen_bytes


def activation_bytes(size: Size, tokens: int) -> int:
    return tokens * size.hidden * size.layers * 34 + tokens * size.vocab * 10


def kv_cache_bytes(size: Size, tokens: int, bytes_per: int = 2) -> int:
    return 2 * size.layers * size.kv_width * tokens * bytes_per
