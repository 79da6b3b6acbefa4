"""Evaluation: labeler- and reward-model-judged comparisons of policies (the stage in
`preference`; its parts in `policy_inputs`, `generation`, `policy_runs`, `judging`; the
report in `report`) and the paper's public-benchmark measurements (one module per
benchmark).

Submodules are imported by name (`from jaxrlhf.eval import preference`); this package
imports nothing itself, so loading one evaluation never pulls in another's dependencies.
"""
