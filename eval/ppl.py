"""Sliding-window perplexity with a compressed KV cache (the Hugging Face "perplexity of fixed-length models" loop).

Windows of ctx_len tokens advance by stride. In each window the part before the targets is the prompt:
it is prefilled into a fresh cache, which compresses it at the end of the prefill; the prefill's last
logits (computed from the full KV) predict the first target, and the other targets are teacher-forced
through the compressed cache in one forward. A window without a prompt (the first one) is one uncached
forward scoring its tokens 1.. (HF's label shift). With no compressor the per-token NLLs are those of HF.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minipythia import Compressor, Prefill
from minipythia.timing import clock

from .nll import nonfinite_nll, retained, token_nll
from .replay import score_replays
from .stream import stream_nlls


def check_window_args(ctx_len: int | None, stride: int | None):
    """Fails fast on bad windows; None (a default that depends on the model) is checked once it is filled."""
    if ctx_len is not None and ctx_len < 2:
        raise ValueError(f"--ctx-len must be >= 2, got {ctx_len}")
    if stride is not None and not 1 <= stride <= (ctx_len or stride):
        bound = f"in [1, ctx_len={ctx_len}]" if ctx_len else ">= 1"
        raise ValueError(f"--stride must be {bound}, got {stride}")


def default_windows(model, ctx_len: int | None, stride: int | None) -> tuple[int, int]:
    """The windows of every eval command: ctx_len defaults to the model's trained length (at most 2048),
    stride to ctx_len / 4 (2048 / 512 as in the Pythia protocol)."""
    ctx_len = ctx_len or min(2048, model.config.max_position_embeddings)
    stride = stride or ctx_len // 4
    check_window_args(ctx_len, stride)
    return ctx_len, stride


def windows(n: int, ctx_len: int, stride: int):
    """(begin, end, prompt_len) of each window over n tokens; its targets are ids[begin+prompt_len:end]."""
    check_window_args(ctx_len, stride)
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + ctx_len, n)
        yield begin, end, prev_end - begin
        prev_end = end
        if end == n:
            break


@dataclass
class WindowScores:
    """One compressor's scores over a book's windows. `nll`: every scored token, in order. The rest cover the
    tokens predicted through a compressed prompt (windows after the first), in order, when the windows were
    scored against references: this compressor's NLL on them, KL(full KV || this) and whether the top-1 token
    agrees with full KV's; and, shared by all compressors, full KV's NLL and the short-context control's (the
    same targets predicted from only the short_context tokens before the window's targets)."""
    nll: torch.Tensor
    compressed_nll: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    full_nll: torch.Tensor | None = None
    short_nll: torch.Tensor | None = None
    kept_by_head: list[list[float]] | None = None  # head-wise policies: entries per (layer, head), window mean


def window_batches(spans: list[tuple[int, int, int]], batch_windows: int):
    """The windows (begin, end, prompt_len) in order, in runs of consecutive windows of one shape (prompt
    length and number of targets), at most batch_windows long: each run is prefilled as one batch. A window
    without a prompt is a run of its own."""
    def shape(span):  # its prompt length and number of targets
        begin, end, prompt_len = span
        return prompt_len, end - begin - prompt_len

    run: list[tuple[int, int, int]] = []
    for span in spans:
        if run and (len(run) == batch_windows or not run[0][2] or shape(run[0]) != shape(span)):
            yield run
            run = []
        run.append(span)
    if run:
        yield run


def rows_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) -> NLL (B, T): token_nll of each row (one call over the B * T rows
    of logits, which for B = 1 is token_nll's own)."""
    B, T = targets.shape
    return F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T), reduction="none").view(B, T)


def counted(runs, bar):
    """The runs of windows, the bar advanced by a run's windows once it is done (as tqdm over the windows)."""
    for run in runs:
        yield run
        bar.update(len(run))
    bar.close()


