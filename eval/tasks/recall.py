"""recall: can the compressed cache still give back a passage it was shown?

A passage (from another stream of text, or the same tokens shuffled) is inserted at a depth of a haystack;
its first `cue_tokens` are repeated at the end, and the rest of the passage is teacher-forced after them.
Full KV predicts the rest far better than a control that never saw the passage (the same haystack,
with other haystack tokens in the passage's span): an induction-style copy (Olsson et al. 2022) any model
with induction heads can do, tiny-pg19 included. `gain` is how much better than the control a configuration
predicts it; `retained` the share of full KV's gain it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .base import Example, Task, TextSource, register_task


@register_task
@dataclass
class Recall(Task):
    name = "recall"
    about = ("a passage seen in the haystack, its first tokens repeated at the end: the NLL of the rest, against "
             "the haystack without the passage")
    metrics = (("gain_full", "full KV gain (nats/token)", "{:.3f}"), ("gain", "gain", "{:.3f}"),
               ("exact", "exact", "{:.2f}"))
    heatmap = ("depth", "context")
    contexts: tuple[int, ...] = ()  # haystack lengths with the passage; () = half and all of the trained length
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # where the passage starts, as a share of the haystack
    trials: int = 2  # haystacks (and passages) per (context, depth)
    passage_tokens: int = 64
    cue_tokens: int = 8
    passage: Literal["text", "shuffled"] = "text"  # shuffled: the passage's tokens in a random order
    cue_in_prompt: bool = False  # True: the cue is part of the compressed prompt (query-aware policies see it)

    def validate(self):
        super().validate()
        if not 1 <= self.cue_tokens < self.passage_tokens:
            raise ValueError(f"recall: cue_tokens must be in [1, passage_tokens), got {self.cue_tokens}")

    def context_lengths(self, model) -> list[int]:
        trained = model.config.max_position_embeddings
        return list(self.contexts) or [trained // 2, trained - self.passage_tokens]

    def examples(self, text: TextSource, model) -> list[Example]:
        contexts = self.context_lengths(model)
        for context in contexts:
            if context <= self.passage_tokens:
                raise ValueError(f"recall: a context of {context} tokens cannot hold a {self.passage_tokens}-token "
                                 f"passage; give longer contexts")
            self.check_fits(model, context + self.passage_tokens, f"a {context}-token context and its passage")
        longest = max(contexts)
        out = []
        for trial in range(self.trials):
            hay_name, hay = text.cut(self.name, trial, longest, self.reserved(text))
            source, passage = self.pick_passage(text, trial)
            cue = passage[: self.cue_tokens]
            for context in contexts:
                for depth in self.depths:
                    at = round(depth * (context - self.passage_tokens))
                    rest = context - self.passage_tokens
                    prompt = torch.cat((hay[:at], passage, hay[at:rest]))
                    # The control holds, in the passage's span, the haystack tokens the prompt had no room for,
                    # so that the two differ only there: with the haystack's next tokens appended instead, their
                    # last tokens (which a recent window keeps) would differ too.
                    control = torch.cat((hay[:at], hay[rest:context], hay[at:rest]))
                    targets, scored = passage, self.passage_tokens - self.cue_tokens
                    if self.cue_in_prompt:
                        prompt, control = torch.cat((prompt, cue)), torch.cat((control, cue))
                        targets = passage[self.cue_tokens :]
                    out.append(Example(dict(context=context, depth=depth, trial=trial), prompt, targets, scored,
                                       control, dict(passage_at=at, haystack=hay_name, passage_from=source)))
        return out

    def reserved(self, text: TextSource) -> int:
        """Tokens at the end of a lone stream kept for passages, so that no haystack contains its own passage."""
        return 4 * self.passage_tokens if len(text.streams) == 1 else 0

    def pick_passage(self, text: TextSource, trial: int) -> tuple[str, torch.Tensor]:
        """A passage from the next stream (another book), at a seeded offset; with one stream, from its end."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + trial)
        name, ids = text.stream(trial + 1)
        low = ids.numel() - self.reserved(text) if self.reserved(text) else 0
        if ids.numel() - self.passage_tokens < max(low, 0):
            raise ValueError(f"recall: {name} has too few tokens ({ids.numel()}) for a passage; give more books")
        start = int(torch.randint(low, ids.numel() - self.passage_tokens + 1, (1,), generator=generator))
        passage = ids[start : start + self.passage_tokens]
        if self.passage == "shuffled":
            passage = passage[torch.randperm(self.passage_tokens, generator=generator)]
        return f"{name}@{start}", passage
