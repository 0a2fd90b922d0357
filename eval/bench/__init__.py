"""`make bench` / `python -m eval bench`: minipythia against transformers, measured in one process.

Every benchmark lives in this folder: alternatives.py (decode variants measured and not shipped),
gpu_parity.py and gpu_check.sh (the check to run on a GPU machine).

For each dtype and prompt length: TTFT, TPOT and tokens/s of greedy generation (no compression) for
minipythia and for transformers' `generate` on the same checkpoint, with the ratios; the memory bandwidth
decoding achieves (bytes read per token x tokens/s) against a copy bandwidth measured in the same run;
SnapKV's compression time as a share of TTFT; and what scoring six compressors from shared prefills
costs against one alone. Machines drift 10-15% between runs: only the ratios within one run mean much.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from minipythia import NoCompression, Prefill, Pythia, SnapKV
from minipythia.timing import clock

from ..data import random_prompt
from ..grid import expand, load_spec
from ..ppl import default_windows, sliding_window_nlls, token_nll
from ..speed import load_hf, measure, measure_hf

# The configurations whose shared-prefill cost the bench times (none first: the one-config baseline).
SWEEP_SPEC = Path(__file__).resolve().parents[1] / "configs" / "bench.yaml"


def sweep_configs(model: Pythia) -> list:
    return expand(load_spec(SWEEP_SPEC).policies, model.config).configs


def copy_bandwidth_gbs(device: str = "cpu", megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes moved (read + written) per second by a large tensor copy: what the memory system sustains."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t = clock(device)
        dst.copy_(src)
        times.append(clock(device) - t)
    return 2 * src.numel() * 4 / min(times) / 1e9


def decode_bytes_per_token(model: Pythia, kv_entries: int) -> int:
    """What one decode step must read: every weight but the input embedding (one row of it) and the KV."""
    size = model.embed_in.weight.element_size()
    weights = model.num_parameters() - model.embed_in.weight.numel()
    c = model.config
    kv = 2 * c.num_hidden_layers * kv_entries * c.hidden_size
    return (weights + kv) * size


def sweep_cost(model: Pythia, tokens: int, ctx_len: int, stride: int, repeats: int = 1) -> dict:
    """Seconds to score the bench's configurations from shared prefills vs the first of them alone, same
    windows. The two alternate `repeats` times; the ratio is the median of the paired ratios, so drift hits
    both sides alike."""
    ids = random_prompt(tokens, model.config.vocab_size, seed=1)
    configs, device = sweep_configs(model), model.embed_in.weight.device
    ones, togethers, identical = [], [], True
    for _ in range(repeats):
        t = clock(device)
        alone = sliding_window_nlls(model, ids, ctx_len, stride, configs[:1])
        ones.append(clock(device) - t)
        t = clock(device)
        shared = sliding_window_nlls(model, ids, ctx_len, stride, configs)
        togethers.append(clock(device) - t)
        identical = identical and torch.equal(alone[0], shared[0])
    return dict(configs=len(configs), tokens=tokens, ctx_len=ctx_len, stride=stride, repeats=repeats,
                one_config_s=statistics.median(ones), all_configs_s=statistics.median(togethers),
                ratio=statistics.median(b / a for a, b in zip(ones, togethers)), none_nll_identical=identical)


@torch.inference_mode()
def window_cost(model: Pythia, ctx_len: int, stride: int, repeats: int = 1) -> dict:
    """Where a sweep's time goes in one window after the first (a prompt of ctx_len - stride tokens, then
    stride targets): the shared prefill, and each config's replay + target forward + NLLs. With them, the
    steady-state cost of the bench's configurations, (prefill + every config's own work) / (prefill + the
    first's own work), which a long text approaches (the bench's first window has no prompt and is shared
    whole, which flatters short texts)."""
    ids = random_prompt(ctx_len, model.config.vocab_size, seed=2).view(1, -1)
    prompt, targets = ids[:, : ctx_len - stride], ids[:, ctx_len - stride :]
    configs, device = sweep_configs(model), model.embed_in.weight.device
    prefills, own = [], {c.label: [] for c in configs}
    for _ in range(repeats):
        t = clock(device)
        prefill = Prefill.record(model, prompt)
        prefills.append(clock(device) - t)
        for c in configs:
            t = clock(device)
            token_nll(model(targets[:, :-1], cache=prefill.replay(model, c)), targets[:, 1:])
            own[c.label].append(clock(device) - t)
    prefill = statistics.median(prefills)
    per_config = {label: statistics.median(v) for label, v in own.items()}
    first = per_config[configs[0].label]
    return dict(prompt=ctx_len - stride, targets=stride, prefill_ms=1e3 * prefill,
                config_ms={label: 1e3 * v for label, v in per_config.items()},
                ratio=(prefill + sum(per_config.values())) / (prefill + first))


def median_row(runs: list[dict]) -> dict:
    """TTFT, TPOT and tokens/s of single-repeat rows, as medians over the rows."""
    tpot = statistics.median(r["tpot_ms"] for r in runs)
    return dict(ttft_ms=statistics.median(r["ttft_ms"] for r in runs), tpot_ms=tpot, tok_s=1e3 / tpot)


def paired_ratio(ours: list[dict], theirs: list[dict], key: str) -> float:
    """Median over repeats of ours / theirs, each pair measured back to back."""
    return statistics.median(a[key] / b[key] for a, b in zip(ours, theirs))


def run_bench(directory: Path, dtypes: list[str], prompt_lens: list[int], new_tokens: int, repeats: int,
              use_hf: bool, out: Path, sweep_tokens: int, device: str = "cpu") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"copy bandwidth: {copy_gbs:.1f} GB/s (read + write)", file=sys.stderr)
    rows, snapkv_rows = [], []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        model = Pythia.from_pretrained(directory, dtype=dtype, device=device).for_inference()
        prompts = {n: random_prompt(n, model.config.vocab_size) for n in prompt_lens}
        hf = load_hf(directory, dtype) if use_hf else None
        hf = hf.to(device) if hf is not None else None
        # Engines alternate run by run (ours, then transformers, at each length, `repeats` times), so that a
        # machine that slows down for a minute slows both; each ratio is the median of the paired ratios.
        ours, theirs = {n: [] for n in prompt_lens}, {n: [] for n in prompt_lens}
        for _ in range(repeats):
            for n in prompt_lens:
                ours[n] += measure(model, {n: prompts[n]}, [NoCompression()], new_tokens, 1)
                if hf is not None:
                    theirs[n] += measure_hf(hf, {n: prompts[n]}, new_tokens, 1)
        del hf
        for n in prompt_lens:
            mine = median_row(ours[n])
            bytes_read = decode_bytes_per_token(model, n + new_tokens // 2)
            row = dict(dtype=dtype_name, prompt_len=n, ttft_ms=mine["ttft_ms"], tpot_ms=mine["tpot_ms"],
                       tok_s=mine["tok_s"], decode_gbs=bytes_read * mine["tok_s"] / 1e9)
            row["of_copy_bandwidth"] = row["decode_gbs"] / copy_gbs
            if theirs[n]:
                ref = median_row(theirs[n])
                row.update(hf_ttft_ms=ref["ttft_ms"], hf_tpot_ms=ref["tpot_ms"], hf_tok_s=ref["tok_s"],
                           tpot_ratio=paired_ratio(ours[n], theirs[n], "tpot_ms"),
                           ttft_ratio=paired_ratio(ours[n], theirs[n], "ttft_ms"),
                           same_tokens=all(a["tokens"] == b["tokens"] for a, b in zip(ours[n], theirs[n])),
                           tpot_ms_runs=[r["tpot_ms"] for r in ours[n]],
                           hf_tpot_ms_runs=[r["tpot_ms"] for r in theirs[n]])
            rows.append(row)
        longest = max(prompt_lens)
        snap = SnapKV()  # W32 C512 k5 avgpool, the recommended setting
        if longest > snap.max_capacity_prompt:
            r = measure(model, {longest: prompts[longest]}, [snap], new_tokens, repeats)[0]
            snapkv_rows.append(dict(dtype=dtype_name, prompt_len=longest, label=snap.label, ttft_ms=r["ttft_ms"],
                                    compress_ms=r["compress_ms"], share_of_ttft=r["compress_ms"] / r["ttft_ms"],
                                    tpot_ms=r["tpot_ms"]))
    model = Pythia.from_pretrained(directory, dtype=torch.float32, device=device).for_inference()
    windows = default_windows(model, None, None)
    sweep = sweep_cost(model, sweep_tokens, *windows, repeats) if sweep_tokens else None
    if sweep:
        sweep["window"] = window_cost(model, *windows, repeats)
    where = (torch.cuda.get_device_name() if device.startswith("cuda")
             else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    result = dict(model=str(directory), machine=f"{where}, torch {torch.__version__}", copy_gbs=copy_gbs, new_tokens=new_tokens, repeats=repeats,
                  rows=rows, snapkv=snapkv_rows, sweep=sweep, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(bench_table(result) + "\n")
    return result


def _f(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def bench_table(result: dict) -> str:
    lines = [f"model {result['model']}; {result['machine']}; copy bandwidth {result['copy_gbs']:.1f} GB/s; "
             f"{result['new_tokens']} new tokens, median of {result['repeats']} runs, the engines alternating run by run "
             f"(ratios: medians of the paired ratios); {result['time']}", "",
             "| dtype | prompt | TTFT ms | HF TTFT ms | TTFT ratio | TPOT ms | HF TPOT ms | TPOT ratio | tok/s "
             "| HF tok/s | decode GB/s | of copy bw | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['dtype']} | {r['prompt_len']} | {r['ttft_ms']:.1f} | {_f(r.get('hf_ttft_ms'), '.1f')} "
                     f"| {_f(r.get('ttft_ratio'), '.2f')} | {r['tpot_ms']:.2f} | {_f(r.get('hf_tpot_ms'), '.2f')} "
                     f"| {_f(r.get('tpot_ratio'), '.2f')} | {r['tok_s']:.0f} | {_f(r.get('hf_tok_s'), '.0f')} "
                     f"| {r['decode_gbs']:.1f} | {r['of_copy_bandwidth']:.0%} | {r.get('same_tokens', '')} |")
    for s in result["snapkv"]:
        lines.append(f"\nSnapKV ({s['label']}), {s['dtype']}, {s['prompt_len']}-token prompt: compression "
                     f"{s['compress_ms']:.1f} ms = {s['share_of_ttft']:.1%} of TTFT {s['ttft_ms']:.1f} ms")
    sw = result["sweep"]
    if sw:
        lines.append(f"\nSweep: {sw['configs']} configs from shared prefills took {sw['all_configs_s']:.1f} s, one "
                     f"config alone {sw['one_config_s']:.1f} s: {sw['ratio']:.2f}x (median of {sw.get('repeats', 1)} paired runs; "
                     f"{sw['tokens']} tokens, "
                     f"windows {sw['ctx_len']}/{sw['stride']}, float32; NLLs of 'none' identical: "
                     f"{sw['none_nll_identical']})")
        w = sw.get("window")
        if w:
            configs = ", ".join(f"{label} {ms:.0f}" for label, ms in w["config_ms"].items())
            lines.append(f"\nOne window after the first ({w['prompt']}-token prompt, {w['targets']} targets): shared "
                         f"prefill {w['prefill_ms']:.0f} ms; each config's replay + target forward + NLLs, ms: "
                         f"{configs}. Steady state (a long text): {w['ratio']:.2f}x one config alone.")
    return "\n".join(lines)
