"""Byte-level tokenizer for our own small looped models.

Bytes need no training, no vocabulary file and round-trip any text exactly, which keeps the small
models we train self-contained. Ids 0..255 are the UTF-8 bytes; three specials follow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then ``PAD=256``, ``BOS=257``, ``EOS=258`` (``vocab_size=259``).

    Batches are **right-padded** with PAD (real tokens first, mask True on them) so that position
    ``i`` is the same token position in every row, which is what per-position probes expect. For
    generation, read each row's last real token at ``mask.sum(1) - 1``.
    """

    PAD = 256
    BOS = 257
    EOS = 258
    vocab_size = 259
    name = "byte"

    _SPECIAL_TEXT = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>"}

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` with optional BOS/EOS. Lone surrogates (not valid Unicode
        scalar values) cannot be encoded and raise ``UnicodeEncodeError``."""
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, self.BOS)
        if eos:
            ids.append(self.EOS)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. a sequence cut mid-character) becomes U+FFFD.

        With ``skip_special=False`` specials appear as ``<pad>``, ``<bos>``, ``<eos>``; byte runs
        between them are decoded separately, so a special never merges into a character.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"decode takes one sequence, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        parts: list[str] = []
        run = bytearray()
        for raw in ids:
            i = int(raw)
            if 0 <= i < 256:
                run.append(i)
                continue
            if i not in self._SPECIAL_TEXT:
                raise ValueError(f"id {i} is outside the byte vocabulary 0..{self.vocab_size - 1}")
            if not skip_special:
                parts.append(run.decode("utf-8", errors="replace"))
                run.clear()
                parts.append(self._SPECIAL_TEXT[i])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        bos: bool = True,
        eos: bool = False,
        pad_to: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(ids, mask)``: ``ids`` LongTensor ``[B, L]``, ``mask`` BoolTensor, True
        on real tokens. ``L`` is the longest sequence, or ``pad_to`` if given; a sequence longer
        than ``pad_to`` raises ``ValueError`` rather than being silently truncated."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings; use encode for one string")
        seqs = [self.encode(t, bos=bos, eos=eos) for t in texts]
        longest = max((len(s) for s in seqs), default=0)
        if pad_to is None:
            length = longest
        else:
            if longest > pad_to:
                raise ValueError(
                    f"a sequence has {longest} tokens but pad_to={pad_to}; "
                    "raise pad_to or shorten the text"
                )
            length = pad_to
        ids = torch.full((len(seqs), length), self.PAD, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.bool)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        return ids, mask
