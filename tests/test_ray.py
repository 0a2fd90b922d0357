"""Distributed sweeps on a local Ray cluster (eval.executors): the same files as a serial run, on loopback,
and every Ray process gone when the sweep ends, on an error or Ctrl-C too."""

from __future__ import annotations

import os

import psutil
import pytest
import torch

pytest.importorskip("ray")  # the optional extra: pip install 'minipythia[ray]' (CI installs it)

from conftest import result_files  # noqa: E402
from eval.__main__ import main  # noqa: E402
from eval.executors import RayCluster  # noqa: E402
from minipythia.cli import run_cli  # noqa: E402

RAY_PROCESSES = ("raylet", "gcs_server", "ray::")


def ray_processes() -> list[str]:
    """Ray's processes that are ours: the children a local cluster started from this test process."""
    names = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(p in " ".join(child.cmdline()) for p in RAY_PROCESSES):
                names.append(child.name())
        except psutil.NoSuchProcess:
            pass
    return names


@pytest.fixture(scope="module")
def serial_out(scale_grid, tmp_path_factory):
    """The serial run, on one thread as each Ray worker is: the comparison is of the orchestration, not of how
    a CPU's kernels split a matrix product over threads."""
    out = tmp_path_factory.mktemp("serial") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli(main, ["sweep", str(scale_grid), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_a_local_two_worker_cluster_gives_the_serial_files_byte_for_byte(serial_out, scale_grid, tmp_path):
    out = tmp_path / "ray"
    assert run_cli(main, ["sweep", str(scale_grid), "--out", str(out), "--ray", "--workers", "2"]) == 0
    files = result_files(out)
    assert files == result_files(serial_out)
    assert len([f for f in files if f.endswith("ppl.jsonl")]) == 16  # 4 models/revisions x 4 configurations
    assert not ray_processes()
    # and a resumed distributed run gives them again
    path = out / "narrow" / "step2" / "snapkv_w4_c24_k5_avgpool" / "ppl.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    (out / "deep" / "step1" / "none" / "recall.jsonl").unlink()
    assert run_cli(main, ["sweep", str(scale_grid), "--out", str(out), "--ray", "--workers", "2"]) == 0
    assert result_files(out) == result_files(serial_out)
    # the workers' log says where each unit ran: one thread each, in processes other than this one
    log = (out / "deep" / "step1" / "units.jsonl").read_text()
    assert '"threads": 1' in log and f'"pid": {psutil.Process().pid},' not in log


def test_the_local_cluster_is_on_loopback_and_gone_afterwards(monkeypatch):
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    with RayCluster(None, 2) as cluster:
        assert cluster.node_address() == "127.0.0.1"
        assert cluster.ray.cluster_resources()["CPU"] == 2
        assert ray_processes()
    import ray

    assert not ray.is_initialized() and not ray_processes()
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ  # the environment is as it was


BROKEN_POLICY = """
import os
from dataclasses import dataclass

from minipythia.compressors import register
from minipythia.compressors.knorm import KnormPress


@register
@dataclass
class BrokenOnWorkers(KnormPress):
    name = "broken_on_workers"

    def score(self, layer, keys, values, queries):
        if os.getpid() != int(os.environ["SWEEP_DRIVER_PID"]):  # the driver's own replays (KV bytes) work
            raise ValueError("the policy broke on a worker")
        return super().score(layer, keys, values, queries)
"""


def test_a_failing_unit_fails_the_sweep_with_its_error_and_stops_ray(scale_grid, tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.py").write_text(BROKEN_POLICY)
    text = scale_grid.read_text().split("policies:")[0].replace("revision: [step1, step2]", "revision: step1")
    (tmp_path / "s.yaml").write_text(text + "policy_modules: [broken.py]\npolicies:\n  - {compressor: none}\n"
                                            "  - {compressor: broken_on_workers}\n")
    monkeypatch.setenv("SWEEP_DRIVER_PID", str(psutil.Process().pid))
    out = tmp_path / "out"
    assert run_cli(main, ["sweep", str(tmp_path / "s.yaml"), "--out", str(out), "--ray", "--workers", "2"]) == 2
    assert "the policy broke on a worker" in capsys.readouterr().err.splitlines()[-1]
    assert not ray_processes()


def test_ctrl_c_stops_the_cluster(scale_grid, tmp_path, monkeypatch):
    import eval.sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval.sweep, "append_jsonl", interrupted)  # as the first results come back
    with pytest.raises(KeyboardInterrupt):
        main(["sweep", str(scale_grid), "--out", str(tmp_path / "out"), "--ray", "--workers", "2"])
    import ray

    assert not ray.is_initialized() and not ray_processes()


def test_ray_options_that_cannot_work_are_one_line_errors(scale_grid, tmp_path, capsys):
    assert run_cli(main, ["sweep", str(scale_grid), "--out", str(tmp_path / "a"), "--workers", "2"]) == 2
    assert "add --ray" in capsys.readouterr().err
    assert run_cli(main, ["sweep", str(scale_grid), "--out", str(tmp_path / "b"), "--ray", "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
