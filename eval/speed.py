"""Speed and memory of greedy generation with and without KV-cache compression, measured in one run.

Definitions (the same for every config, so ratios within a run are what to compare):
- TTFT: the prefill with `last_only=True` (compression included, as it runs at the end of the prefill)
  plus the argmax of the first token.
- compression: the time spent in `KVCache.compress` (scoring, top-k, gather) inside that same prefill,
  timed directly (`cache.compress_seconds`), not as a difference of two noisy prefills.
- TPOT: per repeat, the median time of one decode step (forward of one token + argmax) after WARMUP_STEPS
  steps; tokens/s = 1000 / TPOT in ms (decode throughput).
- a row's TTFT, compress and TPOT: the mean over its repeats; each repeat's figure is kept too
  (`ttft_runs_ms`, `compress_runs_ms`, `tpot_runs_ms`), so that `speed_estimates` gives their 95% intervals.
- KV bytes: what the cache's tensors hold after the prefill before compression, after it, and at the end.
- peak RSS: the process's peak resident memory during the run (model weights included): Linux resets
  the peak (VmHWM) before each run; elsewhere it is the process's peak so far (getrusage).
- transformers (speed.hf): `generate` (greedy) on the same checkpoint, prompt, dtype and new tokens; TTFT is a
  max_new_tokens=1 call; TPOT the median interval between the calls of a LogitsProcessor, which
  `generate` runs once per token, after the same warm-up.

Protocol (`measure`): at each prompt length, every config first runs once unmeasured (a short generation), so
that the first measured run pays no warm-up (thread pool, allocator, the first use of a shape); then each repeat
runs every config once, interleaved, so that drift of the machine hits all of them alike, starting one config
further each repeat, so that none is always first. A compressed row's `reference` is the no-compression row of
the same run: its repeats ran beside this row's, so ratios are paired by repeat.
"""

from __future__ import annotations

import ctypes
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from minipythia import Compressor, Generation, generate
from minipythia.generate import WARMUP_STEPS
from minipythia.timing import clock

from .results import read_jsonl
from .stats import Estimate, estimate, mean_of, ratio

# What a speed row of a compressed configuration keeps of the no-compression row measured with it, its
# `reference` (the tokens are left out).
REFERENCE_KEYS = ("ttft_ms", "compress_ms", "tpot_ms", "tok_s", "kv_prefill_bytes", "kv_compressed_bytes",
                  "kv_end_bytes", "kept_after_prefill", "peak_rss_mib")
# Each repeat's figures, in the row and in its reference (rows of older runs lack them; eval.speed.speed_estimates
# then gives no interval).
RUN_KEYS = ("ttft_runs_ms", "compress_runs_ms", "tpot_runs_ms")


# What the report reads of a speed row; one without them is quarantined (eval.results).
SPEED_ROW_KEYS = ("engine", "label", "compressor", "settings", "prompt_len", "run", "ttft_ms", "tpot_ms", "tok_s",
                  "peak_rss_mib")


def complete_speed_rows(folder: Path, lengths: list[int]) -> list[dict]:
    """The rows in folder/speed.jsonl of the latest run that measured every prompt length (none when no run did)."""
    runs: dict[str, list[dict]] = {}
    for r in read_jsonl(folder / "speed.jsonl", SPEED_ROW_KEYS):
        runs.setdefault(r["run"], []).append(r)
    complete = [rows for rows in runs.values() if {r["prompt_len"] for r in rows} >= set(lengths)]
    return complete[-1] if complete else []


