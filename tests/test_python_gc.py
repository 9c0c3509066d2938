"""The trainer keeps Python's collector off the objects built before training (rlhf.python_gc)."""

import gc
import weakref

import pytest

from rlhf.python_gc import long_lived_objects_frozen


def _trainer(model_dir, output_dir):
    from conftest import FIXTURES
    from rlhf.cli import ALGORITHM_DEFAULTS
    from rlhf.config import RLConfig
    from rlhf.trainer import RLTrainer

    return RLTrainer(RLConfig(**{
        **ALGORITHM_DEFAULTS["grpo"], "model_name_or_path": str(model_dir), "output_dir": str(output_dir),
        "max_steps": 1, "rollout_batch_size": 2, "num_generations": 2, "mini_batch_size": 4, "max_new_tokens": 4,
        "max_prompt_length": 64, "lora_r": 4, "lora_alpha": 8, "save_steps": 0, "num_samples_to_log": 0,
        "reward_funcs": [f"{FIXTURES / 'rewards.py'}:char_diversity"]}))


class _Cycle:
    def __init__(self):
        self.me = self


def test_steps_run_with_the_built_objects_frozen_and_teardown_collects_them(tiny_model_dir, tmp_path, monkeypatch):
    trainer = _trainer(tiny_model_dir, tmp_path / "run")
    made_before = [_Cycle()]  # garbage once the step drops it: only a collection frees a cycle
    gone_with_training = weakref.ref(made_before[0])
    frozen_during_step = []
    real_step = trainer.train_step

    def step():
        frozen_during_step.append(gc.get_freeze_count())
        made_before.clear()
        return real_step()

    monkeypatch.setattr(trainer, "train_step", step)
    trainer.train()
    assert frozen_during_step[0] > 10_000  # the model's modules and tensors, among others
    assert gc.get_freeze_count() == 0
    assert gone_with_training() is None  # the teardown's collection reached it: thawed before


def test_a_failing_step_leaves_nothing_frozen(tiny_model_dir, tmp_path, monkeypatch):
    trainer = _trainer(tiny_model_dir, tmp_path / "run")

    def step():
        assert gc.get_freeze_count() > 0
        raise RuntimeError("a user's reward function broke")

    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(RuntimeError, match="broke"):
        trainer.train()
    assert gc.get_freeze_count() == 0


def _frozen(obj) -> bool:
    """Whether ``obj`` (a tracked object) sits in the frozen generation: ``gc.get_objects`` lists
    the other generations only. (The freeze count itself drops as frozen objects die.)"""
    assert gc.is_tracked(obj)
    return not any(other is obj for other in gc.get_objects())


def test_an_earlier_freeze_and_a_disabled_collector_are_left_alone():
    gc.freeze()
    try:
        made_after = []  # tracked, made after the user's freeze: ours would freeze it too
        with long_lived_objects_frozen():
            assert not _frozen(made_after)
        assert gc.get_freeze_count() > 0  # the user's freeze was not undone
    finally:
        gc.unfreeze()
    made_before = []
    gc.disable()
    try:
        with long_lived_objects_frozen():
            assert not _frozen(made_before) and gc.get_freeze_count() == 0
    finally:
        gc.enable()
    with long_lived_objects_frozen():
        assert _frozen(made_before)
    assert not _frozen(made_before) and gc.get_freeze_count() == 0
