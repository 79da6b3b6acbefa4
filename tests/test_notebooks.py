"""The Colab notebooks run top to bottom (nbclient), on the session pipeline's exports."""

import os
import pathlib
import shutil

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ("quickstart.ipynb", "hf_checkpoint.ipynb")


def execute(name: str, env: dict[str, str]):
  """Runs colab/<name> in a fresh kernel that inherits `env`; returns the notebook."""
  import nbclient
  notebook = nbformat.read(REPO / "colab" / name, as_version=4)
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  try:
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "colab")}}).execute()
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
  return notebook


def stream_text(notebook) -> str:
  return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def count_images(notebook) -> int:
  return sum("image/png" in out.get("data", {}) for cell in notebook.cells
             if cell.cell_type == "code" for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_valid_and_install_on_colab(name):
  notebook = nbformat.read(REPO / "colab" / name, as_version=4)
  nbformat.validate(notebook)
  first_code = next(c for c in notebook.cells if c.cell_type == "code").source
  assert "google.colab" in first_code and "pip" in first_code


def test_quickstart_runs_the_pipeline_and_shows_the_report(chain, tmp_path):
  # A copy of the session's finished pipeline minus its evaluation: the notebook skips
  # the trained stages, runs the evaluation, and shows the report's plots.
  workdir = tmp_path / "quickstart"
  shutil.copytree(chain["root"], workdir)
  shutil.rmtree(workdir / "evaluate")
  shutil.rmtree(workdir / "plots")
  (workdir / "report.md").unlink()
  notebook = execute("quickstart.ipynb", {"JAXRLHF_QUICKSTART_VARIANT": "test",
                                          "JAXRLHF_QUICKSTART_WORKDIR": str(workdir)})
  text = stream_text(notebook)
  assert "sft: already finished" in text and "evaluate: running" in text
  for name in ("ppo", "ppo_ptx", "base_few_shot"):
    assert f"{name:>14}: win rate" in text
  from jaxrlhf.eval import report  # pylint: disable=g-import-not-at-top
  assert count_images(notebook) == len(report.PLOTS) == 4  # gold against proxy included
  assert (workdir / "report.md").exists()


def test_checkpoint_notebook_samples_and_keeps_the_best_of_n(chain):
  root = chain["root"]
  notebook = execute("hf_checkpoint.ipynb", {
      "JAXRLHF_POLICY": str(root / "ppo_ptx" / "hf_ema"),
      "JAXRLHF_REWARD_MODEL": str(root / "reward_model" / "hf")})
  text = stream_text(notebook)
  assert "24 answers;" in text
  best = text.split("Best of n")[-1] if "Best of n" in text else text
  assert sum("(score " in line for line in best.splitlines()) == 6