@torch.inference_mode()
def sliding_window_scores(model, ids: torch.Tensor, ctx_len: int = 2048, stride: int = 512,
                          compressors: list[Compressor | None] = (None,), desc: str | None = None,
                          seconds: list[float] | None = None, short_context: int | None = None,
                          batch_windows: int = 1) -> list[WindowScores]:
    """Scores of each compressor over sliding windows of ids (1-D), from one prefill per window.

    Windows without a prompt are computed once for all; targets of compressors whose caches kept the same
    entries are computed once (eval.replay). With short_context, every window is also scored by full KV (the
    reference of KL and top-1) and by a short-context control, from the same prefill. With `seconds` (a list
    of len(compressors)), each compressor's own work is added to its entry and the shared work split evenly.
    `desc` shows a tqdm bar over the windows.

    batch_windows: consecutive windows of one shape (all but the first and the last, shorter one) are scored
    up to this many at a time, one batch row each: one prefill, one replay per compressor (each row
    compressed on its own: the caches keep each row's entries apart), one forward of the targets. The logits
    of a batch take batch_windows times the memory. The figures are those of one window at a time, bit for
    bit, where the BLAS rounds each row of a matrix product as it does that row alone: on the CPU measured
    (MKL) it does for products of 12 rows or more per window (tests/test_batch_windows.py), not for fewer.
    Policies whose rows would depend on each other in one cache are replayed a row at a time (eval.replay).
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D LongTensor, got shape {tuple(ids.shape)}")
    if short_context is not None and short_context < 1:
        raise ValueError(f"short_context must be >= 1, got {short_context}")
    if isinstance(batch_windows, bool) or not isinstance(batch_windows, int) or batch_windows < 1:
        raise ValueError(f"batch_windows must be an integer >= 1 (windows scored together), got {batch_windows!r}")
    compressors = list(compressors)
    device = model.embed_in.weight.device
    ids = ids.to(device).view(1, -1)
    spans = list(windows(ids.size(1), ctx_len, stride))
    parts: list[dict[str, list[torch.Tensor]]] = [defaultdict(list) for _ in compressors]
    shared_parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    own = [0.0] * len(compressors)
    shared = 0.0
    per_head, compressed_windows = [None] * len(compressors), 0
    bar = tqdm(total=len(spans), desc=desc, disable=desc is None, unit="win", file=sys.stderr)
    for run in counted(window_batches(spans, batch_windows), bar):
        t = clock(device)
        begin, end, prompt_len = run[0]
        if prompt_len == 0:  # a run of one window
            window = ids[:, begin:end]
            if end - begin < 2:  # a last window of one token: nothing to predict it from
                continue
            nll = token_nll(model(window[:, :-1]), window[:, 1:])
            if not torch.isfinite(nll).all():
                raise nonfinite_nll(model, window, f"in the window of tokens {begin}..{end}")
            for per_config in parts:
                per_config["nll"].append(nll)
            shared += clock(device) - t
            continue
        rows = torch.cat([ids[:, b:e] for b, e, _ in run])  # (B, window): the run's windows, one per row
        prompt, targets = rows[:, :prompt_len], rows[:, prompt_len:]
        prefill = Prefill.record(model, prompt)
        reference = {}

        def measure(logits: torch.Tensor) -> dict[str, torch.Tensor]:  # (B, targets, V)
            # Row by row: a batch's (B, targets, V) temporaries would outgrow the CPU's caches (3x slower).
            rows_scores = [measure_row(b, logits[b]) for b in range(logits.size(0))]
            return {k: torch.stack([r[k] for r in rows_scores]) for k in rows_scores[0]}

        def measure_row(b: int, logits: torch.Tensor) -> dict[str, torch.Tensor]:  # (targets, V)
            log_p = logits.log_softmax(-1)
            scores = dict(nll=-log_p.gather(-1, targets[b, :, None])[:, 0])
            if short_context is not None:
                if b not in reference:  # the first measured is full KV's (None leads the list below)
                    reference[b] = dict(log_p=log_p, p=log_p.exp(), top1=logits.argmax(-1))
                ref = reference[b]
                kl = (ref["p"] * (ref["log_p"] - log_p)).sum(-1)  # p once per window, not per config
                scores.update(kl=kl, top1=logits.argmax(-1) == ref["top1"])
            return scores

        shared += clock(device) - t
        # Full KV leads the list when it is the reference, so that compressors whose caches equal it (none,
        # budgets above the prompt) reuse its forward.
        leading = [None] if short_context is not None else []
        times = [0.0] * (len(leading) + len(compressors))
        heads = [None] * len(leading) + per_head
        results = score_replays(model, prefill, leading + compressors, targets, measure, times, heads)
        # Summed over the run's rows (Kept.per_head): divided by the windows at the end, a mean per window.
        per_head, compressed_windows = heads[len(leading):], compressed_windows + len(run)
        # Every per-token figure is (B, targets): flattened row by row, they come window by window.
        if leading:
            t = clock(device)
            start = max(prompt_len - short_context, 0)  # the control sees the last short_context prompt tokens
            short = rows_nll(model(rows[:, start:-1])[:, prompt_len - start - 1:], targets)
            shared_parts["full_nll"].append(results[0]["nll"].flatten())
            shared_parts["short_nll"].append(short.flatten())
            shared += clock(device) - t + times[0]
        for i, seconds_i in enumerate(times[len(leading):]):
            own[i] += seconds_i
        results = results[len(leading):]
        # Checked in the order of one window at a time (by window, then by compressor): the same first error.
        for row, (b, e, _) in enumerate(run):
            for i, scores in enumerate(results):
                if not torch.isfinite(scores["nll"][row]).all():
                    label = compressors[i].label if compressors[i] is not None else "no compression"
                    raise nonfinite_nll(model, rows[row : row + 1], f"in the window of tokens {b}..{e} with {label}")
        for per_config, scores in zip(parts, results):
            per_config["nll"].append(scores["nll"].flatten())
            if short_context is not None:
                per_config["compressed_nll"].append(scores["nll"].flatten())
                per_config["kl"].append(scores["kl"].flatten())
                per_config["top1"].append(scores["top1"].flatten())
    if seconds is not None:
        for i in range(len(compressors)):
            seconds[i] += own[i] + shared / len(compressors)

    def joined(tensors: list[torch.Tensor], present: bool) -> torch.Tensor | None:
        if not present:
            return None
        return torch.cat(tensors).cpu() if tensors else torch.empty(0)

    has_ref = short_context is not None
    common = {k: joined(shared_parts[k], has_ref) for k in ("full_nll", "short_nll")}
    return [WindowScores(nll=joined(p["nll"], True), compressed_nll=joined(p["compressed_nll"], has_ref),
                         kl=joined(p["kl"], has_ref), top1=joined(p["top1"], has_ref), **common,
                         kept_by_head=None if h is None else (h / compressed_windows).tolist())
            for p, h in zip(parts, per_head)]


def sliding_window_nlls(model, ids: torch.Tensor, ctx_len: int = 2048, stride: int = 512,
                        compressors: list[Compressor | None] = (None,), desc: str | None = None,
                        seconds: list[float] | None = None, batch_windows: int = 1) -> list[torch.Tensor]:
    """Per-token NLLs (float32, one per scored token, in order) for each compressor, from shared prefills
    (batch_windows windows at a time: sliding_window_scores)."""
    return [s.nll for s in sliding_window_scores(model, ids, ctx_len, stride, compressors, desc, seconds,
                                                 batch_windows=batch_windows)]


def sliding_window_nll(model, ids: torch.Tensor, ctx_len: int = 2048, stride: int = 512,
                       compressor: Compressor | None = None) -> torch.Tensor:
    """Per-token NLLs (float32, one per scored token, in order): tokens 1 .. n-1 when stride < ctx_len."""
    return sliding_window_nlls(model, ids, ctx_len, stride, [compressor])[0]


# What resuming and reporting read of a PPL record; one without them is quarantined (eval.results).
PPL_RECORD_KEYS = ("book", "model", "dtype", "label", "compressor", "settings", "ctx_len", "stride", "max_tokens",
                   "tokens", "nll_sum")
# What makes PPL records comparable: within a group of the same model, dtype, windows and truncation only.
PPL_GROUP = ("model", "revision", "dtype", "mode", "decode_interval", "ctx_len", "stride", "max_tokens")


def ppl_groups(records: list[dict]) -> list[list[dict]]:
    """Records split by PPL_GROUP: PPLs are comparable only within a group."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in PPL_GROUP), []).append(r)
    return list(groups.values())


