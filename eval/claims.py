"""The report's check of the seed study's claims against what a run measured.

The seed study claims, for SnapKV compressing a 3000-token prompt to 512 entries on Pythia-70M: KV memory
-83%, generation 1.5-2x faster, PPL +4-10%, compression overhead ~8% of a forward. Its FLOP model counts
attention only. Here each claim stands next to SnapKV C512 against no compression from the same run: speed
rows carry the no-compression row measured interleaved with them, and PPL comes from the same windows and
tokens. Only measured numbers are shown; what a run did not measure says so.
"""

from __future__ import annotations

from .grid import distance_from_defaults
from .markdown import table

CAPACITY = 512
LENGTHS = (2048, 3000)  # inside Pythia's trained 2048 positions, and the study's own case
CLAIMS = {"kv": "-83%", "speed": "1.5-2x faster", "ppl": "+4-10%", "overhead": "~8% of a forward"}
WHY = ("Why they differ: the study's FLOP model counts attention only and leaves out the MLP and the "
       "50304x512 LM head, which dominate a decode step at this size, so evicting KV entries shortens only the "
       "attention part of each step, while the KV memory follows the kept fraction.")


def pick_snapkv(candidates: list[dict]) -> dict | None:
    """The SnapKV C512 configuration (label, compressor, settings) closest to SnapKV's defaults."""
    mine = [c for c in candidates if c["compressor"] == "snapkv" and c["settings"].get("max_capacity_prompt") == CAPACITY]
    return min(mine, key=lambda c: distance_from_defaults(c["compressor"], c["settings"]), default=None)


def _kv(row) -> str:
    ref = row["reference"]
    change = 100 * (row["kv_compressed_bytes"] / ref["kv_compressed_bytes"] - 1)
    end = 100 * (row["kv_end_bytes"] / ref["kv_end_bytes"] - 1)
    return (f"{change:+.1f}% ({row['kv_compressed_bytes'] / 2**20:.2f} vs {ref['kv_compressed_bytes'] / 2**20:.2f} MiB "
            f"after compression; {end:+.1f}% at the end of {row['new_tokens']} new tokens)")


def _speed(row) -> str:
    ref = row["reference"]
    return f"{ref['tpot_ms'] / row['tpot_ms']:.2f}x (TPOT {row['tpot_ms']:.2f} vs {ref['tpot_ms']:.2f} ms)"


def _overhead(row) -> str:
    forward = row["ttft_ms"] - row["compress_ms"]
    return (f"{100 * row['compress_ms'] / forward:.1f}% of the prefill forward ({row['compress_ms']:.1f} of "
            f"{forward:.1f} ms; {100 * row['compress_ms'] / row['ttft_ms']:.1f}% of TTFT)")


def claims_section(configs: list[dict], ppl: dict[str, float], window_prompt: int | None,
                   speed_rows: list[dict], model: str, lm_head: str | None) -> list[str]:
    """Markdown lines. configs: {label, compressor, settings} of the run; ppl: label -> PPL over all books
    (configurations with every book scored); speed_rows: the run's rows, each with its `reference`."""
    lines = ["## Seed-study claims vs measured", ""]
    snap = pick_snapkv(configs)
    if snap is None:
        return lines + [f"Not measured: these results have no SnapKV configuration with max_capacity_prompt "
                        f"{CAPACITY}.", ""]
    label = snap["label"]
    lines += [f"The seed study's predictions for SnapKV compressing a 3000-token prompt to {CAPACITY} entries on "
              f"Pythia-70M, next to `{label}` against no compression measured in the same run on `{model}` "
              f"(speed: the two interleaved in one speed run; PPL: the same windows and tokens).", ""]
    rows = {r["prompt_len"]: r for r in speed_rows if r["label"] == label and r.get("reference")}
    cells = {key: [] for key in CLAIMS}
    for length in LENGTHS:
        row = rows.get(length)
        if row is None:
            missing = f"not measured (no {length}-token prompt in the speed part)"
            for key in ("kv", "speed", "overhead"):
                cells[key].append(missing)
        else:
            cells["kv"].append(_kv(row))
            cells["speed"].append(_speed(row))
            cells["overhead"].append(_overhead(row))
    # PPL: the windows compress window_prompt tokens; the figure goes under the length nearest to it.
    if label not in ppl or "none" not in ppl:
        why = "no complete PPL of " + (label if label not in ppl else "none")
        cells["ppl"] = [f"not measured ({why})"] * len(LENGTHS)
    elif not window_prompt or window_prompt <= CAPACITY:
        cells["ppl"] = [f"not measured (the PPL windows' prompts are {window_prompt} tokens: C{CAPACITY} keeps "
                        f"them whole)"] * len(LENGTHS)
    else:
        nearest = min(LENGTHS, key=lambda n: abs(n - window_prompt))
        measured = (f"{100 * (ppl[label] / ppl['none'] - 1):+.2f}% ({ppl[label]:.3f} vs {ppl['none']:.3f}; PPL "
                    f"windows compress {window_prompt} -> {CAPACITY})")
        cells["ppl"] = [measured if n == nearest else f"not measured (the PPL windows compress {window_prompt} "
                        f"tokens)" for n in LENGTHS]
    names = {"kv": "KV memory", "speed": "generation (decode) speed", "ppl": "PPL",
             "overhead": "compression overhead"}
    lines.append(table(["", "seed claim (3000 -> 512, Pythia-70M)"] + [f"measured: {n} -> {CAPACITY}" for n in LENGTHS],
                       [[names[k], CLAIMS[k]] + cells[k] for k in CLAIMS]))
    lines += ["", WHY + (f" This model's LM head is {lm_head}." if lm_head else ""), ""]
    return lines
