"""The interface every task implements, the text tasks cut their examples from, and the one runner.

A task is a dataclass whose fields are its settings (typed and checked as a policy's are:
minipythia.compressors.base.settings_of). It builds deterministic examples from a TextSource and the model
(`examples`), and scores every configuration of a batch on one example (`score`), sharing the prompt's
prefill (eval.replay). Every record a task writes carries:

    task, label, compressor, settings, example (the example's key: context, depth, trial, ...)
    gain_full   nats per scored token that full KV is better than the task's control
    gain        the same for this configuration
    retained    gain / gain_full (1 = as good as full KV, 0 = as if the context were not there; None when
                full KV has no advantage on this example)
    weight      scored tokens: a configuration's retained over many examples is
                sum(weight * gain) / sum(weight * gain_full)

and its own raw metrics. `example_records` gives one record per (example, configuration); the sweep (eval.units)
appends them to the configuration's `<task>.jsonl` as each example finishes, and skips the pairs already there.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from tqdm import tqdm

from minipythia import Compressor, Prefill
from minipythia.compressors.settings import settings_of

from ..nll import retained, token_nll
from ..replay import score_replays
from ..results import read_jsonl

# What resuming and the report read of a task record; one without them is quarantined (eval.results).
TASK_RECORD_KEYS = ("task", "label", "model", "dtype", "example", "gain_full", "gain", "weight")


@dataclass
class TextSource:
    """Token streams (name, ids (n,)) that haystacks, passages and prompts are cut from: the eval's books, or
    text the model sampled itself (sample_text) when there are none."""
    streams: list[tuple[str, torch.Tensor]]
    origin: str  # for reports: where the text came from
    tokenizer: object = None  # encodes the tasks' templates and decodes text for ROUGE

    def stream(self, i: int) -> tuple[str, torch.Tensor]:
        return self.streams[i % len(self.streams)]

    def cut(self, task: str, trial: int, length: int, reserved: int = 0) -> tuple[str, torch.Tensor]:
        """Trial t's `length` tokens (a haystack, a prompt) and their name "stream@start": stream t (cycling),
        at an offset that moves on each time the streams repeat; the last `reserved` tokens of a stream are
        left alone. A one-line ValueError when the stream is too short."""
        name, ids = self.stream(trial)
        start = (trial // len(self.streams)) * length
        if start + length > ids.numel() - reserved:
            raise ValueError(f"{task}: {name} has {ids.numel()} tokens, too few for trial {trial}'s {length} tokens; "
                             f"give longer or more books, or fewer trials")
        return f"{name}@{start}", ids[start : start + length]

    def longest(self) -> int:
        return max(ids.numel() for _, ids in self.streams)


@torch.inference_mode()
def sample_text(model, n_streams: int, length: int, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """n_streams sequences of `length` tokens sampled from the model at temperature 1 (one batched pass, from
    the end-of-text token, seeded): a haystack our own code writes when no book is given."""
    device = model.embed_in.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    start = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    token = torch.full((n_streams, 1), start, dtype=torch.long, device=device)
    cache = model.new_cache(n_streams)
    out = []
    for _ in tqdm(range(length), desc=f"sampling {n_streams} haystack(s)", unit="tok", file=sys.stderr):
        probs = model(token, cache=cache)[:, -1].float().softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator)
        out.append(token)
    ids = torch.cat(out, dim=1).cpu()
    return [(f"sampled-{i}", ids[i]) for i in range(n_streams)]


@dataclass
class Example:
    """One example: the prompt that is compressed, the targets teacher-forced after it (the last `scored` of
    them are scored), and the control prompt that lacks what the task asks for (scored with full KV)."""
    key: dict  # what identifies it in the results, e.g. {"context": 512, "depth": 0.25, "trial": 0}
    prompt: torch.Tensor  # (P,)
    targets: torch.Tensor  # (T,)
    scored: int  # the last `scored` targets are scored
    control: torch.Tensor  # (P',) the control's prompt, with the same targets after it
    info: dict = field(default_factory=dict)  # copied into every record (where the needle is, ...)


@dataclass
class Task:
    name: ClassVar[str]
    about: ClassVar[str] = ""  # what is scored and against which control, for the report
    # The raw metrics the report shows for the task: (record field, column title, format), means over examples
    # (and per `kind`, for records that have one). These are those of the default score().
    metrics: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("nll_full", "NLL, full KV", "{:.3f}"), ("nll", "NLL", "{:.3f}"), ("exact_full", "exact, full KV", "{:.2f}"),
        ("exact", "exact", "{:.2f}"))
    # Two fields of the examples' keys the report draws a heatmap of `retained` (or exact match) over, if any.
    heatmap: ClassVar[tuple[str, str] | None] = None
    seed: int = 0

    def __post_init__(self):
        for setting in settings_of(type(self)):
            setattr(self, setting.name, setting.check(getattr(self, setting.name), self.name))
        self.validate()

    def validate(self):
        """Raises ValueError on settings of the right type the task cannot use (those every task has, here)."""
        if any(c < 1 for c in getattr(self, "contexts", ())):
            raise ValueError(f"{self.name}: contexts must be positive, got {list(self.contexts)}")
        if hasattr(self, "depths") and (not self.depths or any(not 0 <= d <= 1 for d in self.depths)):
            raise ValueError(f"{self.name}: depths must be shares in [0, 1], got {list(self.depths)}")
        if getattr(self, "trials", 1) < 1:
            raise ValueError(f"{self.name}: trials must be >= 1, got {self.trials}")

    def settings(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def examples(self, text: TextSource, model) -> list[Example]:
        """The task's examples, the same for a seed whatever the configurations."""
        raise NotImplementedError

    def check_fits(self, model, length: int, what: str):
        limit = model.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"{self.name}: {what} needs {length} positions, more than the model's {limit} trained "
                             f"ones; give smaller context lengths")

    def score(self, model, example: Example, configs: list[Compressor]) -> list[dict]:
        """The fields of each configuration's record on one example. This default scores the NLL of the
        scored targets through each compressed cache, with exact = every scored target is the greedy token
        (teacher forcing follows greedy decoding for as long as they agree, so this is greedy exact match)."""
        return self._score_rows(model, [example], configs)[0]

    def score_batch(self, model, examples: list[Example], configs: list[Compressor]) -> list[list[dict]]:
        """score() of each example. Examples of one shape (prompt, control, targets, scored) are scored as one
        batch, a row each, when the task scores with the default score(), with the figures of one at a time
        (each row is its own prompt: eval.replay); a task with its own score() scores them one at a time."""
        if type(self).score is not Task.score or len({example_shape(e) for e in examples}) > 1:
            return [self.score(model, e, configs) for e in examples]
        return self._score_rows(model, examples, configs)

    @torch.inference_mode()
    def _score_rows(self, model, examples: list[Example], configs: list[Compressor]) -> list[list[dict]]:
        device = model.embed_in.weight.device
        n = examples[0].scored
        targets = torch.stack([e.targets for e in examples]).to(device)  # (B, T): a row per example
        scored = targets[:, -n:]

        def measure(logits):  # (B, T, V) -> a (mean NLL, exact) per row
            logits = logits[:, -n:]
            return [(token_nll(logits[b : b + 1], scored[b : b + 1]).double().mean().item(),
                     bool((logits[b].argmax(-1) == scored[b]).all())) for b in range(len(examples))]

        control = Prefill.record(model, torch.stack([e.control for e in examples]).to(device))
        controls = score_replays(model, control, [None], targets, measure)[0]
        prefill = Prefill.record(model, torch.stack([e.prompt for e in examples]).to(device))
        full, *results = score_replays(model, prefill, [None] + configs, targets, measure)
        return [[dict(nll=nll, nll_full=full[b][0], nll_control=controls[b][0], exact=exact, exact_full=full[b][1],
                      **gains(controls[b][0], full[b][0], nll, n)) for nll, exact in (r[b] for r in results)]
                for b in range(len(examples))]