def record_key(r: dict) -> tuple:
    """What identifies a (book, config) result: reruns skip the keys already in ppl.jsonl."""
    return (r["book"], r["model"], r.get("revision"), r["dtype"], r["label"], r.get("mode", "window"), r["ctx_len"],
            r["stride"], r.get("decode_interval"), r["max_tokens"])


def warn_uncompressed(books: list[tuple[str, str, torch.Tensor]], configs: list[Compressor], num_layers: int,
                      ctx_len: int, stride: int | None, mode: str):
    """Warns, before any work, of PPL that compression cannot change: a book of one window (its only window has
    no prompt, so every policy scores it as full KV) and a configuration whose budget holds a whole window prompt.
    The report says the same where it would otherwise show a clean +0.00%."""
    if mode != "window":
        return
    for name, _, ids in books:
        if ids.numel() <= ctx_len:
            print(f"warning: book {name} has {ids.numel()} tokens, one window of ctx_len {ctx_len}: its window has "
                  f"no prompt to compress, so every policy scores it as full KV (give a longer book or a smaller "
                  f"ctx_len)", file=sys.stderr)
    prompt = ctx_len - stride
    for c in configs:
        if c.name != "none" and kept_per_head(c, num_layers, prompt) >= prompt:
            print(f"warning: {c.label} keeps every entry of a {prompt}-token window prompt: it compresses nothing "
                  f"here (a budget below {prompt}, or a larger ctx_len - stride, would)", file=sys.stderr)


