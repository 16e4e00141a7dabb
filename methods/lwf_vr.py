"""LwF-VR, LwF with vocabulary replay (ZSCL repository's `lwf_vr.sh`, spec §3.3): LwF whose
reference texts are 1000 random token sequences instead of the class prompts.

Each sequence is SOT, 10 token ids drawn uniformly from the vocabulary (torch generator seeded 42),
EOT, zero padding to the tokenizer's context length (the random length shrinks to fit a shorter
context). The official code draws from the whole vocabulary, SOT/EOT ids included, and a random EOT
id moves CLIP's argmax pooling; by default the two special ids are excluded
(`include_special_ids=True` reproduces the quirk). The sequences are fixed for the whole run and
the teacher's features of them are cached per task. Reference images, the independent batch and
DDP behaviour as LwF.
"""
from __future__ import annotations

import torch
from pydantic import Field

from methods.lwf import LwF, LwFHparams


class RandomTextError(ValueError):
    """The tokenizer cannot frame random token sequences (no SOT/EOT ids or too short a context)."""


def random_token_sequences(count: int, length: int, vocab_size: int, context_length: int, sot_id: int, eot_id: int,
                           seed: int, include_special_ids: bool) -> torch.Tensor:
    """(count, context_length) int64: SOT, `length` random ids, EOT, zeros."""
    if context_length < 3:
        raise RandomTextError(f"lwf_vr: context length {context_length} cannot hold SOT, a token and EOT")
    length = min(length, context_length - 2)
    allowed = torch.arange(vocab_size)
    if not include_special_ids:
        allowed = allowed[(allowed != sot_id) & (allowed != eot_id)]
    generator = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (count, length), generator=generator)]
    tokens = torch.zeros(count, context_length, dtype=torch.long)
    tokens[:, 0] = sot_id
    tokens[:, 1:length + 1] = ids
    tokens[:, length + 1] = eot_id
    return tokens


class LwFVRHparams(LwFHparams):
    num_sentences: int = Field(1000, ge=1, description="number of random token sequences used as reference texts (1000)")
    sentence_length: int = Field(10, ge=1, description="random tokens per sequence, between SOT and EOT (10)")
    seed: int = Field(42, description="seed of the random token draw (42)")
    include_special_ids: bool = Field(False, description="draw from the whole vocabulary incl. SOT/EOT ids (official quirk)")


class LwFVR(LwF):
    name = "lwf_vr"
    summary = "LwF whose reference texts are 1000 random token sequences (vocabulary replay)."
    Hparams = LwFVRHparams

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        sot, eot = getattr(tokenizer, "sot_token_id", None), getattr(tokenizer, "eot_token_id", None)
        if sot is None or eot is None:
            raise RandomTextError(f"lwf_vr: tokenizer {type(tokenizer).__name__} has no sot_token_id/eot_token_id; "
                                  f"LwF-VR needs a CLIP BPE tokenizer")
        self._frame = (getattr(tokenizer, "vocab_size", None) or model.token_embedding.num_embeddings,
                       getattr(tokenizer, "context_length", None) or model.context_length, sot, eot)
        self.random_texts = self._draw_random_texts()

    def _draw_random_texts(self) -> torch.Tensor:
        vocab_size, context_length, sot, eot = self._frame
        hp = self.hparams
        return random_token_sequences(hp.num_sentences, hp.sentence_length, vocab_size, context_length,
                                      sot, eot, hp.seed, hp.include_special_ids)

    def set_hparams(self, hparams) -> None:
        super().set_hparams(hparams)
        self.random_texts = self._draw_random_texts()   # deterministic: unchanged unless its fields changed

    def reference_text_tokens(self) -> torch.Tensor:
        return self.random_texts

    def state_dict(self) -> dict:
        return {**super().state_dict(), "random_texts": self.random_texts}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.random_texts = state["random_texts"]
