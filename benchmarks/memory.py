"""Per-device memory of each stage's compiled step, from abstract shapes: nothing is
allocated, so a 7B model's figures come from a laptop.

Each step is lowered exactly as the stages build it (`parallel.pmap_step`), with every
input a `jax.ShapeDtypeStruct`, compiled, and read back through `memory_analysis()`:
arguments (the state and the batch), outputs, temporaries and the generated code, per
device. Under pmap (`config.mode`) every device holds the whole state, so the figures
are per device whatever the device count and one device is compiled for. In mesh mode
the step is partitioned over `config.mesh` (the state split over fsdp and tensor, the
batch over data and fsdp), which needs that many devices; on a CPU host, force them:

    python -m experiments.memory_report --config=configs/memory.py --workdir=/tmp/mem
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m experiments.memory_report --config=configs/memory.py:mesh
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxrlhf import config_lib
from jaxrlhf import losses
from jaxrlhf import model_lib
from jaxrlhf import models
from jaxrlhf import optim
from jaxrlhf import parallel
from jaxrlhf import ppo
from jaxrlhf import reward_model
from jaxrlhf import sft
from jaxrlhf import train_lib
from jaxrlhf.ppo import state as ppo_state

GIB = 1024 ** 3


def model_config(section: ml_collections.ConfigDict, dtype: str, param_dtype: str
                 ) -> models.TransformerConfig:
  fields = dict(section)
  arch = fields.pop("arch")
  return models.TransformerConfig.for_arch(
      arch, **fields, dtype=model_lib.dtype_from_name(dtype),
      param_dtype=model_lib.dtype_from_name(param_dtype))


def _abstract_params(module):
  return jax.eval_shape(lambda: models.init_params(module, jax.random.key(0)))


def _per_device(tree):
  """A leading device axis of 1 on every leaf, as pmap sees its arguments."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + tuple(x.shape), x.dtype), tree)


@dataclasses.dataclass(frozen=True)
class Placement:
  """How abstract inputs are laid out: pmap on one device, or a mesh `layout`."""
  layout: parallel.Layout

  @property
  def devices(self) -> int:
    return self.layout.mesh.size if self.layout.is_mesh else 1

  def state(self, tree):
    if not self.layout.is_mesh:
      return _per_device(tree)
    return parallel.map_state(lambda path, x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=parallel.param_sharding(x.shape, self.layout, path)),
        tree)

  def rows(self, tree, row_axis: int = 0):
    """A batch built with one device's rows: pmap's, or the mesh's global batch."""
    if not self.layout.is_mesh:
      return _per_device(tree)
    sharding = jax.sharding.NamedSharding(self.layout.mesh, parallel.rows_spec(row_axis))

    def grow(x):
      shape = list(x.shape)
      shape[row_axis] *= self.devices
      return jax.ShapeDtypeStruct(tuple(shape), x.dtype, sharding=sharding)
    return jax.tree.map(grow, tree)

  def step(self, fn):
    if not self.layout.is_mesh:
      return parallel.pmap_step(fn, devices=jax.local_devices()[:1])
    with parallel.using(self.layout):
      return parallel.pmap_step(fn)


PMAP = Placement(parallel.Layout())


def _tokens(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.int32)


def _analysis(compiled, seconds: float, params: int) -> dict:
  m = compiled.memory_analysis()
  out = {name: int(getattr(m, f"{name}_size_in_bytes"))
         for name in ("argument", "output", "temp", "generated_code", "alias")}
  # Donated state is aliased to the outputs: count it once.
  out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  out["peak_gib"] = round(out["peak_estimate"] / GIB, 3)
  out["parameters"] = params
  out["compile_seconds"] = round(seconds, 1)
  return out


def _compile(fn, *args):
  t0 = time.time()
  compiled = fn.lower(*args).compile()
  return compiled, time.time() - t0


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def sft_step(mcfg, tx, batch: int, seq_len: int, place: Placement = PMAP) -> dict:
  model = models.CausalLM(mcfg)
  params = _abstract_params(model)
  state = jax.eval_shape(lambda p: train_lib.create_train_state(model.apply, p, tx, 0), params)
  data = {"input_ids": _tokens(batch, seq_len), "attention_mask": _tokens(batch, seq_len),
          "loss_mask": _tokens(batch, seq_len)}
  step = place.step(functools.partial(sft.lm_train_step, dropout=False))
  return _analysis(*_compile(step, place.state(state), place.rows(data)), _count(params))


def rm_step(mcfg, tx, batch: int, k: int, seq_len: int, place: Placement = PMAP) -> dict:
  model = models.ScalarHeadModel(mcfg)
  params = _abstract_params(model)
  state = jax.eval_shape(lambda p: train_lib.create_train_state(model.apply, p, tx, 0), params)
  # The loaders' packed layout (data/buckets.py), every response slot real: the most a
  # batch of `batch` rankings of K responses can hold.
  data = {"input_ids": _tokens(batch * k, seq_len), "attention_mask": _tokens(batch * k, seq_len),
          "end_index": _tokens(batch * k), "slot": _tokens(batch, k),
          "pair_mask": jax.ShapeDtypeStruct((batch, k, k), jnp.float32)}
  step = place.step(functools.partial(reward_model.rm_train_step, dropout=False))
  return _analysis(*_compile(step, place.state(state), place.rows(data)), _count(params))