def compressed_nothing(record: dict) -> str | None:
    """Why a PPL record's tokens were all predicted through an uncompressed prompt, or None: a book of one window
    (window mode), or a budget that holds the whole window prompt."""
    if record.get("mode", "window") == "window" and record.get("book_tokens", record["ctx_len"] + 1) <= \
            record["ctx_len"]:
        return "book shorter than one window"
    if record.get("kept_per_head") is not None and record["kept_per_head"] >= record.get("window_prompt", 1 << 62):
        return "budget holds the whole prompt"
    return None


def kept_per_head(compressor: Compressor, num_layers: int, prompt_len: int) -> float:
    """Entries per head a compressor leaves of a prompt_len-token prompt, averaged over layers (the
    cache keeps min(keep_count, length) in each layer): the KV budget of a config, for tables and plots."""
    return sum(min(compressor.keep_count(layer, prompt_len), prompt_len) for layer in range(num_layers)) / num_layers


# LongPPL's key tokens (Fang et al. 2024, arXiv 2410.23771): those whose log-probability the long context
# raises by more than 2 nats over a short one, and that the long-context model predicts with log p > -2.
KEY_TOKEN_GAIN = 2.0
KEY_TOKEN_LOG_P = -2.0


def key_tokens(s: WindowScores) -> torch.Tensor:
    """Which of the tokens predicted through a compressed prompt are key tokens (LongPPL's criterion above)."""
    return (s.short_nll - s.full_nll > KEY_TOKEN_GAIN) & (-s.full_nll > KEY_TOKEN_LOG_P)


def reference_fields(s: WindowScores) -> dict:
    """What a PPL record says beyond the PPL, over the tokens predicted through a compressed prompt:
    KL(full KV || this) and top-1 agreement with full KV (means), and `retained`, the share of the long
    context's advantage over the short-context control this config keeps,
    (short - this) / (short - full) on summed NLLs, also on the key tokens alone. `gain_full` and `gain`:
    nats per token better than the control, with full KV and with this config (the tasks' common fields)."""
    n = s.compressed_nll.numel()
    key = key_tokens(s)
    sums = {name: t.double().sum().item() for name, t in (("this", s.compressed_nll), ("full", s.full_nll),
                                                           ("short", s.short_nll))}
    keys = {name: t[key].double().sum().item() for name, t in (("this", s.compressed_nll), ("full", s.full_nll),
                                                                ("short", s.short_nll))}
    return dict(compressed_tokens=n, kl=s.kl.double().mean().item() if n else 0.0,
                top1=s.top1.double().mean().item() if n else 1.0,
                nll_compressed_sum=sums["this"], nll_full_sum=sums["full"], nll_short_sum=sums["short"],
                gain_full=(sums["short"] - sums["full"]) / n if n else 0.0,
                gain=(sums["short"] - sums["this"]) / n if n else 0.0, weight=n,
                retained=retained(sums["short"], sums["full"], sums["this"]),
                key_tokens=int(key.sum()), key_nll_sum=keys["this"], key_nll_full_sum=keys["full"],
                key_nll_short_sum=keys["short"], retained_key=retained(keys["short"], keys["full"], keys["this"]))


