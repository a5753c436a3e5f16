"""The runtime under DDP and FSDP2: two CPU processes on gloo, launched once by torchrun, many scenarios.

Every scenario starts from the same tiny llama and LoRA as the single-process reference built here. Each rank
trains on its own rows; DDP and FSDP2 average the gradients, so with equal token counts per rank the result is
the reference's gradient on all rows. The ranks write what they saw to files; the tests below compare.
FSDP2 (`fully_shard`) runs on CPU with gloo in torch 2.13, so it is tested here, not skipped. accelerate picks
FSDP only on an accelerator (on the CPU its Accelerator falls back to DDP), so its FSDP2 layout and its
`get_state_dict` call are built here by hand, as accelerate 1.15's `fsdp2_prepare_model` and `get_state_dict` do.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORLD = 2
ROWS_PER_RANK = 2
LR = 0.5  # one SGD step moves the adapter far enough that a save of the untrained one would not match


def _tiny():
    """The tiny-model helpers of tests/runtime/conftest.py, by path: under torchrun there is no pytest."""
    spec = importlib.util.spec_from_file_location("_tiny_models", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Tiny


def fresh_model(base_dir: Path):
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32,
                                                             attn_implementation="eager")
    torch.manual_seed(1)  # LoRA A's initialisation
    return _tiny().lora(base).train()  # from_pretrained leaves eval mode: no checkpointing, no fused loss


def rows(micro: int, rank: int):
    """Rank `rank`'s rows of micro-batch `micro`: all ranks' rows of micro-batch 0 are rows 0-3, and so on."""
    start = (micro * WORLD + rank) * ROWS_PER_RANK
    return _tiny().batch(seed=2, rows=2 * WORLD * ROWS_PER_RANK)[start:start + ROWS_PER_RANK]


def eval_ids():
    return _tiny().batch(seed=5, rows=2, length=9)


def lora_grads(model) -> dict:
    """{name: full gradient} of the LoRA parameters; a DTensor shard is gathered (a collective)."""
    out = {}
    for name, param in model.named_parameters():
        if "lora_" in name and param.grad is not None:
            grad = param.grad
            full = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            out[name.removeprefix("module.")] = full.detach().clone()  # later steps accumulate into .grad
    return out


# --- what each rank runs (under torchrun) -------------------------------------------------------------------


class Counted:
    """The torch kernel set, counting fused calls and any DTensor that reaches one."""

    def __init__(self):
        import dataclasses

        from adapter_doctor.kernels import TORCH

        self.calls = {"lora": 0, "head": 0, "dtensor": 0}
        self.set = dataclasses.replace(TORCH, lora_linear=self._lora(TORCH.lora_linear),
                                       lora_multi_linear=self._multi(TORCH.lora_multi_linear),
                                       linear_cross_entropy=self._head(TORCH.linear_cross_entropy))

    def _seen(self, *tensors) -> None:
        from torch.distributed.tensor import DTensor

        self.calls["dtensor"] += sum(isinstance(t, DTensor) for t in tensors)

    def _lora(self, inner):
        def lora_linear(x, weight, bias, a, b, scaling):
            self.calls["lora"] += 1
            self._seen(x, weight, a, b)
            return inner(x, weight, bias, a, b, scaling)
        return lora_linear

    def _multi(self, inner):
        def lora_multi_linear(x, parts):
            self.calls["lora"] += len(parts)
            for p in parts:
                self._seen(x, p.weight, p.lora_a, p.lora_b)
            return inner(x, parts)
        return lora_multi_linear

    def _head(self, inner):
        def linear_cross_entropy(hidden, weight, labels, **kwargs):
            self.calls["head"] += 1
            self._seen(hidden, weight)
            return inner(hidden, weight, labels, **kwargs)
        return linear_cross_entropy


def _mean(value):
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def _step(model, rank: int, micro: int = 0):
    ids = rows(micro, rank)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def _ddp(base_dir: Path, rank: int, *, patch: str, offload: str = "", find_unused: bool = False):
    from adapter_doctor.runtime import enable_offloaded_checkpointing, ensure_patched
    from torch.nn.parallel import DistributedDataParallel

    model, counted, patched = fresh_model(base_dir), Counted(), 0
    if patch == "before":
        patched = len(ensure_patched(model, kernels=counted.set).patched)
    if offload == "before":
        enable_offloaded_checkpointing(model)
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
    if patch == "after":
        patched = len(ensure_patched(ddp, kernels=counted.set).patched)
    if offload == "after":
        enable_offloaded_checkpointing(ddp)
    loss = _step(ddp, rank)
    result = {"loss": _mean(loss), "grads": lora_grads(ddp), "calls": dict(counted.calls), "patched": patched}
    # DDP reports a parameter that got no gradient, or one marked ready twice, in the next step's forward
    saved = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    _, result["second_step"] = _try(_step, ddp, rank)
    for name, param in model.named_parameters():
        param.grad = saved.get(name)
    return result, model, ddp


def _no_sync(base_dir: Path, rank: int) -> dict:
    import torch.distributed as dist
    from adapter_doctor.runtime import ensure_patched
    from torch.nn.parallel import DistributedDataParallel

    model = fresh_model(base_dir)
    ensure_patched(model)
    ddp = DistributedDataParallel(model)
    with ddp.no_sync():
        _step(ddp, rank, micro=0)
    local = lora_grads(ddp)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    _step(ddp, rank, micro=1)
    return {"grads": lora_grads(ddp), "local_after_no_sync": gathered}


def _shard(model, style: str) -> None:
    """fully_shard per decoder layer then the root (TRL's and torchtitan's way), or as accelerate's FSDP2
    plugin does it: layers, the embedding, [final norm, lm_head] as one unit kept unsharded, then the root."""
    from torch.distributed.fsdp import fully_shard

    inner = model.get_base_model()
    for layer in inner.model.layers:
        fully_shard(layer)
    if style == "accelerate":
        fully_shard(inner.get_input_embeddings())
        fully_shard([inner.model.norm, inner.lm_head], reshard_after_forward=False)
    fully_shard(model)


def _fsdp(base_dir: Path, rank: int, *, patch: str, style: str = "layers", offload: bool = False):
    from adapter_doctor.runtime import enable_offloaded_checkpointing, ensure_patched
    from torch.distributed.tensor import DTensor

    model, counted, patched = fresh_model(base_dir), Counted(), 0
    if patch in ("before", "before-then-unpatched"):
        patched = len(ensure_patched(model, kernels=counted.set).patched)
    if offload:
        enable_offloaded_checkpointing(model)
    _shard(model, style)
    if patch == "after":
        patched = len(ensure_patched(model, kernels=counted.set).patched)
    if patch == "before-then-unpatched":  # sharded while patched, then unpatched: FSDP's classes must stay
        from adapter_doctor.runtime import unpatch
        from torch.distributed.fsdp import FSDPModule

        patched -= unpatch(model)
        layers = model.get_base_model().model.layers
        patched += sum(not isinstance(layer, FSDPModule) for layer in layers)  # a layer lost FSDP's class
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    sharded = all(isinstance(p, DTensor) for p in lora + frozen)
    loss = _step(model, rank)
    result = {"loss": _mean(loss), "grads": lora_grads(model), "calls": dict(counted.calls), "patched": patched,
              "sharded": sharded, "frozen_grads": sum(p.grad is not None for p in frozen)}
    return result, model


def _try(function, *args, **kwargs):
    """(result, None) or (None, 'ExceptionType: message'): a refusal is an outcome to compare."""
    try:
        return function(*args, **kwargs), None
    except Exception as error:  # noqa: BLE001 - recorded and asserted on by the tests
        return None, f"{type(error).__name__}: {error}"


def _sgd_step_and_logits(model, forward=None):
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and param.grad is not None:
                param.add_(param.grad, alpha=-LR)
    model.eval()
    with torch.no_grad():
        logits = (forward or model)(input_ids=eval_ids()).logits
    return (logits.full_tensor() if hasattr(logits, "full_tensor") else logits).detach()


def _save_ddp(model, ddp, out: Path, rank: int) -> dict:
    import torch.distributed as dist
    from adapter_doctor.runtime import save_adapter

    logits = _sgd_step_and_logits(model, ddp)
    if rank == 0:
        save_adapter(ddp, out / "ddp-ours", max_seq_length=64)  # the DDP wrapper itself: unwrapped by the saver
        model.save_pretrained(str(out / "ddp-peft"))
    dist.barrier()
    return {"logits": logits}


def _save_fsdp(model, out: Path, rank: int) -> dict:
    import torch.distributed as dist
    from adapter_doctor.runtime import save_adapter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    logits = _sgd_step_and_logits(model)
    # accelerate's get_state_dict for FSDP2, with its options: every rank takes part, rank 0 gets the tensors
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                cpu_offload=True))
    result = {"logits": logits}
    if rank == 0:
        _, result["refused"] = _try(save_adapter, model, out / "fsdp-refused")
        save_adapter(model, out / "fsdp-ours", state_dict=full, max_seq_length=64)
        model.save_pretrained(str(out / "fsdp-peft"), state_dict=full)
        result["refused_wrote"] = (out / "fsdp-refused" / "adapter_model.safetensors").exists()
    dist.barrier()
    return result


def _dtensor_guard() -> dict:
    """A LoRA layer whose base weight is a DTensor shard outside any FSDP unshard (tensor parallelism, or a
    module called outside its unit) must not take the fused path."""
    import torch
    import torch.distributed as dist
    from adapter_doctor.runtime.eligibility import head_parts, lora_parts, why_not_fused
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _tiny().lora(_tiny().base())
    proj = model.get_base_model().model.layers[0].mlp.gate_proj
    before = lora_parts(proj) is not None
    weight = proj.base_layer.weight
    proj.base_layer.weight = torch.nn.Parameter(distribute_tensor(weight.detach(), mesh, [Shard(0)]),
                                                requires_grad=False)
    head = model.get_base_model().lm_head
    head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]), requires_grad=False)
    _, head_refused = _try(head_parts, head)
    return {"fused_before": before, "reason": why_not_fused(proj), "parts": lora_parts(proj),
            "head_refused": head_refused}


def _offload_fsdp(base_dir: Path, rank: int) -> dict:
    result, error = _try(_fsdp, base_dir, rank, patch="before", offload=True)
    return {"error": error, **({} if result is None else result[0])}


def run_scenarios(out: Path, base_dir: Path) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results: dict = {}
    results["ddp-unpatched"], _, _ = _ddp(base_dir, rank, patch="none")
    results["ddp-after"], _, _ = _ddp(base_dir, rank, patch="after")
    results["ddp-before"], model, ddp = _ddp(base_dir, rank, patch="before")
    results["ddp-save"] = _save_ddp(model, ddp, out, rank)
    results["ddp-offload"], _, _ = _ddp(base_dir, rank, patch="before", offload="before")
    results["ddp-after-offload"], _, _ = _ddp(base_dir, rank, patch="after", offload="after")
    # the Trainer's default for a PeftModel
    results["ddp-offload-find-unused"], _, _ = _ddp(base_dir, rank, patch="before", offload="before",
                                                    find_unused=True)
    results["ddp-find-unused"], _, _ = _ddp(base_dir, rank, patch="before", find_unused=True)
    results["ddp-no-sync"] = _no_sync(base_dir, rank)
    results["fsdp-unpatched"], _ = _fsdp(base_dir, rank, patch="none")
    results["fsdp-after"], _ = _fsdp(base_dir, rank, patch="after")
    results["fsdp-unpatched-after-sharding"], _ = _fsdp(base_dir, rank, patch="before-then-unpatched")
    results["fsdp-accelerate"], _ = _fsdp(base_dir, rank, patch="before", style="accelerate")
    results["fsdp-before"], model = _fsdp(base_dir, rank, patch="before")
    results["fsdp-save"] = _save_fsdp(model, out, rank)
    results["fsdp-offload"] = _offload_fsdp(base_dir, rank)
    results["dtensor"] = _dtensor_guard()
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_scenarios(Path(sys.argv[1]), Path(sys.argv[2]))


# --- the tests (in the pytest process) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Both ranks' results, the tiny base's folder and where the ranks saved, from one torchrun launch."""
    import torch

    root = tmp_path_factory.mktemp("distributed")
    base_dir, out = root / "base", root / "out"
    out.mkdir()
    _tiny().base(attn="eager").save_pretrained(str(base_dir))
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ,  # gloo over loopback, whatever the host name resolves to
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               __file__, str(out), str(base_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "base": base_dir, "out": out}