def reset_peak_rss() -> bool:
    """Linux lets a process reset its peak RSS (VmHWM), so that each run's peak is its own. Memory freed
    earlier (the PPL part's logits, say) is first handed back to the system, else it would count."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident memory since the last reset_peak_rss(), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**20 if sys.platform == "darwin" else 2**10)


def timed_run(model, prompt: torch.Tensor, compressor: Compressor | None, new_tokens: int):
    """One greedy generation of new_tokens (every figure is in the Generation) and its peak RSS."""
    reset_peak_rss()
    with warnings.catch_warnings():  # past 2048 positions quality drops, not speed: the warning is noise here
        warnings.simplefilter("ignore")
        result = generate(model, prompt, new_tokens, compressor=compressor)
    return result, peak_rss_mib()


def summarize(runs: list[tuple[Generation, float]]) -> dict:
    """A config's row from its repeats: each repeat's TTFT, compression and TPOT (the median step of that
    repeat), and their means over the repeats."""
    ttft = [1e3 * g.ttft_s for g, _ in runs]
    compress = [1e3 * g.compress_s for g, _ in runs]
    tpot = [1e3 * statistics.median(g.step_s[WARMUP_STEPS:]) for g, _ in runs]
    last = runs[-1][0]
    return dict(ttft_ms=statistics.fmean(ttft), compress_ms=statistics.fmean(compress),
                tpot_ms=statistics.fmean(tpot), tok_s=1e3 / statistics.fmean(tpot),
                ttft_runs_ms=ttft, compress_runs_ms=compress, tpot_runs_ms=tpot,
                kv_prefill_bytes=last.kv_bytes_prefill,
                kv_compressed_bytes=last.kv_bytes_compressed, kv_end_bytes=last.kv_bytes_end,
                kept_after_prefill=last.kept_after_prefill, peak_rss_mib=round(max(p for _, p in runs), 1),
                tokens=last.tokens, deterministic=all(g.tokens == last.tokens for g, _ in runs))


def speed_estimates(row: dict) -> dict[str, Estimate]:
    """The figures of a speed row with their 95% intervals over its repeats (eval.stats): `ttft_ms`,
    `compress_ms`, `tpot_ms` (the mean over repeats) and, for a row with a `reference` measured in the same
    repeats, `ttft_ratio` and `tpot_ratio`: the sum over repeats of this row's figure / the sum of the
    reference's, i.e. the ratio of their means, each resample drawing the same repeats for both sides (paired:
    a slow moment of the machine slows both). The ratio of sums rather than the mean of per-repeat ratios:
    it is the ratio of the row's own figures, as the table shows them, and one repeat with a small reference
    cannot dominate it. Empty for a row of an older run, which kept no per-repeat figures."""
    out = {}
    reference = row.get("reference") or {}
    for key in ("ttft", "compress", "tpot"):
        runs = row.get(f"{key}_runs_ms")
        if not runs:
            continue
        value = mean_of(runs)
        if value is not None:
            out[f"{key}_ms"] = value
        reference_runs = reference.get(f"{key}_runs_ms")
        if key != "compress" and reference_runs and len(reference_runs) == len(runs):  # (none compresses nothing)
            paired = estimate(np.stack((runs, reference_runs), axis=1), ratio)
            if paired is not None:
                out[f"{key}_ratio"] = paired
    return out


def check_speed_args(new_tokens: int, repeats: int):
    warmup = WARMUP_STEPS
    if new_tokens < warmup + 2:
        raise ValueError(f"--new-tokens must be >= {warmup + 2} (the first token, {warmup} warm-up steps, "
                         f"at least one timed step), got {new_tokens}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")


def measure(model, prompts: dict[int, torch.Tensor], configs: list[Compressor], new_tokens: int, repeats: int,
            on_result=None) -> list[dict]:
    """For each prompt length and config: the summary of `repeats` runs. prompts: length -> ids (L,).
    At each length, every config warms up once (unmeasured), then each repeat runs them all, the starting
    config rotating from repeat to repeat (the module's docstring says why)."""
    check_speed_args(new_tokens, repeats)
    device = model.embed_in.weight.device
    results = []
    for length, ids in prompts.items():
        prompt = ids.to(device).view(1, -1)
        for c in configs:  # warm-up: the first run at a length is slower (allocator, thread pool, new shapes)
            timed_run(model, prompt, c, WARMUP_STEPS + 2)
        runs = {c.label: [] for c in configs}
        for repeat in range(repeats):
            start = repeat % len(configs)
            for c in configs[start:] + configs[:start]:
                runs[c.label].append(timed_run(model, prompt, c, new_tokens))
        for c in configs:
            row = dict(engine="minipythia", compressor=c.name, settings=c.settings(), label=c.label,
                       prompt_len=length, **summarize(runs[c.label]))
            results.append(row)
            if on_result:
                on_result(row)
    return results


def load_hf(directory, dtype: torch.dtype):
    """transformers' GPTNeoXForCausalLM on the same checkpoint, or None when transformers is missing."""
    try:
        import transformers
        from transformers import GPTNeoXForCausalLM
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return GPTNeoXForCausalLM.from_pretrained(str(directory), **{dtype_kw: dtype}).eval()


@torch.inference_mode()
def measure_hf(hf, prompts: dict[int, torch.Tensor], new_tokens: int, repeats: int,
               on_result=None) -> list[dict]:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(clock(scores.device))
            return scores

    eos = hf.config.eos_token_id if hf.config.eos_token_id is not None else 0

    def hf_generate(prompt, n, processors=()):
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=eos, logits_processor=LogitsProcessorList(processors))

    results = []
    for length, ids in prompts.items():
        prompt = ids.view(1, -1).to(hf.device)
        hf_generate(prompt, WARMUP_STEPS + 2)  # warm-up at this length, as measure() does
        ttfts, tpots, peaks = [], [], []
        for _ in range(repeats):
            reset_peak_rss()
            t = clock(hf.device)
            hf_generate(prompt, 1)
            ttfts.append(1e3 * (clock(hf.device) - t))
            stamps = Stamps()
            out = hf_generate(prompt, new_tokens, [stamps])
            steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])][WARMUP_STEPS:]
            tpots.append(1e3 * statistics.median(steps))
            peaks.append(peak_rss_mib())
        row = dict(engine="transformers", compressor="none", settings={}, label="none", prompt_len=length,
                   ttft_ms=statistics.fmean(ttfts), tpot_ms=statistics.fmean(tpots),
                   tok_s=1e3 / statistics.fmean(tpots), ttft_runs_ms=ttfts, tpot_runs_ms=tpots,
                   peak_rss_mib=round(max(peaks), 1), tokens=out[0, length:].tolist())
        results.append(row)
        if on_result:
            on_result(row)
    return results


def run_meta(meta: dict, new_tokens: int, repeats: int) -> dict:
    """What every row of one speed run carries: the caller's meta, a `run` id shared by the run's rows,
    and the conditions of the measurement."""
    return dict(meta, run=time.strftime("%Y%m%d-%H%M%S"), new_tokens=new_tokens, repeats=repeats,
                threads=torch.get_num_threads(), torch=torch.__version__,
                peak_rss_scope="per run" if reset_peak_rss() else "process so far")
