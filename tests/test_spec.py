"""CacheSpec: one description of a compressed cache, with one text form and one dict form that round-trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from squeezekv.spec import CacheSpec


def test_text_and_dict_forms_round_trip():
    spec = CacheSpec(method="h2o", budget=256, allocation="pyramid", channel="kivi", crosslayer="minicache",
                     method_params={"recent_ratio": 0.25}, allocation_params={"beta": 10.0},
                     channel_params={"bits": 4, "kernel": "torch"}, crosslayer_params={"spans": [[2, 3]]},
                     evict_every=4, prefill_chunk=512)
    assert CacheSpec.parse(spec.to_text()) == spec
    assert CacheSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.to_text() == ("method=h2o budget=256 allocation=pyramid channel=kivi crosslayer=minicache "
                              "evict_every=4 prefill_chunk=512 method.recent_ratio=0.25 allocation.beta=10.0 "
                              "channel.bits=4 channel.kernel=torch crosslayer.spans=[[2,3]]")


def test_parse_reads_numbers_and_names():
    spec = CacheSpec.parse("method=snapkv, budget=0.3 method.window=32 channel=kivi channel.bits=2")
    assert spec == CacheSpec(method="snapkv", budget=0.3, method_params={"window": 32}, channel="kivi",
                             channel_params={"bits": 2})
    assert CacheSpec.parse("method=window budget=100").budget == 100
    assert CacheSpec.parse("method=window channel=none").channel is None
    assert CacheSpec().to_text() == "method=snapkv budget=0.5 allocation=squeeze"


def test_spec_copies_the_callers_params():
    params = {"window": 16}
    spec = CacheSpec(method_params=params)
    params["window"] = 99
    assert spec.method_params == {"window": 16}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty cache spec"),
        ("snapkv", "must look like name=value"),
        ("method=snapkv bits=2", "key 'bits' is unknown"),
        ("policy.window=3", "part one of"),
        ("budget=0", "budget 0 is out of range"),
        ("budget=1.5", "budget 1.5 is out of range"),
        ("evict_every=0", "evict_every=0 is out of range"),
        ("prefill_chunk=-3", "prefill_chunk=-3 is out of range"),
    ],
)
def test_bad_specs_name_the_bad_value(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        CacheSpec.parse(text)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match=r"\['window'\] are unknown"):
        CacheSpec.from_dict({"method": "snapkv", "window": 8})


def test_validate_checks_names_and_params_against_the_registry():
    CacheSpec(method="streamingllm", method_params={"sinks": 2}).validate()
    with pytest.raises(ValueError, match="nope"):
        CacheSpec(method="nope").validate()
    with pytest.raises((ValueError, TypeError), match="bogus"):
        CacheSpec(method="snapkv", method_params={"bogus": 1}).validate()


def test_parsing_a_spec_imports_neither_torch_nor_transformers():
    code = ("import sys; from squeezekv.spec import CacheSpec; CacheSpec.parse('method=snapkv budget=0.3'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