def scored_per_window(n: int, ctx_len: int, stride: int) -> list[tuple[int, bool]]:
    """(tokens scored, whether through a compressed prompt) of each window over n tokens, in order, as
    sliding_window_scores scores them: the first window all but its first token (none when it has one token),
    each later one the tokens after its prompt."""
    return [(end - begin - 1, False) if prompt_len == 0 else (end - begin - prompt_len, True)
            for begin, end, prompt_len in windows(n, ctx_len, stride) if prompt_len or end - begin >= 2]


def window_sums(s: WindowScores, scored: list[tuple[int, bool]]) -> dict[str, list[float]]:
    """The record's figures per window, the units eval.summary's intervals resample: `tokens` and `nll` summed
    over each window's scored tokens; with references, per window the sums reference_fields makes over all of
    them (`compressed_tokens`, and every sum, 0 for the window without a prompt)."""
    def per_window(t: torch.Tensor, counts: list[int]) -> list[float]:
        return [x.double().sum().item() for x in t.split(counts)]

    tokens = [n for n, _ in scored]
    sums = dict(tokens=tokens, nll=per_window(s.nll, tokens))
    if s.compressed_nll is None:
        return sums
    compressed = [n if through_prompt else 0 for n, through_prompt in scored]
    key = key_tokens(s)
    fields = dict(nll_compressed=s.compressed_nll, nll_full=s.full_nll, nll_short=s.short_nll, kl=s.kl, top1=s.top1,
                  key_tokens=key, key_nll=s.compressed_nll * key, key_nll_full=s.full_nll * key,
                  key_nll_short=s.short_nll * key)
    sums["compressed_tokens"] = compressed
    for name, t in fields.items():
        values = iter(per_window(t.double(), [n for n in compressed if n]))
        sums[name] = [next(values) if n else 0.0 for n in compressed]
    return sums


def ppl_base(meta: dict, mode: str, ctx_len: int, stride: int | None, max_tokens: int | None,
             decode_interval: int | None = None) -> dict:
    """What every PPL record of a setup holds and its key reads: meta (model, revision, dtype) and the windows."""
    if mode not in ("window", "stream"):
        raise ValueError(f"mode must be 'window' or 'stream', got {mode!r}")
    base = dict(meta, mode=mode, ctx_len=ctx_len, stride=stride if mode == "window" else None, max_tokens=max_tokens)
    return dict(base, decode_interval=decode_interval) if mode == "stream" else base


def book_records(model, name: str, source: str, ids: torch.Tensor, configs: list[Compressor], base: dict,
                 ctx_len: int, stride: int | None, mode: str = "window", decode_interval: int | None = None,
                 short_context: int | None = None, batch_windows: int = 1) -> tuple[list[dict], list[float]]:
    """The PPL record of each config on one book (base: ppl_base's), and the seconds each took (shared work
    split evenly). Records hold results only, so that the same work gives the same record wherever it ran."""
    window_prompt = ctx_len - stride if mode == "window" else ctx_len
    seconds = [0.0] * len(configs)
    desc = f"{name} ({configs[0].label})" if len(configs) == 1 else f"{name} ({len(configs)} configs)"
    if mode == "stream":
        results = stream_nlls(model, ids, ctx_len, configs, decode_interval, desc, seconds)
    else:
        results = sliding_window_scores(model, ids, ctx_len, stride, configs, desc, seconds, short_context,
                                        batch_windows=batch_windows)
    records = []
    for c, scores in zip(configs, results):
        nll = scores if mode == "stream" else scores.nll
        nll_sum = nll.double().sum().item()
        # What the budget is measured against: the steady-state window prompt (every window after the first),
        # or in a stream the longest context, a whole segment.
        record = dict(base, book=name, source=source, compressor=c.name, settings=c.settings(), label=c.label,
                      book_tokens=ids.numel(), tokens=nll.numel(), nll_sum=nll_sum, ppl=math.exp(nll_sum / nll.numel()),
                      window_prompt=window_prompt,
                      kept_per_head=kept_per_head(c, model.config.num_hidden_layers, window_prompt))
        if mode == "window" and short_context is not None:
            record.update(reference_fields(scores), short_context=short_context)
        if mode == "window":
            record["windows"] = window_sums(scores, scored_per_window(ids.numel(), ctx_len, stride))
        if mode == "window" and scores.kept_by_head is not None:
            record["kept_by_head"] = [[round(x, 2) for x in row] for row in scores.kept_by_head]
        records.append(record)
    return records, seconds
