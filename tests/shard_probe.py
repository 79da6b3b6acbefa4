"""Run by tests/test_multihost.py as each process of a multi-process SFT job: writes to
`--probe_dir` the source indices of the first SFT and PPO-prompt batches this process
reads, and the psum of fixed values over all devices in the collectives' own order and in
device order; then runs SFT itself, as experiments/sft.py does (one job, not two: a child
process's start-up is most of its cost)."""

import json

import numpy as np

from absl import flags
from etils import epath
import jax

from configs import ppo as ppo_config
from jaxrlhf import data_lib
from jaxrlhf import launch
from jaxrlhf import models
from jaxrlhf import parallel
from jaxrlhf import sft

_BATCHES = flags.DEFINE_integer("probe_batches", 2, "Batches to record per loader.")
_PROBE_DIR = flags.DEFINE_string("probe_dir", None, "Where the probe writes.", required=True)


def probe(config, workdir):
  tokenizer = models.load_tokenizer(config.tokenizer)
  sft_loader = sft.stage_data(config, tokenizer, workdir).train_iter.loader
  prompts = ppo_config.get_config("test")
  prompts.data.world_dir = config.data.world_dir
  prompt_loader = data_lib.prompt_data(prompts, tokenizer, workdir).train_iter
  seen = {name: [next(loader)["index"].tolist() for _ in range(_BATCHES.value)]
          for name, loader in (("sft", sft_loader), ("prompts", prompt_loader))}
  seen["local_devices"] = jax.local_device_count()
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  out = epath.Path(workdir) / f"shard_{jax.process_index()}_of_{jax.process_count()}.json"
  out.write_text(json.dumps(seen))

  # The same values on every process, each device holding one row: [devices, n].
  rng = np.random.default_rng(0)
  n = 4096
  values = (rng.normal(size=(jax.device_count(), n))
            * 10.0 ** rng.integers(-3, 4, size=(jax.device_count(), n))).astype(np.float32)
  first = jax.process_index() * jax.local_device_count()
  local = parallel.device_put_sharded(values[first:first + jax.local_device_count()])
  with parallel.fixed_reduction_order(False):  # whatever --fixed_reduction_order says
    collective = parallel.pmap_fn(parallel.psum)(local)
  with parallel.fixed_reduction_order():
    fixed = parallel.pmap_fn(parallel.psum)(local)  # a trace of its own, in device order
  np.savez(epath.Path(workdir) / f"sums_{jax.process_index()}_of_{jax.process_count()}.npz",
           values=values, collective=parallel.fetch(collective), fixed=parallel.fetch(fixed))


def probe_then_sft(config, workdir):
  probe(config, _PROBE_DIR.value)
  sft.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  launch.main(probe_then_sft)
