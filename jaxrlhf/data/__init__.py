"""The data layer: JSONL formats, tokenisation to fixed shapes, TFDS preparation, grain loaders.

Read with `read_examples` (or prepare once with `tfds_builders.prepare` and open
with `load_prepared`), then `make_loader` gives checkpointable device batches.
`jaxrlhf.data.world` generates the embedded instruction world.
"""

from jaxrlhf.data.formats import (
    DataError, Demonstration, Example, KINDS, Prompt, Ranking, Source, Text, iter_file,
    parse_demonstration, parse_prompt, parse_ranking, parse_text, read_examples,
    split_hh_transcripts, write_jsonl)
from jaxrlhf.data.pipeline import (
    HOST_FIELDS, Loader, ShardedDataset, batch_cutter, cut_together, make_loader, split_host_fields,
    steps_per_epoch)
from jaxrlhf.data.stats import DataStats
from jaxrlhf.data.tokenize import (
    Encoder, Lengths, empty_example, pair_mask_from_ranks, tokenize_demonstration,
    tokenize_prompt, tokenize_ranking, tokenize_text)
