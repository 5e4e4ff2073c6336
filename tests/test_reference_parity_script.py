"""benchmarks/reference_parity.py (our code vs the authors' own, out of the suite) fails cleanly without them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_missing_references_exit_2_with_one_sentence(tmp_path):
    output = tmp_path / "out.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/reference_parity.py"),
            "--references",
            str(tmp_path),
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Missing reference file: ")
    assert str(tmp_path / "OPTML-Group+Unlearn-Saliency" / "Classification/generate_mask.py") in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert not output.exists()
