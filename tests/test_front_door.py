"""The README's promises about the API: its example runs as written, and the names it imports are the ones
documented, whatever else was imported first."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_readme_api_example_runs(tiny_checkpoint, tmp_path):
    """On the tiny checkpoint instead of the hub's Pythia-70M, and a book of our own; then a plain forward
    with autograd, which the example's generate() must not have broken."""
    example = python_blocks(ROOT / "README.md")[0]
    assert "EleutherAI/pythia-70m-deduped" in example and "book.txt" in example
    (tmp_path / "book.txt").write_text("the quick brown fox jumps over a lazy dog. " * 200)
    code = example.replace("EleutherAI/pythia-70m-deduped", str(tiny_checkpoint))
    code += "\nmodel.requires_grad_(True)\nmodel(torch.tensor([[1, 2]])).sum().backward()\nprint('ok')\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


@pytest.mark.parametrize("first", ["import minipythia.generate", "import minipythia.generate.__main__",
                                   "from minipythia.generate.__main__ import main", "import minipythia.cli",
                                   "import eval.__main__"])
def test_generate_is_the_function_in_any_import_order(first):
    code = f"{first}\nimport minipythia\nfrom minipythia import generate\n" \
           "assert callable(generate) and generate.__name__ == 'generate', generate\n" \
           "assert minipythia.generate is generate\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_policy_example_in_the_docs_is_the_tested_plugin():
    """README and docs/policies.md show the file tests/test_policy_plugin.py runs everywhere."""
    from test_policy_plugin import POLICY

    def code_of(text):
        return [line.split("#")[0].rstrip() for line in text.strip().splitlines() if line.strip()
                and not line.strip().startswith('"""')]

    tested = code_of(POLICY)
    for doc in (ROOT / "README.md", ROOT / "docs" / "policies.md"):
        shown = next(b for b in python_blocks(doc) if "@register" in b)
        assert code_of(shown) == tested, doc


def test_every_built_in_policy_is_exported_and_every_exported_policy_is_registered():
    """`from minipythia import AdaKV` works for each class the README's compressor table names: the exports of
    minipythia and minipythia.compressors and the registry's built-in policies are the same set of classes."""
    import minipythia
    import minipythia.compressors as compressors
    from minipythia import COMPRESSORS, Compressor

    built_in = {cls for cls in COMPRESSORS.values() if cls.__module__.startswith("minipythia.compressors.")}
    for package in (minipythia, compressors):
        exported = [getattr(package, name) for name in package.__all__]
        exported_policies = {c for c in exported if isinstance(c, type) and issubclass(c, Compressor)
                             and c.__dict__.get("name")}
        assert exported_policies == built_in, package.__name__
    readme_classes = re.findall(r"^\| `\w+` \| `(\w+)\(", (ROOT / "README.md").read_text(), flags=re.M)
    assert len(readme_classes) >= 20 and all(hasattr(minipythia, c) for c in readme_classes), readme_classes