def example_shape(e: Example) -> tuple[int, int, int, int]:
    """What examples scored as one batch share: the lengths of prompt, control and targets, and `scored`."""
    return e.prompt.numel(), e.control.numel(), e.targets.numel(), e.scored


def gains(control: float, full: float, this: float, weight: int) -> dict:
    """The common fields of a record from mean NLLs (per scored token) of the control, full KV and this."""
    return dict(gain_full=control - full, gain=control - this, retained=retained(control, full, this), weight=weight)


def record_key(r: dict) -> tuple:
    """What identifies a (task, example, config) result: reruns skip the keys already in <task>.jsonl."""
    return (r["task"], r["model"], r.get("revision"), r["dtype"], r["label"], json.dumps(r["example"], sort_keys=True))


def example_records(task: Task, model, examples: list[Example], configs: list[Compressor], meta: dict
                    ) -> list[list[dict]]:
    """Each configuration's record on each example (meta: model, revision, dtype), from Task.score_batch."""
    return [[dict(meta, task=task.name, label=c.label, compressor=c.name, settings=c.settings(), example=e.key,
                  **e.info, **fields) for c, fields in zip(configs, rows)]
            for e, rows in zip(examples, task.score_batch(model, examples, configs))]


def task_complete(path, task: Task, examples: list[Example], meta: dict, label: str) -> bool:
    """Whether a config's <task>.jsonl holds every example."""
    keys = {record_key(r) for r in read_jsonl(path, TASK_RECORD_KEYS)}
    base = dict(meta, task=task.name, label=label)
    return all(record_key(dict(base, example=e.key)) in keys for e in examples)



TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: makes a task available by its name to sweeps (`tasks:`) and `python -m eval task`."""
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"a task named {cls.name!r} is already registered ({TASKS[cls.name].__qualname__})")
    TASKS[cls.name] = cls
    return cls


def build_task(name: str, settings: dict) -> Task:
    """The one builder of tasks: ValueError naming what is wrong (an unknown task or setting, a bad value)."""
    cls = TASKS.get(name)
    if cls is None:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    known = {s.name for s in settings_of(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"task {name} has no setting {unknown[0]!r}; its settings: {', '.join(sorted(known))}")
    try:
        return cls(**settings)
    except TypeError as e:
        raise ValueError(str(e)) from None
