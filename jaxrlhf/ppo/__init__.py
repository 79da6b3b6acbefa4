"""PPO and PPO-ptx against a frozen reward model (InstructGPT step 3).

One iteration is one pmapped call: a rollout (sample, cut at the stop token, score,
per-token KL rewards, GAE, whitened advantages), then epochs of clipped-surrogate and
clipped-value updates over shuffled minibatches (plus gamma * pretraining NLL for
PPO-ptx), then the KL controller. The host fetches that iteration's metrics once.
docs/design.md, section 3, is the maths. By job:

  state.py    what an iteration carries (`PPOState`) and is told (`PPOSettings`)
  rollout.py  sampling and scoring on the device, for training and evaluation
  update.py   the clipped losses, minibatch updates and the whole iteration
  loop.py     its side of the one host loop (train_lib.run_loop): batches, resuming
  stage.py    config to models, data and settings; `train_and_evaluate`
"""

# The submodules keep their names here (`ppo.rollout` is the module, not its function).
from jaxrlhf.ppo.loop import device_prompts
from jaxrlhf.ppo.loop import restore_or_keep
from jaxrlhf.ppo.loop import iteration_batches
from jaxrlhf.ppo.loop import loop_settings
from jaxrlhf.ppo.loop import stack_ptx_batches
from jaxrlhf.ppo.rollout import evaluate_step
from jaxrlhf.ppo.rollout import score_responses
from jaxrlhf.ppo.stage import settings_from_config
from jaxrlhf.ppo.stage import train_and_evaluate
from jaxrlhf.ppo.state import create_ppo_state
from jaxrlhf.ppo.state import PPOSettings
from jaxrlhf.ppo.state import PPOState
from jaxrlhf.ppo.state import Rollout
from jaxrlhf.ppo.update import policy_loss_and_grads
from jaxrlhf.ppo.update import train_iteration
from jaxrlhf.ppo.update import update_step
from jaxrlhf.ppo.update import value_loss_and_grads
