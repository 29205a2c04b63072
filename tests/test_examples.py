"""The shipped examples run as written (the seed's own example included)."""
import os
import subprocess
import sys
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, timeout: float = 120) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_seed_threading_example_runs_verbatim():
    run_example("seed_threading.py")


def test_threaded_actors_example_batches():
    out = run_example("threaded_actors.py")
    assert "requests=3200" in out
    mean_batch = float(out.split("mean_batch=")[1].split()[0])
    assert mean_batch > 1.0


def test_readme_usage_snippet_runs(tmp_path):
    """The first code block of the README's "Quickstart" section runs as printed."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    script = tmp_path / "readme_use.py"
    script.write_text(block)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "'requests': 1000" in p.stdout
