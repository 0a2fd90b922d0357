"""`python -m eval bench`: one run, both engines, the ratios and the sweep cost, written to the results folder."""

import json

import pytest
import torch

from eval.__main__ import main
from minipythia import Pythia


def test_bench_compares_with_transformers_and_times_the_sweep(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench"
    main(["bench", "--model", str(tiny_checkpoint), "--dtypes", "float32", "--prompt-lens", "16,40",
          "--new-tokens", "6", "--repeats", "3", "--sweep-tokens", "300", "--out", str(out)])
    result = json.loads((out / "bench.json").read_text())
    rows = result["rows"]
    assert [r["prompt_len"] for r in rows] == [16, 40]
    for r in rows:
        # The engines alternate run by run; the ratio is the median of the three back-to-back pairs.
        pairs = sorted(a / b for a, b in zip(r["tpot_ms_runs"], r["hf_tpot_ms_runs"]))
        assert len(pairs) == 3 and r["tpot_ratio"] == pytest.approx(pairs[1])
        assert r["tpot_ms"] == pytest.approx(sorted(r["tpot_ms_runs"])[1])
        assert r["same_tokens"]  # float32 greedy decoding agrees with transformers token for token
        assert 0 < r["of_copy_bandwidth"] == pytest.approx(r["decode_gbs"] / result["copy_gbs"])
    assert result["sweep"]["configs"] == 6 and result["sweep"]["none_nll_identical"]
    assert result["sweep"]["repeats"] == 3
    window = result["sweep"]["window"]
    prefill, per_config = window["prefill_ms"], list(window["config_ms"].values())
    assert len(per_config) == 6 and window["ratio"] == pytest.approx((prefill + sum(per_config)) / (prefill + per_config[0]))
    table = (out / "bench.md").read_text()
    assert "TPOT ratio" in table and "Sweep: 6 configs" in table and "Steady state" in table
    assert table.strip() in capsys.readouterr().out


def test_bench_rejects_an_unknown_dtype(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="--dtypes"):
        main(["bench", "--model", str(tiny_checkpoint), "--dtypes", "float16", "--out", str(tmp_path)])


@torch.inference_mode()
def test_the_measured_alternatives_compute_the_shipped_logits(tiny_checkpoint):
    """A speed comparison means something only if each variant computes the same function."""
    from eval.bench import alternatives

    shipped = Pythia.from_pretrained(tiny_checkpoint).for_inference()
    ids = torch.randint(0, shipped.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    reference = shipped(ids)
    column_major = alternatives.column_major_layers(Pythia.from_pretrained(tiny_checkpoint))
    assert not column_major.layers[0].mlp.dense_h_to_4h.weight.is_contiguous()
    assert (column_major(ids) - reference).abs().max() <= 1e-5
    try:
        packed = alternatives.onednn_layers(Pythia.from_pretrained(tiny_checkpoint))
    except RuntimeError as e:  # a PyTorch build without oneDNN
        pytest.skip(f"oneDNN linear unavailable: {e}")
    assert isinstance(packed.layers[0].attention.query_key_value, alternatives.OneDNNLinear)
    cache = packed.new_cache(2)
    steps = [packed(ids[:, :12], cache=cache)] + [packed(ids[:, i : i + 1], cache=cache) for i in range(12, 20)]
    assert (torch.cat(steps, dim=1) - reference).abs().max() <= 1e-5


def test_waits_kvzip_part_splits_its_ttft_into_its_inherent_work(tiny_checkpoint, capsys):
    """The kvzip part's table: each part's time, its ratio to none's prefill, and the inherent sum of the first
    three rows, whose own ratio to itself is exactly 1."""
    from eval.bench import waits

    waits.main(["--model", str(tiny_checkpoint), "--parts", "kvzip", "--prompt-len", "300", "--capacity", "64",
                "--repeats", "2"])
    out = capsys.readouterr().out
    assert "KVzip's TTFT against its inherent work: 300 tokens, capacity 64, 1 chunks" in out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| |")}
    assert set(rows) == {"prompt's forward (none's prefill)", "reconstruction forwards", "scores, plainly",
                         "scores, as kvzip computes them", "kvzip's TTFT", "inherent (the first three)"}
    assert rows["prompt's forward (none's prefill)"][1].startswith("1.00 [1.00-1.00]")
    assert rows["inherent (the first three)"][2].startswith("1.00 [1.00-1.00]")
    assert float(rows["kvzip's TTFT"][1].split()[0]) > 1  # it runs a reconstruction besides the prefill


def test_waits_rejects_an_unknown_part(tiny_checkpoint):
    from eval.bench import waits

    with pytest.raises(SystemExit) as e:
        waits.main(["--model", str(tiny_checkpoint), "--parts", "kvzip,nope"])
    assert e.value.code == 2
