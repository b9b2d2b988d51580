"""A frozen sentence encoder for APLOT's semantic cost (`ot_embedder`): each response text embedded once.

A tiny reward model's own hidden states may carry little meaning; a sentence encoder such as
all-MiniLM-L6-v2 (the `minilm-l6` preset) gives `S[i,j] = cos(e+_i, e-_j)` from what the texts say. The
embedding is the one sentence-transformers computes for that model: the encoder's last hidden states,
mean-pooled over the attention mask, then L2-normalised (inputs truncated to 256 word pieces, its
`max_seq_length`).
"""

from __future__ import annotations

import torch

from aplot.errors import UserError

MAX_LENGTH = 256


class SentenceEmbedder:
    """Embeds texts with a frozen encoder, each distinct text once per run (cached in memory)."""

    def __init__(self, path: str, batch_size: int = 64, max_length: int = MAX_LENGTH):
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval()
        except (OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"ot_embedder: {path} is not a loadable encoder with its tokenizer ({reason})") from None
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size, self.max_length = batch_size, max_length
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), dim] unit vectors, in float32 on the CPU."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        for start in range(0, len(missing), self.batch_size):
            part = missing[start:start + self.batch_size]
            enc = self.tokenizer(part, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.model.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            for text, vector in zip(part, torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()):
                self.cache[text] = vector
        return torch.stack([self.cache[t] for t in texts])


def response_text(response) -> str:
    """The text a pair's response says: the string, or the content of a conversation's last turn."""
    return response if isinstance(response, str) else response[-1]["content"]
