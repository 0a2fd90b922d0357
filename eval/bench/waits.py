"""Where users wait (issue 27), every figure a ratio measured within one run, with its spread.

    python -m minipythia.random_checkpoint 70m weights/random-70m
    python -m eval.bench.waits --model weights/random-70m [--prompt-len 2048] [--capacity 512] [--new-tokens 16]
                               [--repeats 3] [--parts policies,h2o,kvzip,allocator,bf16,batch]

Parts (each prints its table as soon as it is measured):
- policies: per policy, TTFT, the compression's share of it (scoring, selection, gather: the cache's
  `compress_seconds`; a forward of the policy's own, KVzip's or DuoAttention's `prepare`, shows in TTFT / none
  only), TTFT and TPOT against no compression and TPOT
  against SnapKV at the same capacity. Head-wise policies (AdaKV, DuoAttention) are also compared with a
  uniform cache holding the same total entries (SnapKV at their mean entries per head, "uniform= ..."). The
  configurations alternate within each repeat, so a machine that slows down slows all of them; a ratio is the
  median of the per-repeat ratios, [min-max] over repeats. Decode GB/s: the bytes a decode step must read
  (every weight but the input embedding, and the KV held) per TPOT, against a copy bandwidth measured first.
- h2o: H2O's score of one layer against its inherent work (a float32 causal QK^T, softmax and column sums in
  one pass each), one thread.
- kvzip: KVzip's TTFT against its inherent work (the prompt's forward, the reconstruction's forwards, their
  scores done plainly in one pass each), alternating, at the process's threads.
- allocator: page faults and time of an uncompressed prefill, in child processes alternating the default
  glibc allocator and one that keeps freed memory (GLIBC_TUNABLES mmap and trim thresholds at 1 GiB).
- bf16: TTFT and TPOT of a bfloat16 model against float32, alternating, with float32 products in its prefill
  (the default on CPUs without native bf16, minipythia/precision.py) and pure bf16; what the upcasts cost; how
  far each prefill's NLL, logits and SnapKV kept sets are from float32's and from each other's.
- batch: a 6-configuration sliding-window sweep (eval/configs/bench.yaml) with batch_windows 8 against 1,
  alternating, at windows 512 / 128 and at the model's default, and whether the NLLs are the same.
Writes nothing. The machine is shared: load average printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

from minipythia import Prefill, Pythia, generate
from minipythia.cli import add_model_args, resolve_model
from minipythia.compressors.kvzip import reconstruct, reconstruction_attention
from minipythia.compressors.registry import build_compressor
from minipythia.precision import cpu_description

from ..data import random_prompt
from ..ppl import default_windows, sliding_window_nlls
from . import copy_bandwidth_gbs, decode_bytes_per_token, sweep_configs

# The policies the issue names, each at --capacity where it has that setting; knorm as one without a scorer.
POLICIES = ("none", "snapkv", "knorm", "h2o", "merging", "criticalkv", "lagkv", "expected_attention", "kvzip",
            "adakv", "duo_attention")
PARTS = ("policies", "h2o", "kvzip", "allocator", "bf16", "batch")
# Keeps freed memory in the heap instead of returning it to the system (which page-faults it in again).
KEEP_FREED = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"


def spread(values: list[float], fmt: str = ".2f") -> str:
    """median [min-max]"""
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def policy(name: str, capacity: int, prompt_len: int):
    if name == "none":
        return None
    if name == "knorm":
        return build_compressor("knorm", {"compression_ratio": 1 - capacity / prompt_len})
    settings = {} if name == "duo_attention" else {"max_capacity_prompt": capacity}
    return build_compressor(name, settings)


@torch.inference_mode()
def mean_entries_per_head(model, compressor, prompt: torch.Tensor) -> int:
    """Entries per (layer, head) on average once `compressor` compressed the prompt's prefill."""
    cache = model.new_cache(compressor=compressor)
    model(prompt[None], cache=cache, last_only=True)
    total = sum(int(cache.lengths(layer).sum()) for layer in range(cache.num_layers))
    return round(total / (cache.num_layers * model.config.num_attention_heads))


