"""Every script in examples/ runs in its quick mode and shows what it is there to show;
every page's Python code blocks run; every example is on a page.

The scripts run in a subprocess from a temporary folder, with
``STREAMNORM_EXAMPLES_QUICK=1`` and one numba thread (their layers are tiny, and the
tests share the machine with other work).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"


def run_example(name: str, tmp_path, *args: str) -> str:
    env = dict(os.environ, STREAMNORM_EXAMPLES_QUICK="1", NUMBA_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def table_row(out: str, label: str, after: str = "") -> list[str]:
    """The cells of the first Markdown table row that starts with ``label``, after the
    first line that contains ``after``."""
    for line in out[out.index(after):].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{out}")


def percent(cell: str) -> float:
    return float(re.match(r"([\d.]+)%", cell).group(1))


def test_first_normalization(tmp_path):
    out = run_example("first_normalization.py", tmp_path)
    assert "mean per feature: [0. 0. 0. 0.]" in out
    assert "std per feature:  [1. 1. 1. 1.]" in out
    assert "streamed equals whole: True True" in out
    # after 50 batches the running mean is close to the true means 0, 5, -3, 100
    means = re.search(r"running_mean after 50 batches: \[(.*)\]", out).group(1)
    assert [round(float(v)) for v in means.split(",")] == [0, 5, -3, 99]


def test_training_loop_learns_and_plots(tmp_path):
    out = run_example("training_loop.py", tmp_path, "--plot", "curves.png")
    finals = dict(re.findall(r"^(no normalization|BatchNorm): loss ([\d.]+ -> [\d.]+)", out, flags=re.M))
    assert set(finals) == {"no normalization", "BatchNorm"}
    for name, losses in finals.items():
        first, last = (float(v) for v in losses.split(" -> "))
        assert last < 0.7 * first, (name, losses)
    acc = float(re.search(r"BatchNorm: .*final validation accuracy ([\d.]+)%", out).group(1))
    assert acc > 80.0
    assert "checkpoint keys: 1.weight, 1.bias, 1.running_mean, 1.running_var, 1.num_batches_tracked" in out
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_choosing(tmp_path):
    out = run_example("choosing.py", tmp_path)
    # batch statistics of 4 values are about four times noisier than those of 64
    noise4, noise64 = (float(table_row(out, n, "1. Noise")[0]) for n in ("4", "64"))
    assert 3.0 < noise4 / noise64 < 5.0
    assert table_row(out, "BatchNorm", "3. Validation")[0] == "ValueError"   # batch of one sample
    assert "needs more than 1 value per channel" in out
    for name in ("LayerNorm", "GroupNorm(8)", "OnlineNorm"):                 # they train on one
        assert percent(table_row(out, name, "3. Validation")[0]) > 20.0
    # recomputing the running statistics after training never hurts here
    momentum, loss, acc, recomputed = table_row(out, "0.05", "4. BatchNorm")
    assert percent(recomputed) >= percent(acc)


def test_streaming(tmp_path):
    out = run_example("streaming.py", tmp_path)
    for key in ("of the variances", "of the means"):
        assert float(re.search(key + r" ([\d.e+-]+)", out).group(1)) < 1e-10
    frozen = table_row(out, "frozen (reference period)")
    forgetting = table_row(out, "prequential, half_life=10")
    # on the drifting feature the forgetting scaler stays far closer to mean 0
    assert float(forgetting[0].split("/")[0]) < 0.5 * float(frozen[0].split("/")[0])
    assert "the reference scaler learned nothing: True" in out
    assert "reloaded scaler continues bit for bit: True" in out
    assert "transformed: [[-1.0, 0.0," in out and "[nan, 0.0," in out


def test_tta(tmp_path):
    out = run_example("tta.py", tmp_path)
    assert "reset_adaptation restored the source statistics exactly: True" in out
    frozen = table_row(out, "no adaptation")
    adapted = table_row(out, "adapt('batch')")
    assert percent(adapted[1]) > percent(frozen[1]) + 10.0            # severity 4
    for row in ("adapt('prior', prior_strength=16)", "adapt('cumulative')", "TENT", "TENT, episodic"):
        assert percent(table_row(out, row)[1]) > percent(frozen[1])


def test_from_pytorch(tmp_path):
    pytest.importorskip("torch")
    out = run_example("from_pytorch.py", tmp_path)
    diffs = [float(d) for d in re.findall(r"(?:differs? by|max difference|dx|dweight|dbias) ([\d.]+e[+-]\d+)", out)]
    assert len(diffs) >= 12, out
    assert max(diffs) < 1e-10, out
    assert "keys: True" in out
    assert "num_batches_tracked 5 and 5" in out
    assert "a float32 torch module keeps its dtype: torch.float32" in out
    errors = re.findall(r"float32 input of mean \S+: largest error, streamnorm ([\d.]+e[+-]\d+)", out)
    assert len(errors) == 2 and max(float(e) for e in errors) < 1e-6, out


TESTED = {"first_normalization.py", "training_loop.py", "choosing.py", "streaming.py", "tta.py", "from_pytorch.py"}


def test_every_example_is_tested_and_on_a_page():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == TESTED, f"examples without a test, or tests without an example: {scripts ^ TESTED}"
    pages = "".join(p.read_text() for p in DOCS.rglob("*.rst"))
    for name in scripts:
        assert re.search(rf"literalinclude:: (\.\./)+examples/{re.escape(name)}", pages), f"{name} is on no page"


# Pages whose ``.. code-block:: python`` blocks run in order, in one namespace per page.
PAGES = ["index.rst", "guide.rst", "streams.rst", "tta.rst", "from_pytorch.rst", "layers/batchnorm.rst",
         "layers/layernorm.rst", "layers/rmsnorm.rst", "layers/groupnorm.rst", "layers/onlinenorm.rst"]


def python_blocks(text: str) -> list[str]:
    blocks = []
    for m in re.finditer(r"^\.\. code-block:: python\n((?:[ \t]*\n|   .*\n)+)", text, flags=re.M):
        lines = m.group(1).splitlines()
        body = [line[3:] for line in lines if not line.lstrip().startswith(":")]
        blocks.append("\n".join(body).strip("\n") + "\n")
    return blocks


@pytest.mark.parametrize("page", PAGES)
def test_page_code_blocks_run(page, tmp_path, monkeypatch):
    path = DOCS / page
    if not path.exists():
        pytest.skip(f"docs/{page} does not exist")
    blocks = python_blocks(path.read_text())
    assert blocks, f"docs/{page} has no Python code block"
    monkeypatch.chdir(tmp_path)                 # blocks may write files
    ns: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        if "torch" in code:
            pytest.importorskip("torch")
        exec(compile(code, f"docs/{page}, block {i + 1}", "exec"), ns)
