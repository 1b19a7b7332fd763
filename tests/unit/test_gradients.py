"""milora_megatron/train/gradients.py: fp16's loss scale (the norm and clipping are checked
against gathered references in distributed/test_precision.py)."""


def test_fp16_loss_scale():
    from milora_megatron.train.gradients import LossScale

    scale = LossScale(dynamic=True, initial=1024.0, growth_interval=2)
    assert scale.update(True) and scale.scale == 1024.0
    assert scale.update(True) and scale.scale == 2048.0  # two clean steps: doubled
    assert not scale.update(False) and scale.scale == 1024.0  # overflow: step skipped, halved
    restored = LossScale(dynamic=True)
    restored.load_state_dict(scale.state_dict())
    assert (restored.scale, restored.clean_steps) == (1024.0, 0)
    constant = LossScale(dynamic=False)
    assert constant.scale == 1.0 and constant.update(True) and not constant.update(False)
