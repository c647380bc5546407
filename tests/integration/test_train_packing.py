"""Packing (`train.packing`): the same conversations end to end in one row give the padded batch's
loss, because attention and loss stay within each conversation."""

from __future__ import annotations

import time

import pytest

from data.build_train_sample import write_sample_dataset
from pipeline.train.labels import prepare_examples
from pipeline.train.loop import _loss_module, collate, collate_packed
from tests.integration.test_train_lora import train

pytestmark = pytest.mark.integration

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris, the largest city of France and its capital since the tenth century."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green."}],
]


@pytest.fixture(scope="module")
def loss_module(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))  # nonzero B: the adapter counts
    return _loss_module(peft_model).eval()


def test_packed_loss_equals_padded_loss_on_the_same_batch(loss_module, tiny_model_dir):
    import torch

    examples, _, pad_id = prepare_examples(CONVERSATIONS, str(tiny_model_dir), "26 Jul 2024", 1024)
    assert len({len(ex.input_ids) for ex in examples}) == 3  # uneven: padding would matter
    with torch.no_grad():
        padded, padded_right = loss_module(*collate(examples, pad_id, "cpu"), count_correct=True)
        packed, packed_right = loss_module(*collate_packed(examples, "cpu"), count_correct=True)
        ids, _, labels, _ = collate_packed(examples, "cpu")
        leaking = loss_module(ids, None, labels)  # one sequence: attention across conversations
    assert float(packed) == pytest.approx(float(padded), rel=1e-5)
    assert int(packed_right) == int(padded_right)
    assert abs(float(leaking) - float(padded)) > 1e-3  # the test can tell attention that crosses


def test_packed_training_matches_padded_and_is_faster_on_short_rows(tiny_model_dir, tmp_path):
    """The same run packed and padded: the same losses up to summation order; tokens/s printed."""
    data = write_sample_dataset(tmp_path / "sample.parquet")
    common = ["train.max_steps=12", "train.report_to=none", f"data.path={data}"]
    runs = {}
    for packing in (False, True):
        started = time.time()
        runs[packing] = train(tiny_model_dir, tmp_path / "lora", f"packing-{packing}", *common,
                              f"train.packing={packing}")
        runs[packing]["wall"] = time.time() - started
    padded, packed = runs[False], runs[True]
    assert packed["train_loss"] == pytest.approx(padded["train_loss"], rel=1e-4)
    assert packed["validation_loss"] == pytest.approx(padded["validation_loss"], rel=1e-4)
    print(f"\ntokens/s on the demo data: padded {padded['tokens_per_second']:.0f}, "
          f"packed {packed['tokens_per_second']:.0f}")
