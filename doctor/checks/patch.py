"""patch: what a live model will run (registered here so `doctor list-checks` and `explain` know them;
`adapter_doctor.live.inspect_model` produces the findings)."""
from __future__ import annotations

from ..finding import Severity
from . import Check, register

CAT = "patch"
BROKEN = Check(
    "ADC901", CAT, Severity.ERROR, "A patched forward needs attributes these modules lack",
    "A fast runtime replaced this class's forward for every instance in the process, but gave only the instances "
    "it loaded itself the attributes that forward reads (Unsloth's `apply_qkv`, `apply_o`). Any other instance of "
    "the class, e.g. one loaded with AutoModelForCausalLM + PeftModel.from_pretrained, raises AttributeError on its "
    "first forward. Reported only for reads on every path through the forward, outside any guard.", manual="Call adapter_doctor.ensure_patched(model), or load with adapter_doctor.runtime.load().")
FALLBACK = Check(
    "ADC902", CAT, Severity.WARNING, "A foreign patched forward will fall back",
    "Another runtime's forward is active on these modules and looks for attributes they lack, but only behind a "
    "guard (getattr with a default, hasattr, try/except AttributeError), on a branch, or in one of several "
    "functions a gate chooses between: it may run on a fallback path.",
    manual="Call adapter_doctor.ensure_patched(model) for the patched path, or load the model in a fresh process.")
FOREIGN = Check(
    "ADC903", CAT, Severity.INFO, "Forward replaced by another runtime",
    "The forward that runs is not the one the class's own library defines, or a wrapper runs around it, or the "
    "module is an instance of a class swapped in at module level. It has everything it needs; this says who.")
MIXED = Check(
    "ADC904", CAT, Severity.WARNING, "Patched and unpatched layers of the same type",
    "Some instances of a module type run a patched forward and others their library's own: usually a model half "
    "patched by a loader that stopped early, or patched before extra layers were added.",
    manual="Call adapter_doctor.ensure_patched(model) to patch all of them.")
OURS = Check(
    "ADC905", CAT, Severity.INFO, "Patched by adapter-doctor",
    "These modules run adapter-doctor's implementation; the marker records the package version and kernel set.")
FROZEN = Check(
    "ADC906", CAT, Severity.WARNING, "Training mode with a frozen adapter",
    "PeftModel.from_pretrained loads adapters frozen unless is_trainable=True. The model is in training mode but no "
    "LoRA parameter requires a gradient, so training changes nothing.",
    manual="Load with PeftModel.from_pretrained(..., is_trainable=True) or adapter_doctor.runtime.load().")
DTYPE = Check(
    "ADC907", CAT, Severity.INFO, "LoRA weights in another dtype than the base",
    "PEFT upcasts adapter weights to fp32 by default (autocast_adapter_dtype), which costs memory and a cast per "
    "step on a bf16 base; fp16 LoRA on a bf16 base can overflow.")
REENTRANT = Check(
    "ADC908", CAT, Severity.WARNING, "Reentrant gradient checkpointing on the patched path",
    "The patched path recomputes with non-reentrant checkpointing; the reentrant mode needs inputs that require "
    "grad and drops keyword arguments.",
    manual="model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")
UNSUPPORTED = Check(
    "ADC909", CAT, Severity.INFO, "No patched implementation for this architecture",
    "adapter-doctor's runtime has no spec for this model type; the model runs as its library defines it.")
PACKED = Check(
    "ADC910", CAT, Severity.ERROR, "A packed batch would attend across its documents",
    "The batch holds several documents in a row (position_ids that restart, or cu_seq_lens), but an attention "
    "module would let each token see the documents before its own: transformers' SDPA and eager attention keep "
    "documents apart only when the batch has no attention mask and the forward builds no cache, flash-attention "
    "only without an attention mask. Training runs, and the loss and gradients are silently wrong. Also reported: "
    "labels that make a document's last token predict the next document's first.",
    manual="Call adapter_doctor.ensure_patched(model), or pass use_cache=False and no attention_mask; label each "
    "document's first token -100.")
PROJECTIONS = Check(
    "ADC911", CAT, Severity.INFO, "What each LoRA projection runs",
    "On a model patched by adapter-doctor, the path each PEFT LoRA projection takes, as PatchReport.projections "
    "lists it: fused (bf16/fp16 base), fused 4-bit (bitsandbytes nf4 or fp4, double-quantized or not), or a "
    "fallback to PEFT's own layer with the reason (dropout, DoRA, an unreadable quantized layout...). A fallback "
    "is exact, only slower; it is a warning so that a projection left on the slow path is seen.",
    manual="Remove what the reason names (e.g. lora_dropout=0), or accept the slower path.")
OFFLOAD_REPLACED = Check(
    "ADC912", CAT, Severity.WARNING, "Offloaded checkpointing replaced by torch's",
    "enable_offloaded_checkpointing put its checkpoint, which keeps each layer's saved inputs in host memory, on "
    "the decoder layers; a later gradient_checkpointing_enable put torch's back on some of them. The Trainer makes "
    "that call when training starts with gradient_checkpointing=True, which TRL's SFTConfig sets by default. "
    "Training still works, but those layers keep their inputs on the GPU and replay in full.",
    manual="Pass gradient_checkpointing=False to the Trainer's or SFTTrainer's arguments; "
           "enable_offloaded_checkpointing already checkpoints the layers.")
register(BROKEN, FALLBACK, FOREIGN, MIXED, OURS, FROZEN, DTYPE, REENTRANT, UNSUPPORTED, PACKED, PROJECTIONS,
         OFFLOAD_REPLACED)
