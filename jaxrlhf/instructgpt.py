"""The whole recipe in one run: pretrain -> SFT -> FLAN baseline -> rankings -> reward model
-> PPO -> PPO-ptx -> evaluate.

Each stage runs in its own sub-directory of the workdir and reads the previous stages'
Hugging Face exports. A stage whose `summary.json` exists is skipped; an interrupted one
resumes from its own checkpoints. The embedded world is written once, to <workdir>/world.
The last stage judges every policy against SFT and writes <workdir>/report.md.
"""

from __future__ import annotations

import importlib
import json
import time

from absl import logging
import jax
import ml_collections
from etils import epath

from jaxrlhf import config_lib
from jaxrlhf import summaries as summaries_lib

# stage name -> (module, its function (config, workdir) -> summary, stage it starts from)
STAGES = {
    "pretrain": ("jaxrlhf.sft", "train_and_evaluate", None),
    "sft": ("jaxrlhf.sft", "train_and_evaluate", "pretrain"),
    # The paper's FLAN / T0 baseline: the base model fine-tuned, with SFT's budget, on
    # the world's public-task collection instead of the users' demonstrations.
    "flan": ("jaxrlhf.sft", "train_and_evaluate", "pretrain"),
    "rankings": ("jaxrlhf.rankings", "collect", "sft"),
    "reward_model": ("jaxrlhf.reward_model", "train_and_evaluate", "sft"),
    "ppo": ("jaxrlhf.ppo", "train_and_evaluate", "sft"),
    "ppo_ptx": ("jaxrlhf.ppo", "train_and_evaluate", "sft"),
    # The paper-scale miniature's (configs/instructgpt.py:paper): a reward model with a
    # larger trunk of its own, and a second round of rankings from the first PPO policy.
    "pretrain_rm": ("jaxrlhf.sft", "train_and_evaluate", None),
    "sft_rm": ("jaxrlhf.sft", "train_and_evaluate", "pretrain_rm"),
    "ppo_round1": ("jaxrlhf.ppo", "train_and_evaluate", "sft"),
    "rankings_round2": ("jaxrlhf.rankings", "collect", "sft"),
    "reward_model_round2": ("jaxrlhf.reward_model", "train_and_evaluate", "sft"),
    "evaluate": ("jaxrlhf.eval.preference", "evaluate_policies", None),
}
# Policies the evaluate stage compares, in table order: (name, stage, export directory).
EVALUATED_POLICIES = (("sft", "sft", "hf"), ("ppo", "ppo", "hf_ema"),
                      ("ppo_ptx", "ppo_ptx", "hf_ema"), ("flan", "flan", "hf"))


