"""The shared fixtures load back: the tiny checkpoint is a real, loadable VLM."""
import torch

from minivlm.load import load_vlm


def test_tiny_checkpoint_loads_with_identical_weights(tiny_checkpoint):
    model, tokenizer, run_config = load_vlm(tiny_checkpoint)
    again, _, _ = load_vlm(tiny_checkpoint)
    assert run_config["stage"] == "test" and model.seg_head is not None
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert model.lm.config.vocab_size == tokenizer.vocab_size
