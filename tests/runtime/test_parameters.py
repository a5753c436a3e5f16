"""The trainable parameters a recomputing Function takes as inputs."""
import torch
from adapter_doctor.runtime.parameters import fsdp_unit, trainable_parameters


def test_each_trainable_parameter_once_in_module_order_and_no_frozen_one():
    shared = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(shared, torch.nn.Linear(3, 2), shared)  # the same module twice
    model[1].weight.requires_grad_(False)
    assert [id(p) for p in trainable_parameters(model)] == \
        [id(p) for p in (shared.weight, shared.bias, model[1].bias)]
    assert trainable_parameters(None) == []


def test_the_order_is_that_of_module_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 3), None),
                                torch.nn.Linear(3, 4))
    assert [id(p) for p in trainable_parameters(model)] == [id(p) for p in model.parameters()]


def test_an_fsdp2_unit_gives_none_its_hooks_expect_them_accumulated_in_place():
    class FSDPModule:  # the name FSDP2's fully_shard mixes into a unit's class
        pass

    class Unit(torch.nn.Linear, FSDPModule):
        pass

    unit = Unit(2, 2)
    assert fsdp_unit(unit) and not fsdp_unit(torch.nn.Linear(2, 2))
    assert trainable_parameters(unit) == []
