from dataclasses import dataclass

import torch

from .base import QUERY_CHUNK, CapacityBudget, Compressor, attention_weights
from .registry import register


@register
@dataclass
class KVzip(CapacityBudget, Compressor):
    """KVzip (Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"),
    as in the authors' repository snu-mllab/KVzip (`model/wrapper.py` self_task and scoring,
    `attention/score.py` KVScore._get_score) and NVIDIA kvpress `kvpress/presses/kvzip_press.py`.

    An entry matters if the model needs it to reproduce the prompt. Before the prefill is compressed
    (`prepare`, which the model calls), the prompt's reconstruction is teacher-forced after the prompt's
    full cache, at positions L, L+1, ..., and its queries score the prompt's keys. The prompt is cut into
    chunks of `chunk_size` tokens, each reconstructed on its own after the whole prompt:
      reconstruction of chunk c = [separator_id] + the last prev_postfix_size tokens of chunk c-1 + chunk c.
    For each layer and head, the reconstruction's T queries (all of them) attend, softmax (float32, scale
    hs ** -0.5), over the keys of: the first min(n_sink, start of c) prompt tokens, chunk c, and the
    reconstruction's own (causal); the other chunks are left out of that softmax. An entry of chunk c scores
    the MAX over those queries of its attention weight. The first n_sink tokens are always kept (+inf);
    the max_capacity_prompt = C best entries are kept per head; prompts with L <= C stay whole, and then
    no reconstruction runs.

    Cost: one forward of each chunk's reconstruction after the prompt's full cache (about L tokens attending
    to about 2L keys) and its scores, a softmax over those keys, on every prefill and replay. The prompt's
    own forward is the prefill's (prompt.prefill: the model fills the cache from it).

    Deviations, deliberate:
    - No instruction text. The official input is "\\n\\nRepeat the previous context exactly." (for later
      chunks "...part of the previous context exactly, starting with " + the previous chunk's last 8
      tokens) and the chat template's assistant prefix, then the chunk. Pythia is a base model without a
      chat template and a policy has no tokenizer, so only the token ids are kept: the chunk, after the
      previous chunk's last tokens, after one separator, id 0 by default, which is <|endoftext|> in
      Pythia's tokenizer, the document boundary of its training data (None: no separator). A base model
      copies a repeated text by induction, without being asked.
    - The budget is a capacity C per head (CapacityBudget, as the other policies here): the official
      `pair-uniform` level (an equal share per head). The official default `pair` level, and kvpress,
      rank the scores of all layers and heads together against one threshold of a compression ratio.
    - No system prompt: the official code keeps the template's system prompt outside the evicted range
      (and in every chunk's softmax); here the first n_sink prompt tokens play its part, as kvpress's
      n_sink = 4 do. The sinks count in the budget.
    - Scores in float32 (the official softmax runs in the model's dtype). Chunks of 2000 tokens as the
      authors' repository (kvpress: 2048).
    Every chunk's reconstruction is placed after the whole prompt, as officially: for a prompt near the
    model's context length it runs at positions beyond those the model was trained on.
    """

    name = "kvzip"
    label_names = {"n_sink": "sink", "chunk_size": "chunk", "prev_postfix_size": "carry", "separator_id": "sep"}
    cannot_decode = ("it scores the entries of a whole prompt with that prompt's reconstruction, run before the "
                     "prefill is compressed; during decoding there is no prompt left to reconstruct")
    max_capacity_prompt: int = 512
    n_sink: int = 4
    chunk_size: int = 2000
    prev_postfix_size: int = 8
    separator_id: int | None = 0

    def __post_init__(self):
        super().__post_init__()
        # Plain attributes, not settings: per layer, the scores (B, nh, L) of the prompt that prepare() saw.
        self.reconstruction_scores: dict[int, torch.Tensor] = {}

    def validate(self):
        super().validate()
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.n_sink > self.max_capacity_prompt:
            raise ValueError(f"n_sink ({self.n_sink}) must be <= max_capacity_prompt ({self.max_capacity_prompt}): "
                             f"the sinks are always kept")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.prev_postfix_size < 0:
            raise ValueError(f"prev_postfix_size must be >= 0, got {self.prev_postfix_size}")
        if self.separator_id is not None and self.separator_id < 0:
            raise ValueError(f"separator_id must be a token id >= 0 or None, got {self.separator_id}")

    def for_model(self, config):
        if self.separator_id is not None and self.separator_id >= config.vocab_size:
            raise ValueError(f"separator_id {self.separator_id} is outside the model's vocabulary "
                             f"(0 .. {config.vocab_size - 1})")

    def reconstruction_chunks(self, input_ids: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """(start, end, ids (B, T)) per chunk [start, end) of the prompt: the chunk's reconstruction input."""
        B, L = input_ids.shape
        out = []
        for start in range(0, L, self.chunk_size):
            end = min(start + self.chunk_size, L)
            carry = min(self.prev_postfix_size, self.chunk_size) if start else 0  # of the previous chunk
            parts = [input_ids[:, start - carry : end]]
            if self.separator_id is not None:
                parts.insert(0, input_ids.new_full((B, 1), self.separator_id))
            out.append((start, end, torch.cat(parts, dim=1)))
        return out

    @torch.no_grad()
    def prepare(self, model, prompt):
        self.reconstruction_scores = {}
        input_ids = prompt.input_ids
        B, L = input_ids.shape
        n_layers = model.config.num_hidden_layers
        if all(self.keep_count(layer, L) >= L for layer in range(n_layers)):
            return  # nothing will be evicted: no reconstruction to run
        context = prompt.prefill  # the full cache that every chunk's reconstruction reads
        scores = [torch.empty(B, model.config.num_attention_heads, L, device=input_ids.device)
                  for _ in range(n_layers)]
        for start, end, repeat in self.reconstruction_chunks(input_ids):
            cache = reconstruct(model, context, repeat)
            sink = min(self.n_sink, start)
            for layer in range(n_layers):
                keys = cache.keys(layer)  # (B, nh, L + T, hs)
                scores[layer][..., start:end] = reconstruction_attention(
                    cache.recorded_queries[layer], keys[:, :, :sink], keys[:, :, start:end], keys[:, :, L:])
        for layer, s in enumerate(scores):
            s[..., : self.n_sink] = float("inf")  # always kept
            self.reconstruction_scores[layer] = s

    def score(self, layer, keys, values, queries):
        scores = self.reconstruction_scores.get(layer)
        if scores is None or scores.shape != keys.shape[:3]:
            got = "nothing" if scores is None else f"scores of shape {tuple(scores.shape)}"
            raise ValueError(f"kvzip has {got} for layer {layer}, whose keys are {tuple(keys.shape[:3])} (batch, "
                             f"heads, tokens): its scores come from prepare(model, Prompt(model, ids)) on this "
                             f"prompt, which the model's prefill and Prefill.replay call; call it first when "
                             f"compressing by hand")
        return scores.to(keys.device)


def reconstruct(model, context, repeat: torch.Tensor):
    """The cache after a chunk's reconstruction `repeat` (B, T) is teacher-forced after the prompt's full cache
    (context, a Prefill of L tokens), at positions L .. L + T - 1, with the reconstruction's queries recorded."""
    cache = model.new_cache(repeat.size(0), record_queries=True)
    for layer, (keys, values) in enumerate(zip(context.keys, context.values)):
        cache.append(layer, keys, values)
    cache.advance(context.num_tokens)
    model(repeat, cache=cache, last_only=True)
    return cache


def reconstruction_attention(queries, sink_keys, chunk_keys, repeat_keys) -> torch.Tensor:
    """KVzip's score of one chunk: queries (B, nh, T, hs) of its reconstruction, whose own keys are
    repeat_keys (B, nh, T, hs), attend (softmax in float32) over sink_keys (B, nh, S, hs), chunk_keys
    (B, nh, n, hs) and, causally, repeat_keys. Returns each chunk key's largest weight over the T queries,
    (B, nh, n).

    A block of queries at a time, each over the keys it can see (the sinks, the chunk, and the reconstruction's
    up to the block's last query): the whole (T, S + n + T) float32 matrix is 256 MiB a layer for a chunk of
    2000 tokens, and half of its last T columns are masked. The keys a block leaves out would weigh exactly 0,
    and a row's softmax and the maximum over rows do not depend on the blocks, so the scores are those of the
    whole matrix bit for bit (tests/test_kvzip.py keeps it as the reference). Blocks have QUERY_CHUNK to
    2 * QUERY_CHUNK - 1 queries, never a handful: a product of very few rows takes another kernel, whose
    roundings differ."""
    S, n, T = sink_keys.size(2), chunk_keys.size(2), repeat_keys.size(2)
    keys = torch.cat((sink_keys, chunk_keys, repeat_keys), dim=2).float()
    best = None
    start = 0
    while start < T:
        end = T if T - start < 2 * QUERY_CHUNK else start + QUERY_CHUNK
        # The block's queries are the last end - start positions of these keys: attention_weights' causal case.
        weights = attention_weights(queries[:, :, start:end], keys[:, :, : S + n + end])[..., S : S + n]
        best = weights.amax(dim=-2) if best is None else torch.maximum(best, weights.amax(dim=-2), out=best)
        start = end
    return best
