"""A policy that wraps another (a scorer, per_layer's layers) takes the inner policy with settings of its own:
from Python as a Compressor or a mapping, from a sweep's YAML as a mapping; the inner policy is built with them
and scores exactly as it does alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eval.grid import ConfigError, expand, parse_spec
from minipythia import PythiaConfig, SnapKV, build_compressor
from minipythia.compressors.adakv import AdaKV, adaptive_selection
from minipythia.compressors.per_layer import PerLayer

SIX_LAYERS = PythiaConfig(vocab_size=16, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                          intermediate_size=16)


def test_a_scorer_with_settings_scores_as_that_policy_alone():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 200, 8, generator=g) for _ in range(3))
    alone = SnapKV(window_size=8, kernel_size=3, max_capacity_prompt=64)
    for scorer in (SnapKV(window_size=8, kernel_size=3), {"compressor": "snapkv", "window_size": 8, "kernel_size": 3}):
        ada = AdaKV(max_capacity_prompt=64, scorer=scorer)
        assert ada.inner == alone and ada.scorer == {"compressor": "snapkv", "window_size": 8, "kernel_size": 3}
        scores = alone.score(0, k, v, q)
        assert torch.equal(ada.score(0, k, v, q), scores)
        assert torch.equal(ada.select(0, ada.score(0, k, v, q), 64), adaptive_selection(scores, 64, 0.2))
    assert AdaKV(max_capacity_prompt=64, scorer=scorer).label == "adakv_c64_snapkv-window_size8-kernel_size3_a0.2"


def test_a_scorer_at_its_defaults_is_its_name_and_keeps_its_label():
    for scorer in ("snapkv", {"compressor": "snapkv"}, SnapKV(), {"compressor": "snapkv", "max_capacity_prompt": 256}):
        ada = AdaKV(max_capacity_prompt=256, scorer=scorer)
        assert ada.scorer == "snapkv" and ada.label == "adakv_c256_snapkv_a0.2" and ada.inner.max_capacity_prompt == 256


@pytest.mark.parametrize("scorer, error, message", [
    ({"compressor": "snapkv", "max_capacity_prompt": 100}, ValueError, "takes max_capacity_prompt from adakv"),
    ({"compressor": "snapkv", "kv_bits": 4}, ValueError, "storage is adakv's own"),
    ({"compressor": "snapkv", "window": 4}, TypeError, "snapkv has no setting 'window'"),
    ({"compressor": "snapkv", "window_size": 600}, ValueError, "cannot be built"),
    ({"compressor": "nope"}, ValueError, "registered policy"),
    (3, TypeError, "must be a policy"),
])
def test_bad_inner_settings_are_refused(scorer, error, message):
    with pytest.raises(error, match=message):
        AdaKV(max_capacity_prompt=256, scorer=scorer)


def test_per_layer_takes_layers_with_settings_of_their_own():
    policy = PerLayer(max_capacity_prompt=128, layers=("none", {"compressor": "snapkv", "window_size": 16}))
    policy.for_model(SIX_LAYERS)
    assert policy.inner[0].name == "none" and policy.inner[5] == SnapKV(window_size=16, max_capacity_prompt=128)
    assert policy.label == "per_layer_c128_none-snapkv-window_size16"


def test_a_sweep_yaml_gives_an_inner_policy_its_settings(tmp_path: Path):
    spec = parse_spec("""
policies:
  - {compressor: adakv, max_capacity_prompt: [128, 256], scorer: [snapkv, {compressor: snapkv, window_size: 16}]}
  - {compressor: chunkkv, scorer: {compressor: knorm, compression_ratio: 0.25}}
  - {compressor: per_layer, layers: [[none, {compressor: snapkv, window_size: 8}]]}
""", tmp_path / "s.yaml")
    grid = expand(spec.policies, SIX_LAYERS)
    assert [c.label for c in grid.configs] == [
        "adakv_c128_snapkv_a0.2", "adakv_c128_snapkv-window_size16_a0.2",
        "adakv_c256_snapkv_a0.2", "adakv_c256_snapkv-window_size16_a0.2",
        "chunkkv_c512_chunk20_knorm-compression_ratio0.25", "per_layer_c512_none-snapkv-window_size8"]
    assert grid.configs[1].inner == SnapKV(window_size=16, max_capacity_prompt=128)
    assert grid.configs[4].inner == build_compressor("knorm", {"compression_ratio": 0.25})
    assert grid.configs[5].policy(3) == SnapKV(window_size=8, max_capacity_prompt=512)
    with pytest.raises(ConfigError, match="got a mapping"):
        parse_spec("policies:\n  - {compressor: snapkv, window_size: {compressor: knorm}}", tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match="no setting 'window'"):
        expand(parse_spec("policies:\n  - {compressor: adakv, scorer: {compressor: snapkv, window: 4}}",
                          tmp_path / "u.yaml").policies, SIX_LAYERS)


def test_one_compatibility_rule_for_every_wrapper():
    """A wrapper takes a scorer that does more than score (head-wise budgets, pruned key channels, set values)
    only when it carries that out; otherwise it would drop it silently, so the scorer is refused, by one rule."""
    from minipythia import COMPRESSORS
    from minipythia.compressors.over_scorer import DOES, OverScorer, what_it_does

    wrappers = [cls for cls in COMPRESSORS.values() if issubclass(cls, OverScorer)]
    assert {cls.name for cls in wrappers} >= {"adakv", "chunkkv", "criticalkv", "criticaladakv", "merging", "think"}
    for wrapper in wrappers:
        for name, cls in COMPRESSORS.items():
            dropped = [DOES[key] for key in what_it_does(cls) if key not in wrapper.carries]
            if issubclass(cls, wrapper) or not dropped:
                continue
            with pytest.raises(ValueError, match=f"scorer cannot be '{name}': {dropped[0]}"):
                wrapper(scorer=name)
    # merging kept AdaKV's scores but dropped its head-wise budgets before the rule: refused now
    with pytest.raises(ValueError, match="heads budgets of their own, which merging does not carry out"):
        build_compressor("merging", {"scorer": "adakv"})
    assert build_compressor("think", {"scorer": "merging"}).inner.name == "merging"  # ThinK carries merged values
