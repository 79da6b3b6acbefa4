"""The benchmark's run and its report: every section the config asks for, then the table.

`main(config, workdir)` is what experiments/benchmark.py calls: `run` measures the
matmul peak and each section (jax_sections, then torch_sections when torch imports),
saving the JSON after each; the table and a description of the host go to stdout.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import time
from typing import Any, Callable

import jax
import ml_collections

from benchmarks import common
from benchmarks import jax_sections
from jaxrlhf import train_lib


def host_info(devices) -> dict:
  info = {
      "platform": platform.platform(),
      "processor": _cpu_name(),
      "cpu_count": os.cpu_count(),
      "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
      "jax": jax.__version__,
      "devices": [str(d) for d in devices],
      "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
  }
  torch = common.maybe_torch()
  if torch is not None:
    import transformers  # pylint: disable=g-import-not-at-top
    info.update(torch=torch.__version__, transformers=transformers.__version__,
                torch_threads=torch.get_num_threads())
  return info


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _sections(config, mcfg, devices, peak, use_torch: bool) -> list:
  """(name, jax measurement, torch measurement) for every section there is; the torch
  ones are called only when `use_torch`."""
  torch_sections = None
  if use_torch:  # imports torch and transformers
    from benchmarks import torch_sections  # pylint: disable=g-import-not-at-top
  sections = [
      ("sft", lambda: jax_sections.jax_sft(config, mcfg, devices, peak),
       lambda: torch_sections.torch_sft(config, mcfg, peak)),
      ("rm", lambda: jax_sections.jax_rm(config, mcfg, devices, peak),
       lambda: torch_sections.torch_rm(config, mcfg, peak)),
  ]
  for b in config.sampler_batch_sizes:
    sections.append((f"sampler_b{b}",
                     lambda b=b: jax_sections.jax_sampler(config, mcfg, b, peak),
                     lambda b=b: torch_sections.torch_sampler(config, mcfg, b, peak)))
  if config.ppo:
    # One settings object for both frameworks' PPO: a changed setting changes both.
    settings = common.ppo_settings(config, mcfg)
    sections.append((
        "ppo", lambda: jax_sections.jax_ppo(config, mcfg, devices, settings, peak),
        lambda: torch_sections.torch_ppo(config, mcfg, settings, peak)))
  return sections


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print,
        on_section: Callable[[dict], None] | None = None) -> dict:
  """Runs every measurement the config asks for; returns the JSON-able results.

  `on_section(results so far)` runs after each section, so a long run that is stopped
  still leaves what it measured.
  """
  mcfg = common.model_config(config)
  devices = jax.local_devices()[:config.num_devices] if config.num_devices else (
      jax.local_devices())
  use_torch = config.torch and common.maybe_torch() is not None
  results: dict[str, Any] = {
      "model_name": config.model_name,
      "model": {k: v for k, v in vars(mcfg).items() if isinstance(v, (int, float, str))},
      "matmul_params": common.matmul_params(mcfg),
      "shapes": {k: config[k] for k in (
          "train_batch_size", "seq_len", "rm_batch_size", "rm_k", "rm_seq_len",
          "prompt_len", "new_tokens", "sampler_batch_sizes", "ppo_batch_size",
          "ppo_minibatch_size")},
      "repeats": config.repeats, "warmup": config.warmup,
      "host": host_info(devices),
  }
  results["shapes"]["sampler_batch_sizes"] = list(config.sampler_batch_sizes)
  log(f"benchmark {config.model_name}: {results['matmul_params'] / 1e6:.1f}M matmul "
      f"params, jax devices {results['host']['devices']}, torch {use_torch}")
  dtype = config.get("dtype", "float32")
  torch_device = config.get("torch_device", "cpu") if use_torch else "cpu"
  results["dtype"] = dtype
  results["matmul_peak"] = common.measure_matmul_peak(
      config.matmul_size, dtype=dtype, torch_device=torch_device)
  peak = results["matmul_peak"]["peak_flops_per_s"]
  log(f"matmul peak ({dtype}): {peak / 1e9:.1f} GFLOP/s")
  if use_torch:
    results["torch_device"] = str(common.torch_device_of(torch_device))

  frameworks = {"jaxrlhf": {}, "pytorch": {}} if use_torch else {"jaxrlhf": {}}
  results["results"] = frameworks
  for name, jax_fn, torch_fn in _sections(config, mcfg, devices, peak, use_torch):
    if name.split("_")[0] not in config.sections:
      continue
    t0 = time.perf_counter()
    frameworks["jaxrlhf"][name] = jax_fn()
    # On an accelerator: the allocator's peak so far (it cannot be reset between
    # sections, so it only grows) next to the compiled programs' own analysis.
    results.setdefault("device_memory", {})[name] = common.device_memory()
    log(f"  jaxrlhf {name}: {time.perf_counter() - t0:.1f} s")
    if use_torch:
      t0 = time.perf_counter()
      frameworks["pytorch"][name] = torch_fn()
      from benchmarks import torch_sections  # pylint: disable=g-import-not-at-top
      results.setdefault("torch_cuda_peak_bytes", {})[name] = torch_sections.cuda_peak_bytes()
      log(f"  pytorch {name}: {time.perf_counter() - t0:.1f} s")
    gc.collect()
    if on_section is not None:
      on_section(results)
  jax_sections.random_params.cache_clear()
  results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return results


def _sum_of_parts(ppo_entry: dict) -> dict:
  """Rollout + scoring + update as one entry (compile time and memory: the worst part)."""
  parts = [ppo_entry[k] for k in ("rollout", "scoring", "update")]
  seconds = sum(p["median_s"] for p in parts)
  flops = sum(p["flops"] for p in parts)
  peak = parts[0]["flops_per_s"] / parts[0]["mfu"]
  return {"median_s": seconds, "units_per_s": parts[-1]["units"] / seconds,
          "mfu": flops / seconds / peak, "flops": flops,
          "compile_s": sum(p["compile_s"] for p in parts),
          "peak_rss_bytes": max(p["peak_rss_bytes"] for p in parts)}


def _rows(results: dict):
  """(section, what, unit, jax entry, torch entry or None) for every measured figure."""
  jx = results["results"]["jaxrlhf"]
  pt = results["results"].get("pytorch", {})
  units = {"sft": ("SFT train step", "tokens/s"), "rm": ("RM train step", "comparisons/s")}
  for name, entry in jx.items():
    if name == "ppo":
      for part, unit in (("rollout", "tokens/s"), ("scoring", "episodes/s"),
                         ("update", "episodes/s"), ("iteration", "episodes/s")):
        if part in entry:
          yield f"PPO {part}", unit, entry[part], pt.get("ppo", {}).get(part)
      torch_parts = _sum_of_parts(pt["ppo"]) if "ppo" in pt else None
      yield "PPO iteration (sum of parts)", "episodes/s", _sum_of_parts(entry), torch_parts
    elif name.startswith("sampler_b"):
      yield f"sampler batch {name[len('sampler_b'):]}", "tokens/s", entry, pt.get(name)
    else:
      what, unit = units[name]
      yield what, unit, entry, pt.get(name)


def format_table(results: dict) -> str:
  """Markdown table: throughput, step time, MFU, compile time, peak RSS, jax/torch ratio."""
  header = ("| measurement | unit | jaxrlhf | PyTorch | jaxrlhf / PyTorch | jaxrlhf s/call "
            "| PyTorch s/call | jaxrlhf MFU | PyTorch MFU | jaxrlhf compile s "
            "| peak RSS GiB (jax / torch) |")
  lines = [header, "|" + "|".join([" --- "] * (header.count("|") - 1)) + "|"]
  gib = 2.0**30
  for what, unit, jx, pt in _rows(results):
    cells = [what, unit, f"{jx['units_per_s']:.1f}"]
    if pt:
      cells += [f"{pt['units_per_s']:.1f}", f"{jx['units_per_s'] / pt['units_per_s']:.2f}x"]
    else:
      cells += ["-", "-"]
    cells += [f"{jx['median_s']:.3f}", f"{pt['median_s']:.3f}" if pt else "-",
              f"{100 * jx['mfu']:.1f}%", f"{100 * pt['mfu']:.1f}%" if pt else "-",
              f"{jx['compile_s']:.1f}",
              f"{jx['peak_rss_bytes'] / gib:.2f} / "
              + (f"{pt['peak_rss_bytes'] / gib:.2f}" if pt else "-")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def describe(results: dict) -> str:
  host = results["host"]
  peak = results["matmul_peak"]
  load = host.get("load_average")
  lines = [
      f"model {results['model_name']} ({results['model'].get('arch')}, "
      f"{results['matmul_params'] / 1e6:.1f}M matmul params), float32, "
      f"median of {results['repeats']} after {results['warmup']} warm-up",
      f"host: {host['processor']}, {host['cpu_count']} CPUs, load average "
      f"{', '.join(f'{x:.2f}' for x in load) if load else 'n/a'} at start",
      f"jax {host['jax']} on {', '.join(host['devices'])}"
      + (f"; torch {host['torch']} ({host['torch_threads']} threads), transformers "
         f"{host['transformers']}" if "torch" in host else ""),
      f"matmul peak ({peak['size']}^2 float32): jax {peak['jax_flops_per_s'] / 1e9:.1f} "
      f"GFLOP/s" + (f", torch {peak['torch_flops_per_s'] / 1e9:.1f} GFLOP/s"
                    if "torch_flops_per_s" in peak else ""),
      f"shapes: {json.dumps(results['shapes'])}",
      f"process peak RSS {results['peak_rss_bytes'] / 2**30:.2f} GiB",
  ]
  return "\n".join(lines)


def main(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Runs the benchmark, prints the table, writes the JSON (config.output or workdir)."""
  if workdir:
    train_lib.enable_compilation_cache(workdir)
  output = config.output or (os.path.join(workdir, "benchmark.json") if workdir else "")

  def save(results):
    if output and jax.process_index() == 0:
      os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
      with open(output, "w") as f:
        json.dump(results, f, indent=1, default=float)

  results = run(config, on_section=save)
  results["table"] = format_table(results)
  save(results)
  print(describe(results), flush=True)
  print(results["table"], flush=True)
  if output:
    print(f"wrote {output}", flush=True)
  return results
