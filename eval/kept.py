"""python -m eval kept: one task prompt, and what each configuration's cache kept of it, as a self-contained page.

OUT/kept.html needs no server and no network: its CSS and JS are inline and its data is JSON inside it. It shows

    the prompt's tokens, each coloured by how many heads of the chosen layer kept it (a <select> per layer and
    per configuration; the page's #layer=N&config=LABEL selects a view, so a link shows the same one),
    a strip per configuration (a cell per prompt token) to compare them at a glance,
    the task's evidence (recall: the passage; needle: the asked needle), the cue and the scored answer marked,
    a table of each configuration's overlap with the oracle, layer by layer.

Overlap with the oracle: per layer, of the (head, position) pairs the oracle keeps when each head keeps as many
entries as the configuration's head kept, the share the configuration kept too. The oracle scores with the
attention of the example's real targets (eval's Oracle with oracle_future_queries), so at equal counts this is
as much the configuration's precision as its recall; a head-wise policy is compared head by head at its own
counts. A configuration that keeps the whole prompt scores 1 trivially (its row says so: kept per head).

What each cache kept is read from `KVCache.positions(layer)` (the original position of every slot, -1 at a
head-wise layout's padding) after a replay of one recorded prefill (minipythia.Prefill), which leaves what the
configuration's own prefill would have.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from minipythia import Compressor, Oracle, Prefill

from .grid import Grid
from .replay import Future
from .results import write_text
from .tasks import Example, Task

PAGE = "kept.html"  # in the results folder: the report links to it when it is there
TASKS_WITH_EVIDENCE = ("recall", "needle")  # the tasks whose examples say where the evidence is


@dataclass
class Kept:
    """What one configuration's cache kept of the prompt."""
    label: str
    masks: list[torch.Tensor]  # per layer (nh, P) bool: whether a head kept a prompt position


def kept_masks(cache, n_tokens: int) -> list[torch.Tensor]:
    """Per layer, (nh, n_tokens) bool: which prompt positions each head of batch row 0 holds."""
    masks = []
    for layer in range(cache.num_layers):
        positions = cache.positions(layer)[0].cpu()  # (nh, n), -1 at padding
        # Padding goes to an extra column, dropped after the scatter.
        slots = torch.where(positions < 0, n_tokens, positions)
        mask = torch.zeros(positions.size(0), n_tokens + 1, dtype=torch.bool)
        masks.append(mask.scatter_(1, slots, True)[:, :n_tokens])
    return masks


def oracle_overlap(kept: torch.Tensor, oracle_scores: torch.Tensor) -> tuple[int, int]:
    """(hits, total) for one layer: kept (nh, P) bool, the oracle's scores (nh, P). Each head of the oracle keeps as
    many entries as the configuration's head did (its top scores, as Oracle.select takes them); total is how many
    that is, hits how many of them the configuration kept too."""
    hits = total = 0
    for head, row in enumerate(kept):
        count = int(row.sum())
        if count:
            chosen = oracle_scores[head].topk(count).indices
            hits += int(row[chosen].sum())
            total += count
    return hits, total


def example_spans(task: Task, example: Example) -> dict[str, tuple[int, int]]:
    """Where the example's parts are, as [start, end) over the prompt followed by its targets:
    evidence (recall: the passage; needle: the needle asked about), cue (what asks for it: recall's first passage
    tokens repeated, needle's question; after the prompt, or at its end with cue_in_prompt/question_in_prompt)
    and answer (the scored targets)."""
    end = example.prompt.numel() + example.targets.numel()
    answer = end - example.scored
    context = example.key["context"]  # the prompt's length before any cue moved into it
    spans = {"cue": (context, answer), "answer": (answer, end)}
    if "passage_at" in example.info:
        at = example.info["passage_at"]
        spans["evidence"] = (at, at + task.passage_tokens)
    elif "needle_at" in example.info:
        at = example.info["needle_at"]
        spans["evidence"] = (at, at + example.info["needle_tokens"])
    return spans