def _set_parallel(stage: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
  """The pipeline's config.parallel for a stage that has the section, when its mode is set."""
  pipeline = config.get("parallel")
  if pipeline is not None and pipeline.mode and "parallel" in stage:
    stage.parallel = ml_collections.ConfigDict(pipeline.to_dict())


def evaluate_config(config: ml_collections.ConfigDict,
                    workdir: epath.Path) -> ml_collections.ConfigDict:
  """The evaluate section wired to the pipeline's exports; the report goes to workdir."""
  stage = ml_collections.ConfigDict(config.evaluate.to_dict())
  _set_parallel(stage, config)
  stage.policies = ",".join(f"{name}={workdir / source / export}"
                            for name, source, export in EVALUATED_POLICIES
                            if source in config.stages)
  stage.few_shot.base = str(workdir / "pretrain" / "hf") if "pretrain" in config.stages else ""
  stage.reward_model = (str(workdir / "reward_model" / "hf")
                        if "reward_model" in config.stages else "")
  stage.rankings_file = (str(workdir / "rankings" / "validation.jsonl")
                         if "rankings" in config.stages else "")
  stage.world_dir = str(workdir / "world")
  stage.world = ml_collections.ConfigDict(config.world.to_dict())
  stage.report_dir = str(workdir)
  stage.pipeline_dir = str(workdir)
  _wire(stage, config.get("wiring", {}).get("evaluate"), workdir, "evaluate")
  return stage


def _resolve(spec: str, workdir: epath.Path) -> str:
  """'stage/export' (or 'name=stage/export'), comma-separated, as paths in the workdir."""
  out = []
  for item in str(spec).split(","):
    name, sep, rel = item.strip().rpartition("=")
    out.append(f"{name}{sep}{workdir / rel.strip()}")
  return ",".join(out)


def _wire(stage: ml_collections.ConfigDict, wiring, workdir: epath.Path, where: str) -> None:
  """`config.wiring.<stage>`: fields of the stage's section set to other stages' outputs,
  e.g. {"init_from": "sft_rm/hf", "data": {"rankings_dir": "rankings,rankings_round2"}}."""
  for field, spec in (wiring or {}).items():
    if field not in stage:
      raise config_lib.ConfigError(f"config.wiring.{where}.{field}: the stage's section "
                                   "has no such field")
    if isinstance(spec, (dict, ml_collections.ConfigDict)):
      _wire(stage[field], spec, workdir, f"{where}.{field}")
    else:
      stage[field] = _resolve(spec, workdir)


def stage_config(config: ml_collections.ConfigDict, name: str,
                 workdir: epath.Path) -> ml_collections.ConfigDict:
  """A copy of the stage's section wired to the previous stages' exports."""
  if name == "evaluate":
    return evaluate_config(config, workdir)
  stage = ml_collections.ConfigDict(config[name].to_dict())
  stage.name = name  # what the stage's console lines and logs call it
  # Another training seed (init, data order, sampling) on the same world.
  stage.seed = stage.seed + config.get("seed", 0)
  _set_parallel(stage, config)
  stage.data.world_dir = str(workdir / "world")
  stage.data.world = ml_collections.ConfigDict(config.world.to_dict())
  parent = STAGES[name][2]
  if name.startswith("ppo"):
    stage.policy_init_from = str(workdir / parent / "hf")
    stage.reward_init_from = str(workdir / "reward_model" / "hf")
  elif name.startswith("rankings"):
    stage.policy = str(workdir / parent / "hf")
  elif parent is not None:
    stage.init_from = str(workdir / parent / "hf")
  if name.startswith("reward_model"):
    stage.data.rankings_dir = str(workdir / "rankings")
  _wire(stage, config.get("wiring", {}).get(name), workdir, name)
  return stage


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  summaries = {}
  for name in config.stages:
    if name not in STAGES:
      raise config_lib.ConfigError(f"config.stages: unknown stage {name!r}; known: {list(STAGES)}")
    stage_dir = workdir / name
    done = stage_dir / "summary.json"
    if done.exists():
      print(f"[instructgpt] {name}: already finished in {stage_dir}, skipping", flush=True)
      summaries[name] = json.loads(done.read_text())
      continue
    print(f"[instructgpt] {name}: running in {stage_dir}", flush=True)
    t0 = time.time()
    module_name, function_name, _ = STAGES[name]
    run_stage = getattr(importlib.import_module(module_name), function_name)
    summary = run_stage(stage_config(config, name, workdir), str(stage_dir))
    if summary.get("preempted"):
      print(f"[instructgpt] {name}: preempted; run the same command to resume.", flush=True)
      return summaries
    logging.info("%s finished in %.0fs", name, time.time() - t0)
    summaries[name] = summary
  if jax.process_index() == 0:
    (workdir / "pipeline_summary.json").write_text(json.dumps(summaries, indent=2,
                                                              default=str))
    print_summary(summaries, workdir)
  return summaries


def print_summary(summaries: dict, workdir) -> None:
  """Each stage's result in one line, then the evaluation's table (jaxrlhf/summaries.py)."""
  print("\n[instructgpt] results", flush=True)
  for name, s in summaries.items():
    if name != "evaluate":
      print(f"  {name:>13}: {summaries_lib.view(name, s).describe()}", flush=True)
  if summaries.get("evaluate"):
    evaluation = summaries_lib.Evaluation.from_summary(summaries["evaluate"])
    print(f"  {evaluation.header()}; 95% intervals:", flush=True)
    for line in evaluation.lines():
      print(f"  {line}", flush=True)
  print(f"  summaries: {workdir / 'pipeline_summary.json'}", flush=True)
  report = (summaries.get("evaluate") or {}).get("report")
  if report:
    print(f"  report: {report}", flush=True)
