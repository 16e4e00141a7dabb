"""How Ray Train hands the run's datasets to its workers.

Training splits are cut into equal shares (Ray's default, `equal=True`: DDP needs every worker to
take the same number of steps, so a few rows may be dropped). Eval and control splits are cut into
shares that together hold *every* row (`equal=False`), so each worker scores its own part (about
1/world of the rows) and the trainer adds the parts up: the accuracy matrix is that of the whole
eval set.
"""
from __future__ import annotations

import ray.train


class ShardedEvalDataConfig(ray.train.DataConfig):
    def __init__(self, train_names: list[str], eval_names: list[str]):
        # Both kinds are "split": Train V2 then builds each one's shards once, as a barrier all
        # workers reach together (they evaluate the same sets in the same order).
        super().__init__(datasets_to_split=[*train_names, *eval_names])
        self._eval_names = set(eval_names)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        train = {name: ds for name, ds in datasets.items() if name not in self._eval_names}
        output = super().configure(train, world_size, worker_handles, worker_node_ids, **kwargs)
        locality_hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if name not in self._eval_names:
                continue
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for rank, shard in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=locality_hints)):
                output[rank][name] = shard
        return output
