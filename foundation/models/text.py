"""Report encoder: a `transformers` BERT-style encoder, built from a config or a local checkpoint.

Why `transformers`: a maintained implementation with SDPA attention, and a path to start from a
local clinical/French checkpoint (CamemBERT, DrBERT, ...) copied onto the compute side. Nothing
is ever fetched from a hub: from-scratch models are built from a ``BertConfig``, pretrained ones
load with ``local_files_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from transformers import AutoModel, BertConfig, BertModel

from foundation.models.config import config_from_any

# (hidden, layers, heads, intermediate)
_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 2, 128),
    "small": (512, 4, 8, 2048),
    "base": (768, 12, 12, 3072),
}


@dataclass
class TextConfig:
    """Hyperparameters of :class:`TextEncoder` (defaults: BERT-base shape, 8k vocabulary).

    ``vocab_size`` must match the tokenizer (``len(tokenizer)``); ``pad_token_id`` is 0 for the
    tokenizers :func:`foundation.data.tokenizer.train_tokenizer` writes.
    """

    vocab_size: int = 8000
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_length: int = 512
    dropout: float = 0.1
    pad_token_id: int = 0
    pretrained_dir: str | None = None
    freeze: bool = False
    pooling: str = "cls"
    grad_checkpointing: bool = False

    @classmethod
    def preset(cls, name: str, **overrides: object) -> TextConfig:
        """A named size ("tiny", "small", "base") with optional field overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown text preset {name!r}; choose from {sorted(_PRESETS)}")
        hidden, layers, heads, inter = _PRESETS[name]
        base = cls(hidden=hidden, layers=layers, heads=heads, intermediate=inter)
        return replace(base, **overrides)

    @classmethod
    def from_any(cls, value: TextConfig | dict | None) -> TextConfig:
        """Accept a config, a dict of fields (optionally with ``preset``), or None (defaults)."""
        return config_from_any(cls, value, "text")


class TextEncoder(nn.Module):
    """Encode token ids into one vector per report (CLS token or masked mean)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', not {cfg.pooling!r}")
        self.cfg = cfg
        if cfg.pretrained_dir:
            # A local directory only; a missing or incomplete one fails here, not on a hub.
            self.model = AutoModel.from_pretrained(
                cfg.pretrained_dir, local_files_only=True, attn_implementation="sdpa"
            )
        else:
            config = BertConfig(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                intermediate_size=cfg.intermediate,
                max_position_embeddings=cfg.max_length,
                hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout,
                pad_token_id=cfg.pad_token_id,
                attn_implementation="sdpa",
            )
            self.model = BertModel(config, add_pooling_layer=False)
        if cfg.grad_checkpointing:
            self.model.gradient_checkpointing_enable()
        if cfg.freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> TextEncoder:
        # A frozen encoder stays in eval mode (no dropout) whatever the trainer asks.
        super().train(mode)
        if self.cfg.freeze:
            self.model.eval()
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, L)`` ids and mask -> ``(B, hidden)`` pooled features."""
        if input_ids.shape[1] > self.cfg.max_length:  # truncate rather than overflow positions
            input_ids = input_ids[:, : self.cfg.max_length]
            attention_mask = attention_mask[:, : self.cfg.max_length]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)
            hidden = hidden.last_hidden_state  # (B, L, hidden)
            if self.cfg.pooling == "cls":
                return hidden[:, 0]
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    @torch.no_grad()
    def precompute(
        self, input_ids: Tensor, attention_mask: Tensor, batch_size: int = 256
    ) -> Tensor:
        """Pooled features of a whole corpus in chunks, for a frozen encoder (cache once)."""
        was_training = self.training
        self.eval()
        out = [
            self(input_ids[i : i + batch_size], attention_mask[i : i + batch_size])
            for i in range(0, input_ids.shape[0], batch_size)
        ]
        self.train(was_training)
        return torch.cat(out)
