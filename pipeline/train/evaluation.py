"""Validation during training: what each evaluation measured, which step was best, and when
early stopping ends the run.

`EvalHistory` is plain Python (the decisions are unit-tested without torch) and goes into
checkpoints and the adapter's manifest as JSON. `evaluate` runs the model, and `greedy_answers`
shows a few validation conversations answered by the adapter (torch imported inside both).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.train.labels import IGNORE, Example, label_count

# Validation conversations the adapter answers (greedy) for its report, and their length cap.
VALIDATION_ANSWERS = 3
MAX_ANSWER_TOKENS = 128


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


def greedy_answers(peft_model, job, examples: list[Example], device) -> list[dict]:
    """The adapter's greedy answer to a few validation conversations, beside the reference: for
    each, its text up to the first assistant turn, that turn as the data has it, and what the
    adapter generates after the same prompt."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.model_path)
    model = peft_model.eval()
    answers = []
    with torch.no_grad():
        for ex in examples:
            start = next((i for i, label in enumerate(ex.labels) if label != IGNORE), None)
            if start is None:
                continue
            end = next((i for i in range(start, len(ex.labels)) if ex.labels[i] == IGNORE), len(ex.labels))
            prompt = torch.tensor([ex.input_ids[:start]], device=device)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=min(end - start + 16, MAX_ANSWER_TOKENS), use_cache=True,
                                 pad_token_id=job.pad_id)
            answers.append({
                "prompt": tokenizer.decode(ex.input_ids[:start]),
                "reference": tokenizer.decode(ex.input_ids[start:end]),
                "answer": tokenizer.decode(out[0, start:].tolist()),
            })
    model.train()
    return answers
