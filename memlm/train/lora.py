"""LoRA and LongLoRA's LoRA with trainable embeddings and norms (Chen et al. 2023) on any transformers model,
through peft.

``inject_lora`` adds peft LoRA adapters (rank r, alpha) to the named projection modules in place;
``embed_norm_parameters`` names what LongLoRA trains besides them: the input embeddings and every normalization
layer (LongLoRA: plain LoRA on attention cannot recover long-context quality, trainable embeddings and norms can;
they are a small fraction of the weights). The paper writes "LoRA+"; its code calls it ``trainable_params=
"embed,norm"``, and so does memlm (``trainable="lora_embed_norm"``): LoRA+ is also Hayou et al.'s (2024) LoRA with
different learning rates for A and B, another method. After training, ``merge_lora`` folds the adapters into the weights
(peft's merge) and removes them; ``unload_lora`` removes them unmerged, leaving the base model as it was.
"""

from __future__ import annotations

from torch import nn

#: LongLoRA's LoRA targets by default: every attention projection (the paper's q, k, v, o)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def inject_lora(model: nn.Module, rank: int, alpha: int, targets) -> None:
    """Add LoRA adapters to the modules whose last name is in ``targets`` (e.g. ``q_proj``), in place."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise ImportError("LoRA needs peft: pip install 'memlm[train]'") from error
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"lora_targets {missing} name no module of {type(model).__name__}")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), model)


def embed_norm_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters LongLoRA trains besides the adapters: input embeddings and normalization layers."""
    embeddings = model.get_input_embeddings()
    names = set()
    for module_name, module in model.named_modules():
        if module is embeddings or type(module).__name__.endswith(("Norm", "RMSNorm", "LayerNorm")):
            names |= {f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False)}
    return names


def adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight (peft's merge) and remove the adapters; returns the model."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to merge")
    for name, module in layers:
        module.merge()
        _replace(model, name, module.get_base_layer())
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every LoRA adapter without merging: the base model as it was before ``inject_lora``."""
    for name, module in adapted_layers(model):
        _replace(model, name, module.get_base_layer())
    return model
