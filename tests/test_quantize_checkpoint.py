"""`python -m minivlm.convert GGUF --out DIR --quantize int8|int4`: a quantised model.safetensors
whose config.json records the scheme and format version; load_converted reads it back on the
meta device (no fp32 copy of the quantised layers), and an unknown record is refused."""
import json

import pytest
import torch
from safetensors import safe_open

from minivlm import chat
from minivlm.convert import load_converted, main
from minivlm.load import load_gguf
from minivlm.quant.int4 import Int4Linear
from minivlm.quant.int8 import Int8Linear
from minivlm.quant.swap import prepare_quantized, quantize_model, quantized_layers
from minivlm.web_model import WebModel
from test_gguf import tiny_model, write_gguf


@pytest.mark.parametrize("scheme,layer", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_converted_quantised_checkpoint_loads_back_exactly(tmp_path, scheme, layer, capsys):
    write_gguf(tmp_path / "tiny.gguf", tiny_model("llama"), "llama", "token_embd.weight")
    main([str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "q"), "--quantize", scheme,
          "--quantize-group-size", "32"])
    assert f"wrote {tmp_path / 'q'} (minivlm, {scheme})" in capsys.readouterr().out
    record = json.loads((tmp_path / "q" / "config.json").read_text())["quantize"]
    assert record == {"scheme": scheme, "group_size": 32 if scheme == "int4" else None,
                      "include_vision": False, "format_version": 1}
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        kind = "weight_int8" if scheme == "int8" else "weight_int4"
        assert f.get_tensor(f"layers.0.mlp.up_proj.{kind}").dtype == \
            (torch.int8 if scheme == "int8" else torch.uint8)
    assert "layers.0.mlp.up_proj.weight" not in names and "lm_head.weight" not in names

    model, _ = load_converted(tmp_path / "q")
    assert len(quantized_layers(model)) == 14 and isinstance(model.layers[1].mlp.down_proj, layer)
    assert model.lm_head.weight is model.embed_tokens.weight  # tied again, stored once
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    reference, _ = load_gguf(tmp_path / "tiny.gguf")
    quantize_model(reference, scheme, 32, verbose=False)
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


def test_unknown_scheme_or_format_version_is_refused_in_one_line(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", tiny_model("llama"), "llama", "token_embd.weight")
    main([str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "q"), "--quantize", "int8"])
    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    for change in ({"format_version": 2}, {"scheme": "nf4"}):
        config_file.write_text(json.dumps(config | {"quantize": config["quantize"] | change}))
        with pytest.raises(ValueError, match=r"config.json: quantize scheme '(int8|nf4)' at "
                                             r"format version [12] is not one this minivlm "
                                             r"reads \(int8, int4 at version 1\); convert the "
                                             r"model again with this version$"):
            load_converted(tmp_path / "q")


def test_chat_and_web_take_quantize(tmp_path, tiny_checkpoint, capsys):
    write_gguf(tmp_path / "tiny.gguf", tiny_model("llama"), "llama", "token_embd.weight")
    answers = chat.main(["--gguf", str(tmp_path / "tiny.gguf"), "--prompt", "the", "--device",
                         "cpu", "--max-new-tokens", "3", "--quantize", "int4",
                         "--quantize-group-size", "32"])
    assert len(answers) == 1 and "quantize_model: int4 (group 32) on 14" in capsys.readouterr().out
    web = WebModel(str(tiny_checkpoint), quantize="int8")
    assert isinstance(web.model.lm.layers[0].mlp.up_proj, Int8Linear)
    with pytest.raises(ValueError, match=r"^--quantize int4: this checkpoint is quantised as "
                                         r"int8 already"):
        prepare_quantized(web.model, "int4")