def one_run(model, prompt: torch.Tensor, compressor, new_tokens: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        g = generate(model, prompt[None], new_tokens, compressor=compressor)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return dict(ttft=g.ttft_s, compress=g.compress_s, tpot=g.tpot_s, kv=g.kv_bytes_compressed, faults=faults)


def ratios(runs: dict, a: str, b: str, key: str) -> list[float]:
    return [x[key] / y[key] for x, y in zip(runs[a], runs[b])]


def policies_part(model, prompt, capacity: int, new_tokens: int, repeats: int, names=POLICIES):
    # none and snapkv always: the other ratios are to them
    configs = {name: policy(name, capacity, len(prompt)) for name in POLICIES if name in {"none", "snapkv", *names}}
    for name in {"adakv", "duo_attention"} & set(configs):  # a uniform cache of the same total entries
        entries = mean_entries_per_head(model, configs[name], prompt)
        configs[f"uniform={name}"] = build_compressor("snapkv", {"max_capacity_prompt": entries})
    for c in configs.values():  # warm-up: allocator, thread pool, each policy's first call
        one_run(model, prompt[:256], c, 4)
    runs = {label: [] for label in configs}
    for _ in range(repeats):
        for label, c in configs.items():
            runs[label].append(one_run(model, prompt, c, new_tokens))
    # The decode bandwidth floor: a step reads every weight but the input embedding's other rows, and the KV.
    weights = decode_bytes_per_token(model, 0)
    copy_gbs = copy_bandwidth_gbs()
    print(f"\n## Policies: {len(prompt)}-token prompt, capacity {capacity}, {new_tokens} new tokens, "
          f"{repeats} repeats (median [min-max]); copy bandwidth {copy_gbs:.1f} GB/s (read + write)\n")
    print("| policy | TTFT ms | compression % of TTFT | TTFT / none | TPOT ms | TPOT / none | TPOT / snapkv "
          "| TPOT / uniform of equal entries | KV MB | decode GB/s | of copy bw |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, c in configs.items():
        r = runs[label]
        uniform = f"uniform={label}"
        row = [label if c is None or label.startswith("uniform") else c.label,
               spread([1e3 * x["ttft"] for x in r], ".0f"),
               spread([100 * x["compress"] / x["ttft"] for x in r], ".1f"),
               spread(ratios(runs, label, "none", "ttft")),
               spread([1e3 * x["tpot"] for x in r]),
               spread(ratios(runs, label, "none", "tpot")),
               spread(ratios(runs, label, "snapkv", "tpot")),
               spread(ratios(runs, label, uniform, "tpot")) if uniform in runs else "",
               f"{r[-1]['kv'] / 2**20:.1f}",
               spread([(weights + x["kv"]) / x["tpot"] / 1e9 for x in r], ".1f"),
               spread([100 * (weights + x["kv"]) / x["tpot"] / 1e9 / copy_gbs for x in r], ".0f") + "%"]
        print("| " + " | ".join(row) + " |", flush=True)


@torch.inference_mode()
def prefill_child(model_dir: str, prompt_len: int, repeats: int):
    """Run in a child process: page faults and seconds of each uncompressed prefill, as JSON."""
    model = Pythia.from_pretrained(model_dir).for_inference()
    prompt = random_prompt(prompt_len, model.config.vocab_size)[None]
    model(prompt[:, :256], cache=model.new_cache(), last_only=True)
    out = []
    for _ in range(repeats + 1):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        model(prompt, cache=model.new_cache(), last_only=True)
        out.append(dict(s=time.perf_counter() - start,
                        faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
    print(json.dumps(out[1:]))  # the first one sizes the heap


def allocator_part(model_dir: str, prompt_len: int, repeats: int):
    runs = {"default": [], "keeps freed": []}
    for _ in range(repeats):
        for label, tunables in (("default", None), ("keeps freed", KEEP_FREED)):
            env = dict(os.environ)
            env.pop("GLIBC_TUNABLES", None)
            if tunables:
                env["GLIBC_TUNABLES"] = tunables
            out = subprocess.run([sys.executable, "-m", "eval.bench.waits", "--model", model_dir, "--prefill-child",
                                  "--prompt-len", str(prompt_len), "--repeats", "3"],
                                 env=env, capture_output=True, text=True, check=True).stdout
            runs[label] += json.loads(out.splitlines()[-1])
    print(f"\n## Allocator: uncompressed {prompt_len}-token prefill, float32, {len(runs['default'])} prefills each "
          f"in {repeats} alternating child processes\n")
    print("| allocator | page faults per prefill | prefill ms | time / default |")
    print("|---|---|---|---|")
    for label, r in runs.items():
        print(f"| {label} | {spread([x['faults'] for x in r], '.0f')} | {spread([1e3 * x['s'] for x in r], '.0f')} "
              f"| {spread([x['s'] / y['s'] for x, y in zip(r, runs['default'])])} |", flush=True)


@torch.inference_mode()
def prefill_fidelity(models: dict, prompt: torch.Tensor, capacity: int) -> dict:
    """Per model: the prompt's mean NLL, its logits, and SnapKV's kept positions per (layer, head) after the
    prompt's prefill (what a bf16 run's records hold: NLLs and kept sets)."""
    out = {}
    compressor = build_compressor("snapkv", {"max_capacity_prompt": capacity})
    for name, m in models.items():
        logits = m(prompt[None]).float()[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, prompt[1:]).item()
        cache = m.new_cache(compressor=compressor)
        m(prompt[None], cache=cache, last_only=True)
        kept = [cache.stores[layer].positions() for layer in range(cache.num_layers)]
        out[name] = dict(nll=nll, logits=logits, kept=kept)
    return out


def kept_agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Share of kept (layer, head, position) entries two caches hold in common."""
    common = total = 0
    for x, y in zip(a, b):
        for hx, hy in zip(x.flatten(0, 1), y.flatten(0, 1)):
            common += len(set(hx.tolist()) & set(hy.tolist()))
            total += hx.numel()
    return common / total


def upcast_seconds(model) -> float:
    """Seconds to copy every linear layer's weights into the model's float32 scratch once: what a
    float32-products forward adds to the products themselves."""
    scratch = model.upcast_scratch()
    start = time.perf_counter()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            scratch[: module.weight.numel()].copy_(module.weight.flatten())
    return time.perf_counter() - start


def bf16_part(model_dir, prompt, new_tokens: int, repeats: int, capacity: int):
    """float32, bfloat16 with float32 products in its multi-token forwards (the default on CPUs without native
    bf16) and pure bfloat16, alternating; then how far the two bf16 prefills are from each other and float32."""
    load = lambda dtype, products=None: Pythia.from_pretrained(model_dir, dtype=dtype).for_inference(products)
    models = {"float32": load(torch.float32), "bfloat16, float32 products": load(torch.bfloat16, True),
              "bfloat16, pure": load(torch.bfloat16, False)}
    for m in models.values():
        one_run(m, prompt[:256], None, 4)
    runs = {name: [] for name in models}
    upcast = []
    for _ in range(repeats):
        for name, m in models.items():
            runs[name].append(one_run(m, prompt, None, new_tokens))
        upcast.append(upcast_seconds(models["bfloat16, pure"]))
    print(f"\n## bfloat16 against float32: {len(prompt)}-token prompt, no compression, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {cpu_description()}\n")
    print("| model | TTFT ms | TTFT / float32 | TTFT / pure bf16 | TPOT ms | TPOT / float32 |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {spread([1e3 * x['ttft'] for x in r], '.0f')} "
              f"| {spread(ratios(runs, name, 'float32', 'ttft'))} | {spread(ratios(runs, name, 'bfloat16, pure', 'ttft'))} "
              f"| {spread([1e3 * x['tpot'] for x in r])} | {spread(ratios(runs, name, 'float32', 'tpot'))} |", flush=True)
    print(f"\nUpcasting every linear layer's weights once (what each float32-products forward adds): "
          f"{spread([1e3 * s for s in upcast], '.0f')} ms = {spread([100 * s / r['ttft'] for s, r in zip(upcast, runs['bfloat16, float32 products'])], '.1f')}% "
          f"of its TTFT; memory: the scratch they are copied into, the largest matrix in float32, "
          f"{models['bfloat16, float32 products'].upcast_scratch().nbytes / 2**20:.0f} MiB.")
    fidelity = prefill_fidelity(models, prompt, capacity)
    ref = fidelity["float32"]
    print(f"\nPrefill of the {len(prompt)}-token prompt (all positions' logits; SnapKV C{capacity} kept sets):\n")
    print("| model | mean NLL | NLL - float32 | max abs logit diff to float32 | to pure bf16 | kept entries as float32's | as pure bf16's |")
    print("|---|---|---|---|---|---|---|")
    for name, f in fidelity.items():
        pure = fidelity["bfloat16, pure"]
        print(f"| {name} | {f['nll']:.6f} | {f['nll'] - ref['nll']:+.2e} | {(f['logits'] - ref['logits']).abs().max():.3g} "
              f"| {(f['logits'] - pure['logits']).abs().max():.3g} | {100 * kept_agreement(f['kept'], ref['kept']):.2f}% "
              f"| {100 * kept_agreement(f['kept'], pure['kept']):.2f}% |", flush=True)


def h2o_part(model, prompt_len: int, repeats: int):
    """H2O's score of one layer against its inherent work, the same shape, one thread (so that the cores' sharing
    does not count): a float32 QK^T of the prompt's queries and keys, the causal mask, the softmax and the column
    sums, each a single pass over the whole (L, L) block."""
    c = model.config
    B, H, L, hs = 1, c.num_attention_heads, prompt_len, c.hidden_size // c.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, hs, generator=generator) for _ in range(3))
    h2o = build_compressor("h2o", {"max_capacity_prompt": L // 4})

    def inherent():
        logits = (q @ k.transpose(-1, -2)).div_(hs ** 0.5)
        logits.masked_fill_(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        return logits.softmax(-1).sum(-2)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inherent(), h2o.score(0, k, v, q)  # warm-up
        seconds = {"inherent": [], "h2o": []}
        for _ in range(max(repeats, 5)):
            for name, f in (("inherent", inherent), ("h2o", lambda: h2o.score(0, k, v, q))):
                start = time.perf_counter()
                f()
                seconds[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    print(f"\n## H2O's score against its inherent work: one layer, {L} tokens, {H} heads, 1 thread, "
          f"{len(seconds['h2o'])} alternating rounds\n")
    print("| | ms | / inherent |")
    print("|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {spread([1e3 * x for x in s])} | "
              f"{spread([a / b for a, b in zip(s, seconds['inherent'])])} |", flush=True)


def kvzip_part(model, prompt: torch.Tensor, capacity: int, repeats: int):
    """KVzip's TTFT (its prefill's forward, with the compression) against its inherent work, alternating, at the
    process's threads. Inherent: the prompt's forward (the prefill every policy runs), each chunk's reconstruction
    forward after the prompt's full cache, and its scores done plainly, one pass each over the whole (T, S + n + T)
    float32 block of every layer (QK^T, the causal mask on the reconstruction's own keys, softmax, the maximum over
    queries of the chunk's columns). Beside them, the same scores as KVzip computes them (blocks of queries)."""
    policy = build_compressor("kvzip", {"max_capacity_prompt": capacity})
    prompt = prompt[None]  # (1, L)
    context = Prefill.record(model, prompt)
    chunks = policy.reconstruction_chunks(prompt)
    L, hs = prompt.size(1), model.config.hidden_size // model.config.num_attention_heads

    def score_plainly(cache, start, end):
        for layer in range(model.config.num_hidden_layers):
            keys, queries = cache.keys(layer).float(), cache.recorded_queries[layer].float()
            S, T = min(policy.n_sink, start), queries.size(2)
            keys = torch.cat((keys[:, :, :S], keys[:, :, start:end], keys[:, :, L:]), dim=2)
            logits = (queries @ keys.transpose(-1, -2)).div_(hs ** 0.5)
            logits[..., -T:].masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            logits.softmax(-1)[..., S : S + end - start].amax(-2)

    def score_as_kvzip(cache, start, end):
        for layer in range(model.config.num_hidden_layers):
            keys, S = cache.keys(layer), min(policy.n_sink, start)
            reconstruction_attention(cache.recorded_queries[layer], keys[:, :, :S], keys[:, :, start:end],
                                     keys[:, :, L:])

    caches = [reconstruct(model, context, repeat) for _, _, repeat in chunks]
    parts = {
        "prompt's forward (none's prefill)": lambda: model(prompt, cache=model.new_cache(1), last_only=True),
        "reconstruction forwards": lambda: [reconstruct(model, context, repeat) for _, _, repeat in chunks],
        "scores, plainly": lambda: [score_plainly(c, start, end) for c, (start, end, _) in zip(caches, chunks)],
        "scores, as kvzip computes them": lambda: [score_as_kvzip(c, start, end)
                                                   for c, (start, end, _) in zip(caches, chunks)],
        "kvzip's TTFT": lambda: model(prompt, cache=model.new_cache(1, policy), last_only=True),
    }
    seconds = {name: [] for name in parts}
    with torch.no_grad():
        for f in parts.values():
            f()  # warm-up
        for _ in range(repeats):
            for name, f in parts.items():
                start = time.perf_counter()
                f()
                seconds[name].append(time.perf_counter() - start)
    inherent = [sum(s) for s in zip(*(seconds[name] for name in ("prompt's forward (none's prefill)",
                                                                  "reconstruction forwards", "scores, plainly")))]
    none = seconds["prompt's forward (none's prefill)"]
    print(f"\n## KVzip's TTFT against its inherent work: {L} tokens, capacity {capacity}, {len(chunks)} chunks, "
          f"{torch.get_num_threads()} threads, {repeats} alternating repeats\n")
    print("| | ms | / none's prefill | / inherent |")
    print("|---|---|---|---|")
    for name, s in [*seconds.items(), ("inherent (the first three)", inherent)]:
        print(f"| {name} | {spread([1e3 * x for x in s])} | {spread([a / b for a, b in zip(s, none)])} | "
              f"{spread([a / b for a, b in zip(s, inherent)])} |", flush=True)


def batch_part(model, tokens: int, repeats: int):
    """batch_windows 8 against 1 at two window settings: 512 / 128 (short windows, whose products are too small
    to keep the cores busy one window at a time) and the sweeps' default (the trained length and a quarter of it:
    1024 / 256 on tiny-pg19, 2048 / 512 on Pythia)."""
    configs = sweep_configs(model)
    print(f"\n## Batched windows: {len(configs)} configurations, {repeats} alternating repeats\n")
    print("| windows | tokens | batch_windows | seconds | speed / batch_windows 1 | same NLLs |")
    print("|---|---|---|---|---|---|")
    for ctx_len, stride in dict.fromkeys((default_windows(model, 512, 128), default_windows(model, None, None))):
        n = max(tokens, ctx_len + 8 * stride)  # at least 8 windows after the first: one full batch
        ids = random_prompt(n, model.config.vocab_size, seed=1)
        seconds, results = {1: [], 8: []}, {}
        for _ in range(repeats):
            for batch in seconds:
                start = time.perf_counter()
                results[batch] = sliding_window_nlls(model, ids, ctx_len, stride, configs, batch_windows=batch)
                seconds[batch].append(time.perf_counter() - start)
        same = all(torch.equal(a, b) for a, b in zip(results[1], results[8]))
        for batch, s in seconds.items():
            print(f"| {ctx_len}/{stride} | {n} | {batch} | {spread(s)} | "
                  f"{spread([a / b for a, b in zip(seconds[1], s)])} | {same} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eval.bench.waits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--capacity", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--policies", default=",".join(POLICIES), help="the policies part's policies (comma-separated)")
    parser.add_argument("--prefill-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    directory = str(resolve_model(args.model, args.revision).directory)
    if args.prefill_child:
        return prefill_child(directory, args.prompt_len, args.repeats)
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.exit(2, f"unknown --parts {', '.join(sorted(unknown))}: choose from {', '.join(PARTS)}\n")
    print(f"model {directory}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()} ({cpu_description()}); load average {load_average()}; {time.strftime('%Y-%m-%d %H:%M')}")
    model = Pythia.from_pretrained(directory).for_inference()
    prompt = random_prompt(args.prompt_len, model.config.vocab_size)
    if "policies" in parts:
        names = args.policies.split(",")
        if set(names) - set(POLICIES):
            parser.exit(2, f"unknown --policies {', '.join(sorted(set(names) - set(POLICIES)))}: choose from "
                           f"{', '.join(POLICIES)}\n")
        policies_part(model, prompt, args.capacity, args.new_tokens, args.repeats, names)
    if "h2o" in parts:
        h2o_part(model, args.prompt_len, args.repeats)
    if "kvzip" in parts:
        kvzip_part(model, prompt, args.capacity, args.repeats)
    if "allocator" in parts:
        allocator_part(directory, args.prompt_len, args.repeats)
    if "bf16" in parts:
        bf16_part(directory, prompt, args.new_tokens, args.repeats, args.capacity)
    if "batch" in parts:
        batch_part(model, args.batch_tokens, args.repeats)
    print(f"\nload average at the end {load_average()}")


if __name__ == "__main__":
    main()
