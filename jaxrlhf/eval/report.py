"""report.md and its plots, from `preference.evaluate_policies` results and a pipeline run.

The report holds the paper's comparison table (win rate against SFT with its interval,
Likert, exact correctness, KL from SFT, held-out text NLL and the alignment tax), the
same per instruction type, the reward model's held-out accuracy next to the labelers'
agreement, PNG plots (PPO score and KL over iterations, the score-KL frontier, win
rates), and a few answers per policy. The plots also go to TensorBoard under <dir>/tb.
"""

from __future__ import annotations

import json
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Files only; no display on a TPU VM or in CI.
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
from etils import epath  # noqa: E402

from jaxrlhf import metrics as metrics_lib  # noqa: E402
from jaxrlhf import summaries as summaries_lib  # noqa: E402
from jaxrlhf.data.world import labeler as labeler_lib  # noqa: E402
from jaxrlhf.eval import judging  # noqa: E402

PPO_STAGES = ("ppo", "ppo_ptx")
PLOTS = ("ppo_curves.png", "frontier.png", "gold_vs_proxy.png", "win_rates.png")
# One colour per policy across every figure (PPO stages and the evaluated policies share
# names); others take the next unused colour.
_COLORS = {"sft": "tab:gray", "ppo": "tab:blue", "ppo_ptx": "tab:orange",
           "base_few_shot": "tab:green"}
_SPARE = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


# reward_model_check's `by_difference` groups, as the report names them.
REWARD_CHECK_SPLITS = {
    "content": "pairs that differ only in what the answer says (correct, constraint)",
    "form": "that differ only in how it ends (stopped, concise)",
    "both": "that differ in both"}


def color(name: str) -> str:
  if name not in _COLORS:
    _COLORS[name] = _SPARE[(len(_COLORS) - 4) % len(_SPARE)]
  return _COLORS[name]


def policy_names(results: dict) -> list[str]:
  """Policies in table order (JSON files may hold them with sorted keys)."""
  return list(results.get("policy_order") or results["policies"])


def _fmt(value: Any, digits: int = 3) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "–"
  return f"{value:.{digits}f}"


def _read_json(path: epath.Path) -> dict | None:
  return json.loads(path.read_text()) if path.exists() else None


def ppo_histories(pipeline_dir: epath.Path | None) -> dict[str, list[dict]]:
  """{stage: metrics rows} of the PPO stages present in a pipeline workdir."""
  out = {}
  if pipeline_dir is None:
    return out
  for stage in PPO_STAGES:
    if (pipeline_dir / stage / "metrics.jsonl").exists():
      out[stage] = metrics_lib.read_jsonl_scalars(pipeline_dir / stage)
  return out


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
  return [p[0] for p in points], [p[1] for p in points]


# ---------------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------------


