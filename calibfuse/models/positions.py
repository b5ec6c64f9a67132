"""One rule for positions across tokenizers: character offsets.

A token belongs to the first n characters of a text when it ends at or before character n. So the
tokens that continue a prefix start at the first one ending past it (stage 1's completion labels,
the reference LM's continuation tokens), and a target position reads the calibration model at its
last token ending within the characters the target has read (the fusion head's paired states). At
inference the calibration stream applies the same rule online: it tokenizes exactly the characters
consumed, so its last token is the last one ending within them (calibfuse.fusion.calibration).

Special tokens (BOS) span no characters, (0, 0): they always belong to the prefix.
"""

from __future__ import annotations

import torch


def with_offsets(tokenizer, texts: list[str], **kwargs):
    """`tokenizer(texts)` with each token's (start, end) character span; fast tokenizers only."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} gives no character offsets; expected a fast (Rust) tokenizer")
    return tokenizer(texts, return_offsets_mapping=True, **kwargs)


def first_token_past(offsets, n_chars: int) -> int:
    """Index of the first token ending past character `n_chars` (one that spans characters): where the
    continuation of the first `n_chars` characters starts; len(offsets) when none does."""
    return next((i for i, (start, end) in enumerate(offsets) if end > n_chars and end > start), len(offsets))


def matched_positions(source_offsets: torch.Tensor, source_mask: torch.Tensor, target_offsets: torch.Tensor) -> torch.Tensor:
    """For every target token, the index of the last source token that ends within the characters read
    through it (both right-padded; special tokens end at 0, so a leading BOS is always matched)."""
    source_end = source_offsets[..., 1].masked_fill(source_mask == 0, torch.iinfo(torch.long).max)
    read = (source_end[:, None, :] <= target_offsets[..., 1][:, :, None]).sum(-1)
    return (read - 1).clamp(min=0)