def ppo_iteration(mcfg, tx, *, batch: int, minibatch: int, prompt_len: int,
                  new_tokens: int, ptx_batch: int, ptx_seq_len: int,
                  place: Placement = PMAP, frozen_dtype: Any = None) -> dict:
  """One PPO-ptx iteration (sampling, scoring, updates, KL controller) per device: policy,
  value, frozen reference and reward model, two optimizer states and the EMA."""
  policy, value = models.CausalLM(mcfg), models.ScalarHeadModel(mcfg)
  sft_params, rm_params = _abstract_params(policy), _abstract_params(value)

  frozen = (lambda tree: tree) if frozen_dtype is None else (
      lambda tree: jax.tree.map(lambda x: x.astype(frozen_dtype), tree))

  def make_state(sft_params, rm_params):
    return ppo_state.PPOState(
        policy=train_lib.create_train_state(policy.apply, sft_params, tx, 0),
        value=train_lib.create_train_state(value.apply, rm_params, tx, 0),
        ref_params=frozen(sft_params), reward_params=frozen(rm_params),
        reward_gain=jnp.ones((), jnp.float32), reward_bias=jnp.zeros((), jnp.float32),
        kl=losses.KLControllerState.create(0.02), ema_params=sft_params,
        iteration=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(0)))

  state = jax.eval_shape(make_state, sft_params, rm_params)
  settings = ppo.PPOSettings(
      max_new_tokens=new_tokens, stop_token_id=mcfg.vocab_size - 1, pad_token_id=0,
      num_epochs=1, num_minibatches=batch // minibatch,
      episodes_per_iteration=batch * place.devices,
      ptx_coef=1.0)
  prompts = {"prompt_ids": _tokens(batch, prompt_len), "prompt_mask": _tokens(batch, prompt_len)}
  updates = settings.updates_per_iteration
  ptx = {"input_ids": _tokens(updates, ptx_batch, ptx_seq_len),
         "attention_mask": _tokens(updates, ptx_batch, ptx_seq_len),
         "loss_mask": _tokens(updates, ptx_batch, ptx_seq_len)}
  step = place.step(functools.partial(ppo.train_iteration, policy_model=policy,
                                      settings=settings))
  params = _count(sft_params) * 3 + _count(rm_params) * 2  # policy, ref, EMA; value, RM
  return _analysis(*_compile(step, place.state(state), place.rows(prompts),
                             place.rows(ptx, row_axis=1)), params)


def report(config: ml_collections.ConfigDict) -> dict:
  """{model: {stage: figures}} for every model and stage the config lists."""
  opt = optim.default_optimizer_config()
  opt.name = "adamw"
  tx, _ = optim.make_optimizer(opt)
  layout = parallel.make_layout(config.mode, config.mesh, field="config")
  place = Placement(layout)
  out = {"mode": config.mode, "layout": layout.describe(), "devices": place.devices,
         "settings": config.to_dict(), "models": {}}
  for name in config.models:
    mcfg = model_config(config_lib.model_preset(name) if name in _PRESETS
                        else config.shapes[name], config.dtype, config.param_dtype)
    mcfg = mcfg.replace(remat=config.remat, logits_chunk=config.logits_chunk,
                        scan_layers=config.get("scan_layers", False))
    entry = {"shape": {k: (str(v) if k in ("dtype", "param_dtype") else v)
                       for k, v in dataclasses.asdict(mcfg).items()}}
    if "sft" in config.stages:
      entry["sft"] = sft_step(mcfg, tx, config.batch, config.seq_len, place)
    if "rm" in config.stages:
      entry["rm"] = rm_step(mcfg, tx, config.rm_batch, config.rm_k, config.rm_seq_len, place)
    if "ppo_ptx" in config.stages:
      entry["ppo_ptx"] = ppo_iteration(
          mcfg, tx, batch=config.ppo_batch, minibatch=config.ppo_minibatch,
          prompt_len=config.prompt_len, new_tokens=config.new_tokens,
          ptx_batch=config.ptx_batch, ptx_seq_len=config.seq_len, place=place,
          frozen_dtype=(model_lib.dtype_from_name(config.frozen_dtype)
                        if config.get("frozen_dtype") else None))
    out["models"][name] = entry
    print(json.dumps({name: {s: entry[s]["peak_gib"] for s in config.stages if s in entry}}),
          flush=True)
  return out


_PRESETS = ("gpt2", "llama_small", "world", "test")


def table(result: dict) -> str:
  lines = [f"Per device, {result['layout']}.", "",
           "| model | parameters | stage | arguments | temporaries | peak (GiB) | compile |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for name, entry in result["models"].items():
    for stage in ("sft", "rm", "ppo_ptx"):
      if stage in entry:
        f = entry[stage]
        lines.append(f"| {name} | {f['parameters'] / 1e9:.3g}B | {stage} | "
                     f"{f['argument'] / GIB:.3g} GiB | {f['temp'] / GIB:.3g} GiB | "
                     f"{f['peak_estimate'] / GIB:.3g} | {f['compile_seconds']} s |")
  return "\n".join(lines)


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
  result = report(config)
  print(table(result), flush=True)
  if workdir:
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.json").write_text(json.dumps(result, indent=1))
  return result
