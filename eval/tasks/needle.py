"""needle: can the compressed cache still answer a question about a fact hidden in long text?

The needle-in-a-haystack (NIAH) task. A needle is cut into a haystack at a depth, and a question about it
is asked after the prompt; its answer is scored.

    passkey   a number, stated twice (Mohtashami & Jaggi 2023, "Landmark attention")
    multikey  `keys` facts "one of the special magic numbers for KEY is: VALUE", one of them asked (RULER,
              Hsieh et al. 2024); the others are distractors that a policy keeping "some number" keeps too

The control is the same prompt with the asked needle's tokens replaced by as many haystack tokens (those
the prompt had no room for; the distractors stay where they are), so that the two differ only in the
needle's span: `gain` is what the needle is worth to a configuration, `retained` the share of full KV's
worth it keeps. (Appending the haystack instead would change the prompt's last tokens, which a recent
window keeps: StreamingLLM would then gain or lose from the text, not the needle.) Small models cannot
answer, but full KV still predicts the answer better than the control.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Example, Task, TextSource, register_task

KINDS = ("passkey", "multikey")
PASSKEY = " The pass key is {n}. Remember it. {n} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
PASSKEY_ANSWER = " {n}"
FACT = " One of the special magic numbers for {key} is: {value}."
FACT_QUESTION = (" What is the special magic number for {key} mentioned in the provided text? The special magic "
                 "number for {key} mentioned in the provided text is")
FACT_ANSWER = " {value}"
# Plain words, one fact's key each; an example uses `keys` distinct ones.
KEY_WORDS = ("apple", "river", "garden", "window", "candle", "horse", "mountain", "letter", "silver", "forest",
             "bridge", "winter", "castle", "pencil", "ocean", "button", "harbor", "violin", "lantern", "meadow",
             "basket", "thunder", "mirror", "saddle", "orchard", "compass", "blanket", "feather", "kettle", "anchor")


@register_task
@dataclass
class Needle(Task):
    name = "needle"
    about = ("a passkey, or one of several key-value facts, asked after the prompt: the answer's NLL, against the "
             "prompt without the asked needle")
    heatmap = ("depth", "context")
    kinds: tuple[str, ...] = KINDS
    contexts: tuple[int, ...] = ()  # prompt lengths with the needle(s); () = 1/4, 1/2 and all of the trained length
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # where the asked needle starts, as a share of the rest
    trials: int = 2  # haystacks (and needles) per (kind, context, depth)
    keys: int = 4  # multikey: facts in the prompt, one of them asked
    digits: int = 5  # of the pass key and the facts' values
    question_in_prompt: bool = False  # True: the question ends the compressed prompt (query-aware policies see it)

    def validate(self):
        super().validate()
        unknown = [k for k in self.kinds if k not in KINDS]
        if not self.kinds or unknown:
            raise ValueError(f"needle: kinds must be some of {', '.join(KINDS)}, got {list(self.kinds)}")
        if not 1 <= self.digits <= 18:  # 18 digits still fit an int64
            raise ValueError(f"needle: digits must be in [1, 18], got {self.digits}")
        if not 2 <= self.keys <= min(len(KEY_WORDS), 9 * 10 ** (self.digits - 1)):  # distinct keys and values
            raise ValueError(f"needle: keys must be in [2, {len(KEY_WORDS)}] (one asked, the others distractors) "
                             f"and at most the {self.digits}-digit numbers, got {self.keys}")

    def context_lengths(self, model) -> list[int]:
        trained = model.config.max_position_embeddings
        return list(self.contexts) or [trained // 4, trained // 2, trained - 64]

    def examples(self, text: TextSource, model) -> list[Example]:
        if text.tokenizer is None:
            raise ValueError("needle: the needle task needs a tokenizer to encode its templates; give the text one")

        def encode(template: str) -> torch.Tensor:
            return torch.tensor(text.tokenizer.encode(template), dtype=torch.long)

        contexts = self.context_lengths(model)
        for context in contexts:  # the model's positions first: no text can make up for them
            self.check_fits(model, context, f"a {context}-token prompt")
        out = []
        for kind in self.kinds:
            for trial in range(self.trials):
                needle, question, answer, distractors, depths = self.facts(kind, trial, encode)
                hay_name, hay = text.cut(self.name, trial, max(contexts))
                targets = answer if self.question_in_prompt else torch.cat((question, answer))
                fact_tokens = sum(f.numel() for f in distractors) + needle.numel()
                for context in contexts:
                    if context < fact_tokens:
                        raise ValueError(f"needle: a {context}-token context cannot hold the {kind} needle(s) "
                                         f"({fact_tokens} tokens); give longer contexts")
                    self.check_fits(model, context + question.numel() + answer.numel(),
                                    f"a {context}-token {kind} prompt with its question and answer")
                    rest = context - needle.numel()  # the text's tokens that the prompt keeps
                    laid, starts = self.lay_out(hay, distractors, depths, rest, context)
                    for depth in self.depths:
                        at = self.cut(round(depth * rest), starts, distractors)
                        # The control puts the haystack the prompt has no room for where the needle is: the
                        # two differ only there (the same text at the same positions everywhere else).
                        prompt = torch.cat((laid[:at], needle, laid[at:rest]))
                        control = torch.cat((laid[:at], laid[rest:], laid[at:rest]))
                        moved = [s + needle.numel() * (s >= at) for s in starts]  # the distractors in the prompt
                        if self.question_in_prompt:
                            prompt, control = torch.cat((prompt, question)), torch.cat((control, question))
                        info = dict(kind=kind, needle_at=at, needle_tokens=needle.numel(), distractors_at=moved,
                                    answer=text.tokenizer.decode(answer.tolist()).strip(), haystack=hay_name)
                        out.append(Example(dict(kind=kind, context=context, depth=depth, trial=trial), prompt,
                                           targets, answer.numel(), control, info))
        return out

    def facts(self, kind: str, trial: int, encode):
        """Trial t's needle, question and answer ids, and the distractor facts' ids with their depths: the
        same for a (seed, kind, trial) at every context and depth, so that cells differ only by position."""
        generator = torch.Generator().manual_seed((self.seed * 100_003 + trial) * len(KINDS) + KINDS.index(kind))
        low = 10 ** (self.digits - 1)
        if kind == "passkey":
            n = int(torch.randint(low, 10 * low, (1,), generator=generator))
            return (encode(PASSKEY.format(n=n)), encode(PASSKEY_QUESTION), encode(PASSKEY_ANSWER.format(n=n)),
                    [], [])
        words = [KEY_WORDS[i] for i in torch.randperm(len(KEY_WORDS), generator=generator)[: self.keys]]
        values: list[int] = []
        while len(values) < self.keys:  # distinct, so that only the asked fact answers the question
            v = int(torch.randint(low, 10 * low, (1,), generator=generator))
            values += [v] if v not in values else []
        needle, *distractors = [encode(FACT.format(key=k, value=v)) for k, v in zip(words, values)]
        depths = torch.rand(self.keys - 1, generator=generator).sort().values.tolist()
        return (needle, encode(FACT_QUESTION.format(key=words[0])), encode(FACT_ANSWER.format(value=values[0])),
                distractors, depths)

    @staticmethod
    def lay_out(hay: torch.Tensor, facts: list[torch.Tensor], depths: list[float], rest: int, context: int):
        """`context` tokens of haystack with the distractor facts cut in at their depths (in order) within
        the first `rest` tokens, which the prompt keeps (the last ones are pure haystack). Returns them and
        where each fact starts."""
        room = rest - sum(f.numel() for f in facts)  # haystack tokens among the first `rest`
        pieces, starts, used = [], [], 0  # used: haystack tokens laid out so far
        for fact, depth in zip(facts, depths):
            offset = round(depth * room)
            pieces.append(hay[used:offset])
            starts.append(sum(p.numel() for p in pieces))
            pieces.append(fact)
            used = offset
        filled = sum(p.numel() for p in pieces)
        return torch.cat((*pieces, hay[used : used + context - filled])), starts

    @staticmethod
    def cut(at: int, starts: list[int], facts: list[torch.Tensor]) -> int:
        """`at`, or the nearer end of the distractor it falls inside: the asked needle never splits a fact."""
        for start, fact in zip(starts, facts):
            if start < at < start + fact.numel():
                return start if at - start <= start + fact.numel() - at else start + fact.numel()
        return at
