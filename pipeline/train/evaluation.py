"""Validation during training: what each evaluation measured, which step was best, and when
early stopping ends the run.

`EvalHistory` is plain Python (the decisions are unit-tested without torch) and goes into
checkpoints and the adapter's manifest as JSON. `evaluate` runs the model (torch imported inside).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.train.labels import Example, label_count


@dataclass(frozen=True)
class Evaluation:
    """One pass over the validation split."""

    step: int
    """The optimizer step it followed."""
    loss: float
    """Mean cross-entropy per assistant token."""
    accuracy: float
    """Share of assistant tokens the model predicts exactly (greedy, next token)."""


@dataclass
class EvalHistory:
    """Every evaluation of a run, the best one, and the early-stopping count.

    A loss counts as an improvement when it is below the best so far by more than `min_delta`;
    `patience` evaluations in a row without one stop the run. The best step is the lowest loss
    seen (ties: the earlier step), whether or not it beat the previous best by `min_delta`.
    """

    patience: int | None = None
    min_delta: float = 0.0
    evaluations: list[Evaluation] = field(default_factory=list)
    since_improvement: int = 0

    def add(self, evaluation: Evaluation) -> bool:
        """Record an evaluation; whether it is the new best."""
        best = self.best
        if best is None or evaluation.loss < best.loss - self.min_delta:
            self.since_improvement = 0
        else:
            self.since_improvement += 1
        self.evaluations.append(evaluation)
        return best is None or evaluation.loss < best.loss

    @property
    def best(self) -> Evaluation | None:
        return min(self.evaluations, key=lambda e: (e.loss, e.step), default=None)

    @property
    def last(self) -> Evaluation | None:
        return self.evaluations[-1] if self.evaluations else None

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since_improvement >= self.patience

    def to_json(self) -> dict:
        return {"evaluations": [asdict(e) for e in self.evaluations], "since_improvement": self.since_improvement}

    @classmethod
    def from_json(cls, data: dict, patience: int | None, min_delta: float) -> "EvalHistory":
        return cls(patience=patience, min_delta=min_delta,
                   evaluations=[Evaluation(**e) for e in data["evaluations"]],
                   since_improvement=int(data["since_improvement"]))


def evaluate(module, examples: list[Example], pad_id: int, batch_size: int, device,
             packing: bool = False) -> tuple[float, float] | None:
    """(loss per assistant token, token accuracy) over the examples, summed over every rank's
    share; None when no rank has a labelled token."""
    import torch

    from pipeline.train.loop import _all_reduce_sum, batch_tensors

    module.eval()
    loss_sum = correct = labels = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            loss, right = module(*batch_tensors(batch, pad_id, device, packing), count_correct=True)
            loss_sum += float(loss)
            correct += float(right)
            labels += sum(label_count(ex) for ex in batch)
    module.train()
    loss_sum, correct, labels = _all_reduce_sum([loss_sum, correct, labels], device)
    return (loss_sum / labels, correct / labels) if labels else None
