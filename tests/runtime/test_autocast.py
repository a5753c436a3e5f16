"""The forward's autocast settings, recorded and restored for a recomputation in the backward."""
import torch
from adapter_doctor.runtime.autocast import autocast_state, restored


def test_a_recorded_autocast_is_entered_again_and_left_as_the_caller_had_it():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = autocast_state("cpu")
    assert not torch.is_autocast_enabled("cpu")
    with restored(state):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_a_forward_without_autocast_recomputes_without_it_even_inside_an_autocast_block():
    state = autocast_state("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), restored(state):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu") is False


def test_the_device_and_the_cpu_are_both_recorded_and_types_without_autocast_are_left_out():
    assert [t for t, _, _ in autocast_state("cuda").settings] == ["cuda", "cpu"]
    assert [t for t, _, _ in autocast_state("meta").settings] == ["cpu"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_state("cpu").on_device
        assert not autocast_state("cuda").on_device  # CPU autocast leaves a GPU's operations alone
