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

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minipythia import Compressor, Prefill
from minipythia.timing import clock

from .nll import nonfinite_nll, token_nll
from .results import append_jsonl, read_jsonl
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


def same_positions(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether two caches of one prefill kept the same entries in every layer, head and batch row."""
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


@torch.inference_mode()
def sliding_window_nlls(model, ids: torch.Tensor, ctx_len: int = 2048, stride: int = 512,
                        compressors: list[Compressor | None] = (None,), desc: str | None = None,
                        seconds: list[float] | None = None) -> list[torch.Tensor]:
    """Per-token NLLs (float32, one per scored token, in order) for each compressor, from shared prefills.

    Windows without a prompt are computed once for all, and so are the targets of compressors whose caches
    kept the same entries (a budget at or above the prompt keeps every entry, as none does). With `seconds`
    (a list of len(compressors)), each compressor's own work (replay, target forward) is added to its entry
    and the shared work split evenly.
    `desc` shows a tqdm bar over the windows.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D LongTensor, got shape {tuple(ids.shape)}")
    compressors = list(compressors)
    device = model.embed_in.weight.device
    ids = ids.to(device).view(1, -1)
    spans = list(windows(ids.size(1), ctx_len, stride))
    nlls: list[list[torch.Tensor]] = [[] for _ in compressors]
    own = [0.0] * len(compressors)
    shared = 0.0
    for begin, end, prompt_len in tqdm(spans, desc=desc, disable=desc is None, unit="win", file=sys.stderr):
        t = clock(device)
        window = ids[:, begin:end]
        if prompt_len == 0:
            if end - begin < 2:  # a last window of one token: nothing to predict it from
                continue
            nll = token_nll(model(window[:, :-1]), window[:, 1:])
            if not torch.isfinite(nll).all():
                raise nonfinite_nll(model, window, f"in the window of tokens {begin}..{end}")
            for per_config in nlls:
                per_config.append(nll)
            shared += clock(device) - t
            continue
        prompt, targets = window[:, :prompt_len], window[:, prompt_len:]
        prefill = Prefill.record(model, prompt)
        first = token_nll(prefill.logits, targets[:, :1])  # the prefill's last logits saw the full KV
        caches = (prefill.replay(model, c) for c in compressors)  # one replayed cache alive at a time
        shared += clock(device) - t
        scored: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (kept positions per layer, NLLs)
        for i, per_config in enumerate(nlls):
            t = clock(device)
            cache = next(caches)
            kept = [cache.positions(layer) for layer in range(cache.num_layers)]
            # Kept entries are copies of the one prefill's, so caches that kept the same positions are the
            # same cache and score the same NLLs (a budget at or above the prompt keeps everything, as none):
            # those are reused, not recomputed.
            nll = next((n for positions, n in scored if same_positions(positions, kept)), None)
            if nll is None:
                nll = first
                if targets.size(1) > 1:  # the other targets, teacher-forced through the compressed cache
                    nll = torch.cat((first, token_nll(model(targets[:, :-1], cache=cache), targets[:, 1:])))
                if not torch.isfinite(nll).all():
                    label = compressors[i].label if compressors[i] is not None else "no compression"
                    raise nonfinite_nll(model, window, f"in the window of tokens {begin}..{end} with {label}")
                scored.append((kept, nll))
            per_config.append(nll)
            own[i] += clock(device) - t
    if seconds is not None:
        for i in range(len(compressors)):
            seconds[i] += own[i] + shared / len(compressors)
    return [torch.cat(n).cpu() if n else torch.empty(0) for n in nlls]


def sliding_window_nll(model, ids: torch.Tensor, ctx_len: int = 2048, stride: int = 512,
                       compressor: Compressor | None = None) -> torch.Tensor:
    """Per-token NLLs (float32, one per scored token, in order): tokens 1 .. n-1 when stride < ctx_len."""
    return sliding_window_nlls(model, ids, ctx_len, stride, [compressor])[0]


# What resuming and reporting read of a PPL record; one without them is quarantined (eval.results).
PPL_RECORD_KEYS = ("book", "model", "dtype", "label", "compressor", "settings", "ctx_len", "stride", "max_tokens",
                   "tokens", "nll_sum")


def record_key(r: dict) -> tuple:
    """What identifies a (book, config) result: reruns skip the keys already in ppl.jsonl."""
    return (r["book"], r["model"], r.get("revision"), r["dtype"], r["label"], r.get("mode", "window"), r["ctx_len"],
            r["stride"], r.get("decode_interval"), r["max_tokens"])


def kept_per_head(compressor: Compressor, num_layers: int, prompt_len: int) -> float:
    """Entries per head a compressor leaves of a prompt_len-token prompt, averaged over layers (the
    cache keeps min(keep_count, length) in each layer): the KV budget of a config, for tables and plots."""
    return sum(min(compressor.keep_count(layer, prompt_len), prompt_len) for layer in range(num_layers)) / num_layers


def run_ppl(model, books: list[tuple[str, str, torch.Tensor]], configs: list[Compressor], meta: dict, ctx_len: int,
            stride: int | None, max_tokens: int | None, path_of, mode: str = "window",
            decode_interval: int | None = None) -> list[dict]:
    """PPL of every (book, config) not yet in its config's jsonl file, appended as each book finishes.

    books: (name, source, ids); meta: model, revision, dtype (in every record and key).
    path_of(config) -> the jsonl file of that config (the sweep's folder of that config).
    Returns the records of all requested pairs, resumed ones included.
    mode: "window" (sliding windows of ctx_len tokens advancing by stride) or "stream" (eval/stream.py: token
    by token, restarting every ctx_len tokens, compressing during decoding every decode_interval; no stride).
    """
    if mode not in ("window", "stream"):
        raise ValueError(f"mode must be 'window' or 'stream', got {mode!r}")
    done = {record_key(r): r for path in dict.fromkeys(path_of(c) for c in configs)
            for r in read_jsonl(path, PPL_RECORD_KEYS)}
    base = dict(meta, mode=mode, ctx_len=ctx_len, stride=stride if mode == "window" else None, max_tokens=max_tokens)
    if mode == "stream":
        base["decode_interval"] = decode_interval
    # What the budget is measured against: the steady-state window prompt (every window after the first), or
    # in a stream the longest context, a whole segment.
    window_prompt = ctx_len - stride if mode == "window" else ctx_len
    budget = {c.label: kept_per_head(c, model.config.num_hidden_layers, window_prompt) for c in configs}
    records = []
    for name, source, ids in books:
        keyed = [(c, record_key(dict(base, book=name, label=c.label))) for c in configs]
        pending = [c for c, key in keyed if key not in done]
        if len(pending) < len(configs):
            paths = {str(path_of(c)) for c, key in keyed if key in done}
            where = paths.pop() if len(paths) == 1 else f"their {len(paths)} result files"
            print(f"{name}: {len(configs) - len(pending)} config(s) already in {where}, skipped", file=sys.stderr)
        seconds = [0.0] * len(pending)
        desc = f"{name} ({pending[0].label})" if len(pending) == 1 else f"{name} ({len(pending)} configs)"
        if not pending:
            results = []
        elif mode == "stream":
            results = stream_nlls(model, ids, ctx_len, pending, decode_interval, desc, seconds)
        else:
            results = sliding_window_nlls(model, ids, ctx_len, stride, pending, desc, seconds)
        fresh = {}
        for c, nll, secs in zip(pending, results, seconds):
            nll_sum = nll.double().sum().item()
            record = dict(base, book=name, source=source, compressor=c.name, settings=c.settings(), label=c.label,
                          book_tokens=ids.numel(), tokens=nll.numel(), nll_sum=nll_sum,
                          ppl=math.exp(nll_sum / nll.numel()), seconds=round(secs, 3),
                          configs_in_pass=len(pending), threads=torch.get_num_threads(),
                          window_prompt=window_prompt, kept_per_head=budget[c.label])
            append_jsonl(path_of(c), record)
            fresh[c.label] = record
        records += [fresh.get(c.label) or done[key] for c, key in keyed]
    return records
