"""The public names of loralib resolve, lazily imported ones included, and the package is this checkout's."""

from pathlib import Path

import pytest

import loralib

CORE = {
    "LoraEmbedding", "LoraLayer", "LoraLinear", "count_parameters", "default_model_id", "find_targets", "from_peft", "inject_lora",
    "load_lora", "lora_layers", "lora_state_dict", "adapter_state_dict", "mark_only_lora_as_trainable", "merge_lora",
    "output_dir", "print_versions", "save_lora", "set_seed", "to_peft", "unload_lora", "unmerge_lora", "LoraConfig",
    # several named adapters (loralib.named, notebook 04)
    "active_adapter", "adapter_batch", "adapter_names", "add_adapter", "add_weighted_adapter", "delete_adapter",
    "disable_adapters", "load_adapters", "save_adapters", "set_adapter", "using_adapter", "to_peft_all",
}  # fmt: skip
# Microsoft's loralib 0.1.2 API (loralib.compat.microsoft), at the top level as there.
MICROSOFT = {"Linear", "Embedding", "MergedLinear", "ConvLoRA", "Conv1d", "Conv2d", "Conv3d", "LoRALayer"}


def test_the_top_level_names_exactly_the_core():
    assert set(loralib.__all__) == CORE | MICROSOFT and len(loralib.__all__) == len(CORE | MICROSOFT)


@pytest.mark.parametrize("name", sorted(loralib.__all__))
def test_public_name_is_the_object_its_module_defines(name):
    """Lazy names included: the top level hands out the very object of the module that defines it."""
    from importlib import import_module

    obj = getattr(loralib, name)
    assert obj.__module__.startswith("loralib.") and obj.__name__ == name
    assert getattr(import_module(obj.__module__), name) is obj


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        loralib.nope  # noqa: B018


def test_imported_from_this_repository():
    root = Path(__file__).resolve().parent.parent
    assert Path(loralib.__file__).resolve().is_relative_to(root)
