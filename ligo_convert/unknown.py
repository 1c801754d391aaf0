"""What to tell a user whose checkpoint no descriptor reads: the closest family, the tensors it could not map and
the config keys it does not understand — the starting point of a new descriptor (``docs/adding-a-family.md``)."""

from __future__ import annotations

from .descriptors import Descriptor, load_descriptors

GUIDE = "docs/adding-a-family.md"

# Keys every Hugging Face config may carry (PretrainedConfig's own attributes, generation and tokenizer ids): no
# descriptor needs to understand them.
GENERIC_CONFIG_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_cache", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "id2label", "label2id", "problem_type",
    "tie_word_embeddings", "is_encoder_decoder", "is_decoder", "add_cross_attention", "chunk_size_feed_forward",
    "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "initializer_range", "initializer_factor",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout", "dropout",
    "classifier_dropout", "layerdrop", "auto_map", "quantization_config", "pruned_heads", "tf_legacy_loss",
    "use_bfloat16", "cross_attention_hidden_size",
})


def _config_keys_read(descriptor: Descriptor) -> set[str]:
    """Top-level config keys a descriptor reads, requires, or writes from its template."""
    keys = {k.split(".")[0] for cf in descriptor.config_fields.values() for k in cf.keys}
    keys |= {cf.when.split(".")[0] for cf in descriptor.config_fields.values() if cf.when}
    keys |= {k.split(".")[0] for k in descriptor.config_require}
    keys |= set(descriptor.config_template) | {k.split(".")[0] for k in descriptor.config_write_defaults}
    keys |= {k.split(".")[0] for k in descriptor.dtype_keys}
    return keys


def _leaves(names) -> set[str]:
    """Module and parameter name at the end of each tensor name (``query_key_value.weight``): what families that
    nest their layers differently still share."""
    return {".".join(name.split(".")[-2:]) for name in names}


def _descriptor_names(descriptor: Descriptor) -> list[str]:
    return list(descriptor.tensors.values()) + [f["file"] for f in descriptor.fused]


def closest_family(config: dict, keys: list[str]) -> dict:
    """The descriptor whose tensor names share the most module/parameter names with ``keys`` (then: maps the most
    keys as they are, understands the most config keys), with the tensors and config keys it leaves over."""
    best = None
    leaves = _leaves(keys)
    for descriptor in load_descriptors().values():
        mapping = descriptor.match(keys)
        unmapped = [k for k in mapping.unmapped] + [k for k, _ in mapping.unsupported]
        unknown = sorted(k for k in config if k not in GENERIC_CONFIG_KEYS and k not in _config_keys_read(descriptor))
        shared = len(leaves & _leaves(_descriptor_names(descriptor)))
        score = (-shared, len(unmapped), len(unknown), descriptor.name)
        if best is None or score < best[0]:
            best = (score, descriptor, unmapped, unknown)
    _, descriptor, unmapped, unknown = best
    return {"closest": descriptor.name, "title": descriptor.title, "tensors": len(keys),
            "unmapped_tensors": unmapped, "unknown_config_keys": unknown, "guide": GUIDE}


def hint(report: dict) -> str:
    """One sentence for the unknown-family error."""
    return (f"the closest is {report['closest']} ({len(report['unmapped_tensors'])} of {report['tensors']} tensors "
            f"unmapped; `ligo-convert inspect` lists them) — see {report['guide']} to add a descriptor")
