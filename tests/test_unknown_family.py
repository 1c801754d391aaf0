"""A checkpoint no descriptor reads: the error names the closest family and the guide; `inspect` lists what that
family could not map and the config keys it does not read — the first steps of docs/adding-a-family.md."""

from __future__ import annotations

import json

import pytest
import transformers
from click.testing import CliRunner

from ligo_convert import LigoError, load
from ligo_convert.cli import main


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    """BLOOM: ALiBi positions and a fused, head-interleaved query_key_value — a family without a descriptor."""
    folder = tmp_path_factory.mktemp("unknown") / "bloom"
    config = transformers.BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4)
    transformers.BloomForCausalLM(config).save_pretrained(folder)
    return folder


def test_unknown_family_error_names_the_closest_and_the_guide(bloom):
    with pytest.raises(LigoError) as e:
        load(bloom)
    message = str(e.value)
    assert "\n" not in message and "unknown family (model_type 'bloom'" in message
    assert "the closest is " in message and "docs/adding-a-family.md" in message


def test_inspect_lists_what_the_closest_family_cannot_map(bloom):
    result = CliRunner().invoke(main, ["inspect", str(bloom), "--json"])
    assert result.exit_code == 2
    report = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert report["family"] is None and report["guide"] == "docs/adding-a-family.md"
    assert report["closest"] == "gpt_neox", report["closest"]  # the same module names, nested differently
    # BLOOM's own names: its word-embedding norm, its fused attention; and the config keys that say so
    unmapped = report["unmapped_tensors"]
    assert any("word_embeddings_layernorm" in k for k in unmapped), unmapped
    assert 0 < len(unmapped) <= report["tensors"]
    assert "apply_residual_connection_post_layernorm" in report["unknown_config_keys"]
    assert "bos_token_id" not in report["unknown_config_keys"]  # generic keys are not the family's business

    text = CliRunner().invoke(main, ["inspect", str(bloom)])
    assert text.exit_code == 2
    assert "closest:" in text.stdout and "guide       docs/adding-a-family.md" in text.stdout