@pytest.fixture(scope="module")
def reference(world):
    """Single process: loss and LoRA gradients on all ranks' rows of micro-batch 0, the gradients of the two
    accumulated micro-batches, and the model after the same SGD step."""
    import torch

    ids = torch.cat([rows(0, r) for r in range(WORLD)])
    model = fresh_model(world["base"])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = lora_grads(model)
    logits = _sgd_step_and_logits(model)
    accumulated = fresh_model(world["base"])
    everything = torch.cat([rows(m, r) for m in range(2) for r in range(WORLD)])
    (2 * accumulated(input_ids=everything, labels=everything).loss).backward()
    return {"loss": loss.detach(), "grads": grads, "accumulated": lora_grads(accumulated), "logits": logits,
            "model": model}


def _same_grads(got: dict, expected: dict) -> None:
    import torch

    assert got.keys() == expected.keys() and len(expected) == 2 * 7 * 2  # A and B of 7 targets in 2 layers
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), (name, (got[name] - grad).abs().max())


SCENARIOS = ["ddp-unpatched", "ddp-before", "ddp-after", "ddp-offload", "ddp-after-offload", "ddp-find-unused",
             "ddp-offload-find-unused",
             "fsdp-unpatched", "fsdp-unpatched-after-sharding", "fsdp-before", "fsdp-after", "fsdp-accelerate",
             "fsdp-offload"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_loss_and_lora_gradients_match_the_single_process_reference(world, reference, scenario):
    import torch

    for rank in world["ranks"]:
        result = rank[scenario]
        assert result.get("error") is None and result.get("second_step") is None
        assert torch.allclose(result["loss"], reference["loss"], rtol=1e-5, atol=1e-6)
        _same_grads(result["grads"], reference["grads"])
        if "unpatched" in scenario:
            assert result["calls"]["lora"] == 0 and result["patched"] == 0
        else:  # the patched forwards ran, every projection fused, and never on a DTensor shard
            # 7 fused projections a layer; with checkpointing the replay runs 5 again (o and down skip theirs)
            assert result["patched"] >= 10 and result["calls"]["lora"] == (2 * 12 if "offload" in scenario else 2 * 7)
            assert result["calls"]["dtensor"] == 0


@pytest.mark.slow
def test_fsdp2_shards_frozen_and_trainable_weights_in_the_same_units(world):
    for rank in world["ranks"]:
        for scenario in ("fsdp-unpatched", "fsdp-before", "fsdp-after", "fsdp-accelerate"):
            result = rank[scenario]
            assert result["sharded"] and result["frozen_grads"] == 0
        # per-layer sharding leaves lm_head in the root unit, unsharded inside the root's forward: fused loss
        assert rank["fsdp-before"]["calls"]["head"] == 1 and rank["fsdp-after"]["calls"]["head"] == 1
        # accelerate's own unit for lm_head hooks it, and the fused loss never runs the module: library loss
        assert rank["fsdp-accelerate"]["calls"]["head"] == 0


@pytest.mark.slow
def test_no_sync_accumulates_locally_then_all_reduces(world, reference):
    import torch

    first = world["ranks"][0]["ddp-no-sync"]["local_after_no_sync"]
    name = next(iter(reference["grads"]))
    assert not torch.allclose(first[0][name], first[1][name])  # not yet reduced: each rank's own rows
    for rank in world["ranks"]:
        _same_grads(rank["ddp-no-sync"]["grads"], reference["accumulated"])


@pytest.mark.slow
def test_a_dtensor_shard_never_takes_the_fused_path(world):
    for rank in world["ranks"]:
        result = rank["dtensor"]
        assert result["fused_before"] and result["parts"] is None
        assert "DTensor" in result["reason"]
        assert result["head_refused"] is not None and "DTensor" in result["head_refused"]


SAVES = ["ddp-ours", "ddp-peft", "fsdp-ours", "fsdp-peft"]


@pytest.mark.slow
@pytest.mark.parametrize("saved", SAVES)
def test_rank0_saves_whole_adapters_that_vanilla_peft_reloads(world, reference, saved, tmp_path):
    import torch
    import transformers
    from adapter_doctor import Options, diagnose
    from adapter_doctor.runtime import save_adapter
    from adapter_doctor.safetensors_header import read_header
    from peft import PeftModel

    folder = world["out"] / saved
    single = save_adapter(reference["model"], tmp_path / "single")
    shapes = {n: t.shape for n, t in read_header(folder / "adapter_model.safetensors").tensors.items()}
    expected = {n: t.shape for n, t in read_header(single / "adapter_model.safetensors").tensors.items()}
    assert shapes == expected and all(0 not in s for s in shapes.values())
    meta = read_header(folder / "adapter_model.safetensors").metadata or {}
    assert ("adapter_doctor.runtime" in meta) == saved.endswith("-ours")
    if saved.endswith("-ours"):
        assert json.loads(meta["adapter_doctor.patch_set"])["modules"] and meta["adapter_doctor.max_seq_length"] == "64"
    report = diagnose([folder], Options(base=world["base"]))
    assert [(f.id, f.message) for f in report.findings if f.severity == "error"] == []
    base = transformers.AutoModelForCausalLM.from_pretrained(str(world["base"]), attn_implementation="eager")
    vanilla = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        logits = vanilla(input_ids=eval_ids()).logits
    rank0 = world["ranks"][0][f"{saved.split('-')[0]}-save"]["logits"]
    assert torch.allclose(logits, rank0, rtol=1e-5, atol=1e-5)
    assert torch.allclose(logits, reference["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_save_adapter_refuses_sharded_tensors_without_a_full_state_dict(world):
    result = world["ranks"][0]["fsdp-save"]
    assert result["refused"] is not None and "state_dict" in result["refused"]
    assert not result["refused_wrote"]


def test_one_rule_says_what_is_a_shard():
    import torch
    from adapter_doctor.runtime.sharding import is_partial

    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_numel = 12  # ZeRO-3's partitioned parameter
    partitioned = torch.ones(3)
    partitioned.ds_numel = 12  # a rank's slice of a ZeRO-3 parameter
    gathered = torch.ones(12)
    gathered.ds_numel = 12
    assert is_partial(placeholder) and is_partial(placeholder.detach())  # detached, as state_dict() returns it
    assert is_partial(partitioned) and is_partial(torch.empty(0, 4))
    assert not is_partial(gathered) and not is_partial(torch.ones(2, 2))


def test_a_zero3_placeholder_never_takes_the_fused_path(tiny):
    import torch
    from adapter_doctor.runtime.eligibility import head_parts, lora_parts, why_not_fused

    model = tiny.lora(tiny.base())
    proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert lora_parts(proj) is not None
    for module in (proj.base_layer, model.get_base_model().lm_head):  # as ZeRO-3 leaves a partitioned weight
        numel = module.weight.numel()
        module.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        module.weight.ds_numel = numel
    assert lora_parts(proj) is None and "ZeRO-3" in why_not_fused(proj)
    with pytest.raises(ValueError, match="ZeRO-3"):
        head_parts(model.get_base_model().lm_head)


def test_save_adapter_refuses_empty_tensors_and_writes_nothing(tiny, tmp_path):
    import torch
    from adapter_doctor.runtime import save_adapter

    model = tiny.lora(tiny.base())
    full = {n: t.clone() for n, t in model.state_dict().items()}
    name = next(n for n in full if "lora_A" in n)
    with pytest.raises(ValueError, match="state_dict"):
        save_adapter(model, tmp_path / "given", state_dict={**full, name: torch.empty(0)})
    proj = model.get_base_model().model.layers[1].mlp.down_proj
    proj.lora_A["default"].weight = torch.nn.Parameter(torch.empty(0))  # ZeRO-3's placeholder, ungathered
    with pytest.raises(ValueError, match="shards or empty"):
        save_adapter(model, tmp_path / "own")
    assert not (tmp_path / "given").exists() and not (tmp_path / "own").exists()
    save_adapter(model, tmp_path / "whole", state_dict=full)  # the gathered copy saves, whole
    assert (tmp_path / "whole" / "adapter_model.safetensors").is_file()