def oracle_scores(prefill: Prefill, future_queries: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, (nh, P) float32: the attention the future queries pay to each prompt key (Oracle.score)."""
    oracle = Oracle()
    oracle.future_queries = future_queries
    return [oracle.score(layer, k, v, q)[0].cpu()
            for layer, (k, v, q) in enumerate(zip(prefill.keys, prefill.values, prefill.queries))]


@torch.inference_mode()
def kept_by(future: Future, configs: list[Compressor]) -> list[Kept]:
    """What each configuration keeps of the prompt, replayed from one prefill (the oracle given the targets)."""
    return [Kept(c.label, kept_masks(future.replay(c), future.prefill.num_tokens)) for c in configs]


def shown_token(text: str) -> str:
    """A token's text for the page, HTML-escaped; a newline also shown as ↵, so that kept newlines can be seen."""
    return html.escape(text.replace("\n", "↵\n"))


def page_html(title: str, about: list[str], tokens: list[str], n_prompt: int, spans: dict[str, tuple[int, int]],
              kept: list[Kept], scores: list[torch.Tensor]) -> str:
    """The page: tokens (prompt, then targets) as decoded, spans from example_spans, what each configuration kept,
    the oracle's scores per layer (oracle_scores)."""
    n_layers, heads = len(scores), scores[0].size(0)

    def marks(i: int) -> str:
        return "".join(f" {name}" for name, (a, b) in spans.items() if a <= i < b)

    prompt = "".join(f'<span class="t{marks(i)}" data-i="{i}">{shown_token(tokens[i])}</span>'
                     for i in range(n_prompt))
    after = "".join(f'<span class="a{marks(i)}">{shown_token(tokens[i])}</span>' for i in range(n_prompt, len(tokens)))
    mark_cells = "".join(f'<i class="{marks(i).strip()}"></i>' for i in range(n_prompt))
    strips = "".join(f'<tr><th>{html.escape(k.label)}</th><td><div class="strip" data-config="{c}">'
                     f'{"<i></i>" * n_prompt}</div></td></tr>' for c, k in enumerate(kept))
    layer_options = "".join(f'<option value="{layer}">{layer}</option>' for layer in range(n_layers))
    config_options = "".join(f'<option value="{c}">{html.escape(k.label)}</option>' for c, k in enumerate(kept))
    evidence = spans.get("evidence")

    rows = []
    for k in kept:
        overlaps = [oracle_overlap(mask, layer_scores) for mask, layer_scores in zip(k.masks, scores)]
        hits, total = sum(h for h, _ in overlaps), sum(t for _, t in overlaps)
        per_head = sum(int(m.sum()) for m in k.masks) / (n_layers * heads)
        held = (f"<td>{torch.stack(k.masks)[:, :, evidence[0]:evidence[1]].float().mean().item():.2f}</td>"
                if evidence else "")
        rows.append(f"<tr><th>{html.escape(k.label)}</th><td>{per_head:.1f}</td>{held}"
                    + "".join(f"<td>{h / t:.2f}</td>" if t else "<td>-</td>" for h, t in overlaps)
                    + (f"<td><b>{hits / total:.2f}</b></td>" if total else "<td>-</td>") + "</tr>")
    header = ("<tr><th>configuration</th><th>kept per head</th>" + ("<th>evidence kept</th>" if evidence else "")
              + "".join(f"<th>layer {layer}</th>" for layer in range(n_layers)) + "<th>all layers</th></tr>")

    data = dict(heads=heads, layers=n_layers, configs=[
        dict(label=k.label, counts=[m.sum(0).tolist() for m in k.masks]) for k in kept])
    # Every "<" escaped, so that no token or label can close the script element or open a comment.
    data_json = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return TEMPLATE.format(
        title=html.escape(title), about="".join(f"<p>{html.escape(line)}</p>" for line in about), heads=heads,
        layer_options=layer_options, config_options=config_options, prompt=prompt, after=after,
        mark_cells=mark_cells, strips=strips, header=header, rows="".join(rows), data=data_json, n_prompt=n_prompt)


def kept_page(model, tokenizer, task: Task, example: Example, grid: Grid, about: list[str], title: str) -> str:
    """The page of one example: the grid's configurations replayed from one prefill of the prompt (an oracle among
    them given the example's targets as its future), against the oracle."""
    device = model.embed_in.weight.device
    prefill = Prefill.record(model, example.prompt.unsqueeze(0).to(device))
    future = Future(model, prefill, example.targets.unsqueeze(0).to(device))
    kept = kept_by(future, grid.configs)
    tokens = [tokenizer.decode([i]) for i in torch.cat((example.prompt, example.targets)).tolist()]
    return page_html(title, about, tokens, example.prompt.numel(), example_spans(task, example), kept,
                     oracle_scores(prefill, future.queries(None)))


def write_kept_page(out: Path, text: str) -> Path:
    path = Path(out) / PAGE
    write_text(path, text)
    return path


# The page. Doubled braces are literal ones (str.format).
TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.5 system-ui, sans-serif; margin: 1.5em; max-width: 1100px; color: #111; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.5em; }}
.controls {{ position: sticky; top: 0; background: #fff; padding: .4em 0; border-bottom: 1px solid #ddd; }}
.controls label {{ margin-right: 1.2em; }}
.legend span {{ display: inline-block; padding: 0 .4em; margin-right: .2em; }}
.tokens {{ white-space: pre-wrap; word-break: break-word; line-height: 1.9; }}
.t.dropped {{ color: #aaa; }}
.evidence {{ border-bottom: 3px solid #d97706; }}
.cue {{ border-bottom: 3px dashed #7c3aed; }}
.answer {{ border-bottom: 3px double #059669; }}
.after {{ white-space: pre-wrap; word-break: break-word; background: #f4f4f4; padding: .3em; line-height: 1.9; }}
table {{ border-collapse: collapse; }} th, td {{ padding: .15em .5em; text-align: right; }}
th {{ text-align: left; font-weight: normal; }} .overlap td {{ border-top: 1px solid #eee; }}
.strips {{ width: 100%; }} .strips td {{ width: 100%; }}
.strip, .marks {{ display: flex; height: 12px; background: #fff; outline: 1px solid #ddd; }}
.strip i, .marks i {{ flex: 1 1 0; min-width: 0; }}
.marks i.evidence {{ background: #d97706; border: 0; }} .marks i.cue {{ background: #7c3aed; border: 0; }}
</style></head>
<body>
<h1>{title}</h1>
{about}
<div class="controls">
<label>Layer <select id="layer">{layer_options}<option value="all">all (mean)</option></select></label>
<label>Configuration <select id="config">{config_options}</select></label>
<span class="legend">heads of {heads} that kept a token:
<span id="legend-none">none</span><span id="legend-some">some</span><span id="legend-all">all</span></span>
</div>
<h2>Kept, by configuration (a cell per prompt token, the marks above them)</h2>
<table class="strips">
<tr><th>evidence, cue</th><td><div class="marks">{mark_cells}</div></td></tr>
{strips}
</table>
<h2>The prompt ({n_prompt} tokens), coloured by the heads that kept each token</h2>
<p><span class="evidence">evidence</span> (the passage or needle the answer needs),
<span class="cue">cue</span> (what asks for it), <span class="answer">answer</span> (the scored tokens).</p>
<div id="tokens" class="tokens">{prompt}</div>
<h2>After the prompt: the targets (teacher-forced and scored; never compressed; the oracle's future)</h2>
<div class="after">{after}</div>
<h2>Overlap with the oracle</h2>
<p>Per layer, of the (head, position) pairs the oracle keeps when each head keeps as many entries as this
configuration's, the share this configuration kept too (1 = the oracle's choice; a configuration that keeps the
whole prompt is 1 trivially). Evidence kept: the share of the evidence's (layer, head, token) entries kept.</p>
<table class="overlap">{header}{rows}</table>
<script id="kept-data" type="application/json">{data}</script>
<script>
(function () {{
  const data = JSON.parse(document.getElementById("kept-data").textContent);
  const layerSelect = document.getElementById("layer"), configSelect = document.getElementById("config");
  const tokens = document.querySelectorAll("#tokens .t");
  const strips = document.querySelectorAll(".strip");
  // Per prompt token, the share of the heads that kept it: in one layer, or averaged over layers.
  function shares(config, layer) {{
    const counts = data.configs[config].counts;
    if (layer !== "all") return counts[+layer].map(n => n / data.heads);
    return counts[0].map((_, i) => counts.reduce((sum, l) => sum + l[i], 0) / (counts.length * data.heads));
  }}
  function colour(share) {{
    return share > 0 ? "hsl(210, 80%, " + Math.round(90 - 50 * share) + "%)" : "";
  }}
  function paint(cells, values) {{
    cells.forEach((cell, i) => {{
      cell.style.background = colour(values[i]);
      cell.classList.toggle("dropped", values[i] === 0);
    }});
  }}
  document.getElementById("legend-some").style.background = colour(0.5);
  document.getElementById("legend-all").style.background = colour(1);
  document.getElementById("legend-all").style.color = "#fff";
  function render(remember) {{
    const layer = layerSelect.value, config = +configSelect.value;
    const values = shares(config, layer);
    paint(tokens, values);
    tokens.forEach((t, i) => {{
      t.title = "token " + i + ": kept by " + Math.round(values[i] * data.heads * 100) / 100 + " of " + data.heads +
        " heads";
    }});
    strips.forEach(strip => paint(strip.querySelectorAll("i"), shares(+strip.dataset.config, layer)));
    if (remember) location.hash = "layer=" + layer + "&config=" + encodeURIComponent(data.configs[config].label);
  }}
  // #layer=N&config=LABEL chooses the view, so that a link shows the one it was copied from.
  const wanted = new URLSearchParams(location.hash.slice(1));
  if ([...layerSelect.options].some(o => o.value === wanted.get("layer"))) layerSelect.value = wanted.get("layer");
  const chosen = data.configs.findIndex(c => c.label === wanted.get("config"));
  if (chosen >= 0) configSelect.value = String(chosen);
  layerSelect.addEventListener("change", () => render(true));
  configSelect.addEventListener("change", () => render(true));
  render(false);
}})();
</script>
</body></html>
"""
