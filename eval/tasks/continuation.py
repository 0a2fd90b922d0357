"""continuation: does the compressed cache still lead the model to write what full KV writes?

Each example is the first `context` tokens of a text; its reference is full KV's greedy continuation of
`new_tokens` tokens, made when the examples are built. Every configuration is then scored on it in two
ways, from one prefill of the prompt:
- teacher-forced through its replayed cache (eval.replay): the NLL of the reference, the KL from full KV's
  next-token distributions, and how often its top token is full KV's;
- greedy generation through its replayed cache: how many tokens it agrees with the reference before it first
  departs from it (`agree_tokens`), and ROUGE-L of its text against the reference's.
The control is full KV on the prompt's last `control_context` tokens only. The score `retained` is measured
on is the KL from full KV (0 for full KV itself): `gain_full` is the control's KL, `gain` the control's KL less
this configuration's, so `retained` = 1 - KL(this) / KL(control), the share of the distance between a short
prompt and the whole one that the configuration closes. (The reference's NLL is a poor score here: full KV's
own greedy text is about as predictable from its last few tokens as from the whole prompt.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from minipythia import Compressor, Prefill

from ..replay import Future, Kept, score_replays
from .base import Example, Task, TextSource, gains, register_task


@torch.inference_mode()
def greedy(model, prefill: Prefill, cache, new_tokens: int) -> list[int]:
    """new_tokens greedy tokens after a prefill, decoding through `cache` (its replay; extended here): the
    first from the prefill's last logits, as minipythia.generate does. The reference and every configuration
    are made by this one function, so that a cache equal to full KV reproduces the reference exactly."""
    token = int(prefill.logits[0, -1].argmax())
    tokens = [token]
    step = torch.empty(1, 1, dtype=torch.long, device=model.embed_in.weight.device)
    while len(tokens) < new_tokens:
        step.fill_(token)
        token = int(model(step, cache=cache)[0, -1].argmax())
        tokens.append(token)
    return tokens


def mean_nll(log_p: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean NLL of targets (T,) under log-probs (T, V), summed in float64 (as the other tasks' NLLs)."""
    return F.nll_loss(log_p, targets, reduction="none").double().mean().item()


def agreement(tokens: list[int], reference: list[int]) -> int:
    """The number of tokens before the first that differs from the reference (all of them if none does)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))


@register_task
@dataclass
class Continuation(Task):
    name = "continuation"
    about = ("full KV's greedy continuation of the prompt: KL from full KV, teacher-forced, and real greedy "
             "generation; retained = 1 - KL(this) / KL(the prompt's last control_context tokens)")
    metrics = (("kl", "KL(full‖this) nats/token", "{:.4f}"), ("top1", "top-1 agreement", "{:.3f}"),
               ("agree_tokens", "greedy tokens before divergence", "{:.1f}"), ("rouge_l", "ROUGE-L F", "{:.3f}"))
    contexts: tuple[int, ...] = ()  # prompt lengths; () = half the trained length, and all of it but the new tokens
    new_tokens: int = 64  # the reference's length, and what every configuration generates
    trials: int = 4  # prompts per context
    control_context: int = 32  # the control sees only the prompt's last tokens

    def validate(self):
        super().validate()
        # The first token comes from the prefill's full-KV logits whatever the compressor: with one token,
        # there would be nothing the compression could change.
        if self.new_tokens < 2:
            raise ValueError(f"continuation: new_tokens must be >= 2, got {self.new_tokens}")
        if self.control_context < 1:
            raise ValueError(f"continuation: control_context must be >= 1, got {self.control_context}")

    def context_lengths(self, model) -> list[int]:
        trained = model.config.max_position_embeddings
        return list(self.contexts) or [trained // 2, trained - self.new_tokens]

    def examples(self, text: TextSource, model) -> list[Example]:
        contexts = self.context_lengths(model)
        for context in contexts:
            if self.control_context >= context:
                raise ValueError(f"continuation: control_context ({self.control_context}) must be shorter than "
                                 f"every context, got a {context}-token one")
            self.check_fits(model, context + self.new_tokens, f"a {context}-token prompt and {self.new_tokens} "
                                                              f"new tokens")
        self.decode = text.tokenizer.decode if text.tokenizer is not None else None  # score() decodes with it
        device = model.embed_in.weight.device
        longest = max(contexts)
        out = []
        for trial in range(self.trials):
            where, text_ids = text.cut(self.name, trial, longest)
            for context in contexts:
                prompt = text_ids[:context]
                prefill = Prefill.record(model, prompt.view(1, -1).to(device))
                reference = greedy(model, prefill, prefill.replay(model, None), self.new_tokens)
                out.append(Example(dict(context=context, trial=trial), prompt, torch.tensor(reference),
                                   self.new_tokens, prompt[-self.control_context :],
                                   dict(prompt_from=where, reference=self.text_of(reference))))
        return out

    def text_of(self, tokens: list[int]) -> str:
        """What ROUGE compares: the decoded text, else the token ids joined by spaces (one 'word' each)."""
        decode = getattr(self, "decode", None)
        return decode(tokens) if decode is not None else " ".join(map(str, tokens))

    @torch.inference_mode()
    def score(self, model, example: Example, configs: list[Compressor]) -> list[dict]:
        device = model.embed_in.weight.device
        targets = example.targets.view(1, -1).to(device)
        reference = example.targets.tolist()
        reference_text = self.text_of(reference)
        full = {}  # full KV's log-probs and top tokens: what the configurations' figures are measured against

        def measure(logits):
            log_p = logits[0].log_softmax(-1)  # (T, V): one example, one batch row
            if not full:  # score_replays measures None (full KV) first
                full.update(log_p=log_p, top1=log_p.argmax(-1))
            kl = (full["log_p"].exp() * (full["log_p"] - log_p)).sum(-1)
            return dict(nll=mean_nll(log_p, targets[0]), kl=kl.double().mean().item(),
                        top1=(log_p.argmax(-1) == full["top1"]).double().mean().item())

        prefill = Prefill.record(model, example.prompt.view(1, -1).to(device))
        full_scores, *forced = score_replays(model, prefill, [None] + configs, targets, measure)
        control = Prefill.record(model, example.control.view(1, -1).to(device))
        control_scores = score_replays(model, control, [None], targets, measure)[0]  # against full KV's

        future = Future(model, prefill, targets)  # the reference continuation, for the oracle
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        generated: list[tuple[Kept, list[int]]] = []  # the tokens of each distinct cache
        records = []
        for config, scores in zip(configs, forced):
            cache = future.replay(config)  # one replayed cache alive at a time
            kept = Kept.of(cache)
            tokens = next((t for other, t in generated if other.same(kept)), None)
            if tokens is None:
                tokens = greedy(model, prefill, cache, self.new_tokens)
                generated.append((kept, tokens))
            del cache
            text = self.text_of(tokens)
            rouge = scorer.score(reference_text, text)["rougeL"].fmeasure
            records.append(dict(scores, nll_full=full_scores["nll"], nll_control=control_scores["nll"],
                                kl_control=control_scores["kl"], agree_tokens=agreement(tokens, reference),
                                rouge_l=rouge, generated=text, generated_ids=tokens,
                                **gains(control_scores["kl"], 0.0, scores["kl"], self.new_tokens)))
        return records
