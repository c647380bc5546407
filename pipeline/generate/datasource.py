"""The job's read stage: a Ray Data datasource over the planned shards (`pipeline.generate.planning`).

Each read task reads one shard and yields its canonical rows (ids and request JSON,
`pipeline.generate.tasks.read_shard`), skipping the rows a resumed run has already committed.
"""

from __future__ import annotations

import functools

from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.generate.planning import Shard, ShardPlan
from pipeline.generate.sinks import Resume
from pipeline.generate.tasks import read_shard, rows_to_skip
from pipeline.row_templates import RowTemplate

# Read tasks' size hint for Ray Data's scheduling; the request JSON of a row is about this big.
ROW_BYTES_GUESS = 1024


class ShardDatasource(Datasource):
    """Reads the planned shards; each read task yields canonical rows (ids + request JSON)."""

    def __init__(self, plan: ShardPlan, shards: list[Shard], resume: Resume,
                 selected: dict[str, list[int]] | None = None, template: RowTemplate | None = None):
        super().__init__()
        self.plan = plan
        self.shards = shards
        self.resume = resume
        self.selected = selected
        self.template = template

    def estimate_inmemory_data_size(self):
        return sum(s.num_rows for s in self.shards) * ROW_BYTES_GUESS

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        # One task per shard whatever `parallelism` asks: a shard is what fixes row ids.
        return [
            ReadTask(
                functools.partial(
                    read_shard,
                    shard,
                    self.plan.id_column,
                    self.plan.passthrough,
                    self.plan.passthrough_types,
                    rows_to_skip(shard, self.resume, self.selected),
                    self.template,
                ),
                BlockMetadata(
                    num_rows=shard.num_rows,
                    size_bytes=shard.num_rows * ROW_BYTES_GUESS,
                    exec_stats=None,
                    input_files=(shard.path,),
                ),
            )
            for shard in self.shards
        ]