def figure_ppo_curves(histories: dict[str, list[dict]]):
  """Training score, KL and held-out text NLL over PPO iterations, one line per stage."""
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  panels = (("score", "eval_policy_score", "reward-model score"),
            ("kl_k1", "eval_policy_kl_k1", "KL from SFT (nats per answer)"),
            (None, "eval_policy_pretrain_nll", "held-out text NLL"))
  for ax, (train_key, eval_key, title) in zip(axes, panels):
    for stage, rows in histories.items():
      if train_key:
        steps, values = _series(rows, train_key)
        ax.plot(steps, values, color=color(stage), label=f"{stage} (rollouts)", alpha=0.35)
      steps, values = _series(rows, eval_key)
      ax.plot(steps, values, "o-", color=color(stage), label=f"{stage} (held-out)",
              markersize=3)
    ax.set_title(title)
    ax.set_xlabel("PPO iteration")
    ax.grid(alpha=0.3)
  for ax in axes:
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def figure_frontier(histories: dict[str, list[dict]], results: dict):
  """Held-out RM score against KL from SFT: each evaluation of each PPO run, and the
  final comparison's policies."""
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for stage, rows in histories.items():
    points = [(r["eval_policy_kl_k1"], r["eval_policy_score"]) for r in rows
              if isinstance(r.get("eval_policy_kl_k1"), (int, float))
              and isinstance(r.get("eval_policy_score"), (int, float))]
    if points:
      ax.plot(*zip(*points), "o-", markersize=3, color=color(stage),
              label=f"{stage} over training")
  for name in policy_names(results):
    entry = results["policies"][name]
    if entry.get("kl_from_reference") is not None and entry.get("rm_score") is not None:
      ax.scatter([entry["kl_from_reference"]], [entry["rm_score"]], marker="*", s=160,
                 zorder=3, color=color(name), edgecolors="black",
                 label=f"{name} (final evaluation)")
  ax.set_xlabel("KL from SFT (nats per answer)")
  ax.set_ylabel("reward-model score")
  ax.set_title("score-KL frontier")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def figure_gold_vs_proxy(curves: dict):
  """Proxy (reward-model score) and gold (labeler's latent quality) against KL."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, key, title in ((axes[0], "proxy", "proxy: reward-model score"),
                         (axes[1], "gold", "gold: labeler's latent quality (1-7)")):
    for name, points in curves.items():
      ax.plot([p["kl"] for p in points], [p[key] for p in points],
              "s--" if name == "best_of_n" else "o-", markersize=3,
              color=color(name), label=name.replace("_", "-"))
    ax.set_xlabel("KL from SFT (nats per answer)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def figure_win_rates(results: dict):
  """Win rate against the baseline with 95% intervals; the baseline's 50% line."""
  names = [n for n in policy_names(results)
           if results["policies"][n].get("win_rate") is not None]
  rates = [results["policies"][n]["win_rate"] for n in names]
  lows = [r - results["policies"][n]["win_rate_ci95"][0] for n, r in zip(names, rates)]
  highs = [results["policies"][n]["win_rate_ci95"][1] - r for n, r in zip(names, rates)]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names) + 1.5), 3.6))
  ax.bar(names, rates, yerr=[lows, highs], capsize=6, color=[color(n) for n in names],
         alpha=0.85)
  ax.axhline(0.5, color="gray", linestyle="--", linewidth=1,
             label=f"{results['baseline']} (50%)")
  ax.set_ylim(0, 1)
  ax.set_ylabel(f"win rate vs {results['baseline']}")
  ax.set_title(f"judged by the {results['judge'].replace('_', ' ')}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def write_plots(report_dir: epath.Path, results: dict, histories: dict) -> list[str]:
  """Writes the PNGs to <report_dir>/plots and the same figures to TensorBoard."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  plot_dir = report_dir / "plots"
  plot_dir.mkdir(parents=True, exist_ok=True)
  figures = {"win_rates.png": figure_win_rates(results)}
  if histories:
    figures["ppo_curves.png"] = figure_ppo_curves(histories)
    figures["frontier.png"] = figure_frontier(histories, results)
  else:
    figures["frontier.png"] = figure_frontier({}, results)
  curves = results.get("gold_vs_proxy") or judging.gold_vs_proxy(histories, results)
  if curves:
    figures["gold_vs_proxy.png"] = figure_gold_vs_proxy(curves)
  tb = SummaryWriter(logdir=str(report_dir / "tb"))
  written = []
  for name, fig in figures.items():
    fig.savefig(str(plot_dir / name), dpi=110)
    tb.add_figure(f"report/{name[:-4]}", fig, 0, close=True)
    written.append(name)
  tb.close()
  return written


# ---------------------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------------------


def _main_table(results: dict) -> list[str]:
  lines = [
      f"| policy | win rate vs {results['baseline']} (95% CI) | RM-judged win rate | "
      "Likert (1-7) | exact correct | closed-domain hallucination | KL from SFT | "
      "held-out text NLL | alignment tax | RM score | length | stopped |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name in policy_names(results):
    e = results["policies"][name]
    if e.get("win_rate") is None:
      rate = "50% (baseline)"
    else:
      rate = _pct(e["win_rate"], e["win_rate_ci95"], bold=True)
    rm = e.get("rm_judged")
    rm_rate = f"{100 * rm['win_rate']:.1f}%" if rm else "–"
    tax = e.get("alignment_tax")
    tax_text = "–" if tax is None else f"{tax:+.3f}"
    label = f"{name} (few-shot)" if e.get("few_shot") else name
    lines.append(
        f"| {label} | {rate} | {rm_rate} | {_fmt(e.get('likert'), 2)} | "
        f"{_fmt(e.get('exact_correct'), 2)} | {_fmt(e.get('hallucination'), 2)} | "
        f"{_fmt(e.get('kl_from_reference'), 2)} | "
        f"{_fmt(e.get('pretrain_nll'))} | {tax_text} | {_fmt(e.get('rm_score'), 2)} | "
        f"{_fmt(e.get('response_length'), 1)} | {_fmt(e.get('stopped_fraction'), 2)} |")
  return lines


def _task_table(results: dict) -> list[str]:
  names = [n for n in policy_names(results) if "per_task" in results["policies"][n]]
  if not names:
    return []
  tasks = sorted({t for n in names for t in results["policies"][n]["per_task"]})
  lines = ["| instruction | n | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
  for task in tasks:
    cells = []
    for n in names:
      cell = results["policies"][n]["per_task"].get(task)
      cells.append("–" if cell is None else
                   f"{cell['likert']:.2f} / {100 * cell['exact_correct']:.0f}%")
    count = results["policies"][names[0]]["per_task"].get(task, {}).get("n", 0)
    lines.append(f"| {task} | {count} | " + " | ".join(cells) + " |")
  return lines


def _hallucination_table(results: dict) -> list[str]:
  """Per policy and closed-domain task: the share of answers with a made-up symbol."""
  names = [n for n in policy_names(results)
           if results["policies"][n].get("hallucination") is not None]
  if not names:
    return []
  tasks = sorted({t for n in names for t, c in results["policies"][n]["per_task"].items()
                  if "hallucination" in c})
  lines = ["| instruction | n | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
  for task in tasks + ["all closed-domain"]:
    cells = []
    for n in names:
      e = results["policies"][n]
      value = e["hallucination"] if task == "all closed-domain" else (
          e["per_task"].get(task, {}).get("hallucination"))
      cells.append("–" if value is None else f"{100 * value:.1f}%")
    first = results["policies"][names[0]]
    count = (first.get("hallucination_n", 0) if task == "all closed-domain"
             else first["per_task"][task]["n"])
    lines.append(f"| {task} | {count} | " + " | ".join(cells) + " |")
  return lines


def _held_out_lines(results: dict) -> list[str]:
  """Win rates judged by a labeler group that wrote no training data, and the reward
  model's accuracy on its rankings against the training labelers'."""
  names = [n for n in policy_names(results) if results["policies"][n].get("held_out_labelers")]
  if not names:
    return []
  weights = ", ".join(f"{k} {v}" for k, v in labeler_lib.HELD_OUT_WEIGHTS.items())
  lines = [f"A second group of simulated labelers, who made none of the training data, "
           f"with weights of their own ({weights}) and their own calibrated noise, judges "
           "the same answers.", "",
           f"| policy | win rate vs {results['baseline']}, training labelers | "
           "held-out labelers |", "|---|---|---|"]
  for n in names:
    e = results["policies"][n]
    lines.append(f"| {n} | {_pct(e['labeler']['win_rate'], e['labeler']['ci95'])} | "
                 f"{_pct(e['held_out_labelers']['win_rate'], e['held_out_labelers']['ci95'])} |")
  check = results.get("reward_model_check") or {}
  if check.get("rm_vs_held_out_labelers") is not None:
    lines += ["", f"The reward model agrees with **{_fmt(check['rm_vs_held_out_labelers'])}** "
              f"of the held-out labelers' {check['held_out_labeler_pairs']} untied pairs of "
              f"`{check['file']}` and with {_fmt(check['rm_vs_training_labelers'])} of the "
              f"training labelers' {check['training_labeler_pairs']} (the paper: "
              "69.6 ± 0.9% on held-out labelers, 72.4 ± 0.4% on training labelers)."]
  return lines


def _gold_lines(curves: dict) -> list[str]:
  if not curves:
    return []
  lines = ["The reward model's score (proxy) and the labeler's noiseless latent quality "
           "(gold, 1-7) of held-out answers, against KL from SFT: over PPO iterations, and "
           "for the reward model's best of n SFT answers. Where proxy keeps rising and gold "
           "does not, the policy optimises the reward model past what it knows.", "",
           "| run | at | KL | proxy | gold |", "|---|---|---|---|---|"]
  for name, points in curves.items():
    for p in points:
      at = f"n = {p['n']}" if "n" in p else f"iteration {p['iteration']}"
      lines.append(f"| {name} | {at} | {p['kl']:.3f} | {p['proxy']:.3f} | {p['gold']:.3f} |")
  return lines


def _terms_table(results: dict) -> list[str]:
  """Mean of each term of the labeler's latent quality, per policy (labeled prompts)."""
  names = [n for n in policy_names(results) if "quality_terms" in results["policies"][n]]
  if not names:
    return []
  # The labeler's order, not the file's: summary.json is written with sorted keys.
  terms = [t for t in labeler_lib.WEIGHTS if t in results["policies"][names[0]]["quality_terms"]]
  lines = ["| policy | " + " | ".join(terms) + " |", "|---|" + "---|" * len(terms)]
  for n in names:
    values = results["policies"][n]["quality_terms"]
    lines.append(f"| {n} | " + " | ".join(f"{values[t]:.3f}" for t in terms) + " |")
  return lines


def _pct(rate: float, ci95, bold: bool = False) -> str:
  """A win rate with its 95% interval, in percent."""
  mark = "**" if bold else ""
  return f"{mark}{100 * rate:.1f}%{mark} [{100 * ci95[0]:.1f}, {100 * ci95[1]:.1f}]"


def _outcome_pct(outcome: dict) -> str:
  return _pct(outcome["win_rate"], outcome["ci95"])


def _headroom_lines(results: dict) -> list[str]:
  """Reference answers and the best-of-n table (labeler-judged results only)."""
  lines = []
  reference = results.get("reference_answers")
  baseline = results.get("baseline")
  if reference:
    lines += [f"Against {baseline}'s answers, the right answer (stopped, nothing extra) wins "
              f"{_outcome_pct(reference['right_answer'])}; {baseline}'s own answers with everything "
              f"after the answer cut off win {_outcome_pct(reference['baseline_without_extra'])}: "
              "what a policy gains by form alone.", ""]
  table = results.get("best_of_n")
  if table:
    pickers = [p for p in ("reward_model", "labeler") if p in table]
    names = {"reward_model": "picked by the reward model", "labeler": "picked by the labeler"}
    lines += [f"Best of n {baseline} answers per prompt (KL from {baseline} at most "
              "log n - (n-1)/n nats), judged against another of its answers:", "",
              "| n | KL bound | " + " | ".join(f"{names[p]}: win rate | correct"
                                          for p in pickers) + " |",
              "|---|---|" + "---|---|" * len(pickers)]
    for i, n in enumerate(table["n"]):
      cells = [f"{_outcome_pct(table[p][i])} | {table[p][i]['correct']:.3f}" for p in pickers]
      lines.append(f"| {n} | {table['kl_bound'][i]:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Where the reward model's picks stop improving with n while the labeler's "
              "keep improving, optimising this reward model harder cannot help: PPO against "
              "it, at a similar KL, can be expected to do about as well as its column, and "
              "the labeler's column is what a better reward model would be worth.", ""]
  return lines


_STAGE_NOTES = {
    "reward_model": " The paper: about 73% agreement between labelers, 72-73% RM accuracy. "
                    "Agreement counts a tie as a verdict; the RM's accuracy is over untied "
                    "pairs.",
}


def _stage_lines(pipeline_dir: epath.Path | None) -> list[str]:
  """A line a stage, in the words of its typed summary (jaxrlhf/summaries.py)."""
  if pipeline_dir is None:
    return []
  lines = []
  for stage in ("pretrain", "sft", "rankings", "reward_model", *PPO_STAGES):
    s = _read_json(pipeline_dir / stage / "summary.json")
    if not s:
      continue
    view = summaries_lib.view(stage, s)
    name = stage.replace("_", " ") if stage == "reward_model" else stage
    if stage in PPO_STAGES:
      name = f"{stage} (ptx coefficient {view.ptx_coef})"
    lines.append(f"- **{name}**: {view.describe()} ({_fmt(view.seconds, 0)} s)."
                 + _STAGE_NOTES.get(stage, ""))
  return lines


def write_report(report_dir, results: dict, pipeline_dir=None) -> epath.Path:
  """Writes <report_dir>/report.md (and plots/, tb/); returns the report's path."""
  report_dir = epath.Path(report_dir)
  report_dir.mkdir(parents=True, exist_ok=True)
  pipeline_dir = epath.Path(pipeline_dir) if pipeline_dir else None
  histories = ppo_histories(pipeline_dir)
  plots = write_plots(report_dir, results, histories)
  judge = ("the simulated labeler (one noisy rating of each answer; the higher wins)"
           if results["judge"] == "labeler" else f"the reward model {results['reward_model']}")
  lines = [
      "# InstructGPT recipe: evaluation report",
      "",
      f"{results['num_prompts']} held-out prompts ({', '.join(results['prompt_files'])}); "
      f"every policy answers each once (temperature {results['temperature']}"
      f"{', greedy' if results['greedy'] else ''}). Win rate: share of prompts on which "
      f"{judge} prefers the policy's answer to {results['baseline']}'s, ties counting "
      "half, with the 95% normal interval over prompts. KL: mean over prompts of "
      "sum_t log pi/pi_SFT on the policy's own answers. Alignment tax: held-out text NLL "
      f"minus {results['baseline']}'s.",
      "",
      "## Results",
      "",
      *_main_table(results),
      "",
  ]
  if "flan" in results["policies"]:
    lines += ["`flan` is the paper's FLAN / T0 baseline: the base model fine-tuned, with "
              "SFT's budget, on the world's public-task collection (the same tasks in fixed "
              "academic templates, answered right) instead of the users' demonstrations.",
              ""]
  tasks = _task_table(results)
  if tasks:
    lines += ["## Per instruction type (Likert / exact correct)", "", *tasks, ""]
  made_up = _hallucination_table(results)
  if made_up:
    lines += ["## Closed-domain hallucination",
              "",
              "Share of answers, to the instructions whose answer must come from the "
              "input, that hold a symbol the input does not (the paper's closed-domain "
              "hallucination: about 41% for GPT-3 and 21% for InstructGPT on its "
              "summarisation and closed-domain QA prompts). The labeler records it beside "
              "its rating (`evaluate/responses.jsonl`, field `labeler`).",
              "", *made_up, ""]
  terms = _terms_table(results)
  if terms:
    lines += ["## What the labeler rewards",
              "",
              "Mean of each term of the labeler's latent quality (0 to 1; weights "
              + ", ".join(f"{k} {v}" for k, v in labeler_lib.WEIGHTS.items())
              + "): a policy that beats "
              "SFT only on `concise` has learned to drop the demonstrators' filler, not to "
              "answer better.",
              "", *terms, ""]
  check = results.get("reward_model_check")
  if check and check.get("rm_vs_noiseless") is not None:
    lines += [f"Against the labeler's noiseless quality, the reward model orders "
              f"**{_fmt(check['rm_vs_noiseless'])}** of {check['pairs']} held-out ranked "
              f"pairs correctly (`{check['file']}`); the recorded noisy ranks order "
              f"{_fmt(check['ranks_vs_noiseless'])} of the {check['untied_rank_pairs']} they "
              "do not tie. The gap is what PPO cannot learn from the reward model."]
    split = check.get("by_difference") or {}
    parts = [f"{_fmt(split[name]['rm_vs_noiseless'])} of the {split[name]['pairs']} "
             f"{REWARD_CHECK_SPLITS[name]}"
             for name in REWARD_CHECK_SPLITS
             if split.get(name) and split[name]["rm_vs_noiseless"] is not None]
    if parts:
      lines += ["By what tells the pair apart, it orders " + "; ".join(parts) + "."]
    lines.append("")
  held = _held_out_lines(results)
  if held:
    lines += ["## Held-out labelers", "", *held, ""]
  gold = _gold_lines(results.get("gold_vs_proxy")
                     or judging.gold_vs_proxy(histories, results))
  if gold:
    lines += ["## Gold against proxy", "", *gold, ""]
  headroom = _headroom_lines(results)
  if headroom:
    lines += ["## How far the reward model can take the baseline", "", *headroom]
  stages = _stage_lines(pipeline_dir)
  if stages:
    lines += ["## Stages", "", *stages, ""]
  lines += ["## Plots", ""]
  titles = {"ppo_curves.png": "PPO and PPO-ptx over iterations",
            "frontier.png": "Score against KL from SFT",
            "gold_vs_proxy.png": "Gold and proxy against KL from SFT",
            "win_rates.png": "Win rates with 95% intervals"}
  for name in PLOTS:
    if name in plots:
      lines += [f"![{titles[name]}](plots/{name})", ""]
  lines += [f"The same figures are in TensorBoard: `tensorboard --logdir {report_dir / 'tb'}`.",
            ""]
  if results.get("samples"):
    lines += ["## Sample answers", ""]
    for sample in results["samples"]:
      lines.append(f"- `{sample['prompt']}`")
      for name in policy_names(results):
        text = sample["responses"].get(name)
        lines.append(f"  - {name}: `{text or '(empty)'}`")
    lines.append("")
  path = report_dir / "report.md"
  path.write_text("\n".join(lines))
  return path
