"""On a CUDA device (skipped elsewhere): the model, a sweep and its tasks run there, with the CPU's figures
to float tolerance, and batched windows give the unbatched NLLs. `bash eval/bench/gpu_check.sh` runs these."""

from __future__ import annotations

import json

import pytest
import torch

from eval.__main__ import main
from eval.ppl import sliding_window_scores
from minipythia import Pythia, SnapKV
from minipythia.cli import run_cli

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_logits_on_cuda_match_the_cpu(tiny_checkpoint):
    ids = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(0))
    cpu = Pythia.from_pretrained(tiny_checkpoint).for_inference()
    gpu = Pythia.from_pretrained(tiny_checkpoint, device="cuda").for_inference()
    with torch.inference_mode():
        assert torch.allclose(gpu(ids.cuda()).cpu(), cpu(ids), atol=1e-4, rtol=1e-4)


def test_batched_windows_on_cuda_give_the_unbatched_nlls(tiny_checkpoint):
    model = Pythia.from_pretrained(tiny_checkpoint, device="cuda").for_inference()
    ids = torch.randint(0, 512, (600,), generator=torch.Generator().manual_seed(1))
    configs = [None, SnapKV(window_size=4, max_capacity_prompt=24)]
    one = sliding_window_scores(model, ids, 64, 16, configs, short_context=16)
    many = sliding_window_scores(model, ids, 64, 16, configs, short_context=16, batch_windows=8)
    for a, b in zip(one, many):
        assert torch.allclose(a.nll, b.nll, atol=1e-5, rtol=0)


def test_a_sweep_with_tasks_runs_on_cuda_with_the_cpu_s_figures(scale_grid, tmp_path):
    text = scale_grid.read_text().replace("revision: [step1, step2]", "revision: step1")
    (tmp_path / "s.yaml").write_text(text.replace(f"model: [{scale_grid.parent / 'narrow'}, ",
                                                  "model: [").replace("batch_size: 2", "batch_windows: 4"))
    for device in ("cpu", "cuda"):
        assert run_cli(main, ["sweep", str(tmp_path / "s.yaml"), "--device", device,
                              "--out", str(tmp_path / device)]) == 0
    for name in ("ppl", "recall"):
        cpu, gpu = ([json.loads(line) for line in (tmp_path / d / "snapkv_w4_c16_k5_avgpool" / f"{name}.jsonl")
                     .read_text().splitlines()] for d in ("cpu", "cuda"))
        field = "nll_sum" if name == "ppl" else "nll"
        assert [r[field] for r in gpu] == pytest.approx([r[field] for r in cpu], rel=1e-4)
