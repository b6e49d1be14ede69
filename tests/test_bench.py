"""``bench/run.py --quick``: the benchmark harness runs end to end and writes a complete table."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_writes_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--output", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    text = out.read_text()
    assert "QUICK MODE" in text and "CPU flags:" in text and "torch " in text and "transformers " in text

    header = next(line for line in text.splitlines() if line.startswith("| system |"))
    for col in ("model", "format", "sequences", "decode tok/s", "time to first token", "peak RSS", "weights",
                "other load"):
        assert col in header
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(("| prosa |", "| transformers |"))]
    got = {(r[0], r[2], r[3]) for r in rows}
    assert got == {("prosa", "int4", "1"), ("prosa", "none", "1"), ("prosa", "int4", "8"),
                   ("prosa", "int8", "1"), ("transformers", "float32", "1")}
    for r in rows:
        tok_s, ttft, rss, weights = (float(re.match(r"[\d.]+", c).group()) for c in r[4:8])
        assert tok_s > 0 and 0 < ttft < 600 and rss > 50 and weights > 1, r

    targets = text.split("## Targets", 1)[1]
    assert re.search(r"GPT-2-shaped prosa int8 / transformers fp32 .*\| [\d.]+x \|", targets)
    assert re.search(r"time to first token .*prosa int4 \| [\d.]+ s = import torch [\d.]+ s \+ -?[\d.]+ s \| "
                     r"≤ import torch \+ 0.6 s \| (PASS|MISS)", targets)
    assert re.search(r"peak RSS - import torch RSS, prosa int4 \(weights \d+ MiB\) \| -?\d+ MiB \| ≤ \d+ MiB "
                     r"\(1.25 x weights \+ 64\) \| (PASS|MISS)", targets)
    assert "not measured in --quick" in targets or "not installed" in targets


@pytest.mark.slow
def test_quick_serving_benchmark_writes_its_section(tmp_path: Path) -> None:
    """``bench/serving.py --quick``: clients arriving over time and a static batch, through the engine; the
    section replaces an earlier one and keeps the rest of the report."""
    out = tmp_path / "bench.md"
    out.write_text("# Benchmarks\n\n## Other section\n\nkept\n\n## Serving load (issue #9)\n\nold\n")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "serving.py"), "--quick", "--arrival", "0.5",
                        "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    text = out.read_text()
    assert "kept" in text and "\nold\n" not in text and text.count("## Serving load (issue #9)") == 1
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if re.match(r"\| \d+ \|", line)]
    assert [r[0] for r in rows] == ["1", "4"]
    for r in rows:
        assert float(r[2]) > 0 and float(r[4]) > 0 and 0 < float(r[5]) < 60, r     # static, span, TTFT p50
    assert re.search(r"newcomer TTFT p95 / solo TTFT .*\| [\d.]+x \| <= 2x \| (PASS|MISS) \|", text)


@pytest.mark.slow
def test_quick_quality_benchmark_writes_both_tables(tmp_path: Path) -> None:
    """``bench/quality.py --quick``: the bundled GGUF's table, then a GPT-2-shaped float model trained by the bench
    (seconds) and its table; both judged against the targets, with numbers in every cell."""
    out = tmp_path / "bench.md"
    out.write_text("# Benchmarks\n\n## Other section\n\nkept\n\n## Quality of the weight formats\n\nold\n")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--output", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    text = out.read_text()
    assert "kept" in text and "\nold\n" not in text and text.count("## Quality of the weight formats") == 1
    section = text.split("## Quality of the weight formats", 1)[1]
    gguf, trained = section.split("### 2.", 1)
    assert "Q4_1 blocks dequantized" in gguf and "exact by construction" in gguf
    for part in (gguf, trained):
        rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in part.splitlines()
                                  if re.match(r"\| (none|bf16|int8|int4) \|", line))}
        assert list(rows) == ["none", "bf16", "int8", "int4"], part
        for fmt, r in rows.items():
            assert float(r[1]) > 1 and re.fullmatch(r"[+-]\d+\.\d\d%", r[2]), r
            assert re.fullmatch(r"(\d+/16, ){4}\d+/16", r[4]), r
        assert rows["none"][2] == "+0.00%" and rows["none"][4] == "16/16, 16/16, 16/16, 16/16, 16/16"
        assert re.fullmatch(r"<= 1%: (PASS|MISS)", rows["int8"][3]) and re.fullmatch(r"<= 5%: (PASS|MISS)", rows["int4"][3])
        assert re.search(r"int8 greedy text equal to float32 .*: (PASS|MISS)", part)
    # The trained model is float32 weights, not GGUF blocks, and training brought it well below uniform guessing.
    assert "GGUF" not in trained.split("| int4 |", 1)[1].splitlines()[0]
    m = re.search(r"float32 perplexity (\d+) before training .*?, ([\d.]+) after", trained)
    assert m and float(m.group(2)) < 0.8 * float(m.group(1)), trained
