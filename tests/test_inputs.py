"""gkpd.inputs: how an example input calls a model, and the tensors of its output; and models
called with keyword or positional inputs, compressed, saved and loaded end to end."""

import copy
from collections import OrderedDict, UserDict, namedtuple
from dataclasses import dataclass

import pytest
import torch
from testkit.keyword_models import (
    KeywordModel,
    PairModel,
    TinyOutput,
    pair_batch,
    token_batch,
)
from torch import nn

import gkpd
from gkpd.decompose import full_rank
from gkpd.inputs import ModelCall, map_tensors, output_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


def _recorder():
    seen = {}

    def model(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return "ran"

    return model, seen


class Encoding(UserDict):
    """A mapping that is no dict, as ``transformers.BatchEncoding`` is."""


# ----------------------------------------------------------------------------- ModelCall


def test_each_form_of_example_input_calls_the_model_as_documented():
    x, y = torch.zeros(2, 3), torch.ones(2, 1)
    images = [torch.zeros(3, 4, 4), torch.zeros(3, 5, 5)]
    cases = [
        (x, (x,), {}),
        ((x, y), (x, y), {}),
        ({"input_ids": x, "attention_mask": y}, (), {"input_ids": x, "attention_mask": y}),
        (Encoding(input_ids=x), (), {"input_ids": x}),
        (images, (images,), {}),  # a list is one positional input
    ]
    for example, args, kwargs in cases:
        model, seen = _recorder()
        assert ModelCall.of(example).run(model) == "ran"
        assert seen["args"] == args and seen["kwargs"].keys() == kwargs.keys()
        assert all(seen["kwargs"][k] is v for k, v in kwargs.items())
    call = ModelCall.of(x)
    assert ModelCall.of(call) is call


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (None, "got None"),
        ("some text", "got str"),
        ((), r"got \(\)"),
        ({}, r"got \{\}"),
        ({"input_ids": [1, 2]}, r"got \{input_ids: \[int, int\]\}"),
        ({0: torch.zeros(2)}, "keys must be argument names"),
    ],
)
def test_an_input_without_tensors_is_refused_naming_the_argument(example, message):
    with pytest.raises(TypeError, match="my_input") as info:
        ModelCall.of(example, "my_input")
    assert info.match(message)


def test_tensors_are_found_moved_and_sliced_wherever_they_are_nested():
    Pair = namedtuple("Pair", "key value")
    ids, mask = torch.arange(12).view(4, 3), torch.ones(4, 3)
    past = (Pair(torch.zeros(4, 2), torch.ones(4, 2)),)
    call = ModelCall.of({"input_ids": ids, "past": past, "flag": True, "scale": torch.tensor(2.0),
                         "attention_mask": mask})
    tensors = call.tensors()
    assert [t.shape for t in tensors] == [(4, 3), (4, 2), (4, 2), (), (4, 3)]
    assert tensors[0] is ids and tensors[-1] is mask
    head = call.rows(1, 3)
    assert torch.equal(head.kwargs["input_ids"], ids[1:3])
    assert isinstance(head.kwargs["past"][0], Pair)
    assert head.kwargs["past"][0].value.shape == (2, 2)
    assert head.kwargs["flag"] is True and head.kwargs["scale"].shape == ()
    doubled = call.map(lambda t: t * 2)
    assert torch.equal(doubled.kwargs["input_ids"], ids * 2) and call.kwargs["input_ids"] is ids
    assert call.to(None) is call
    assert call.to("cpu").kwargs["input_ids"].device.type == "cpu"


@dataclass
class _DictOutput(OrderedDict):
    """What Hugging Face's ``ModelOutput`` is: a dataclass and an ordered dict of its set
    fields."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def __post_init__(self):
        for key in ("logits", "hidden"):
            if getattr(self, key) is not None:
                self[key] = getattr(self, key)


def test_mapping_tensors_keeps_each_containers_type():
    a, b = torch.zeros(2), torch.ones(3)
    double = lambda value: map_tensors(lambda t: t * 2, value)  # noqa: E731
    out = double(_DictOutput(logits=a, hidden=b))
    assert type(out) is _DictOutput and list(out) == ["logits", "hidden"]
    assert torch.equal(out.logits, a * 2) and torch.equal(out["hidden"], b * 2)
    plain = double(_Output(a, (b,)))  # a dataclass that is no mapping
    assert type(plain) is _Output and torch.equal(plain.logits, a * 2)
    assert torch.equal(plain.extra[0], b * 2) and plain.unset is None
    assert type(double(OrderedDict(x=a))) is OrderedDict
    assert type(double(Encoding(x=a))) is dict  # cannot be rebuilt from a dict: a dict


def test_output_tensors_reads_a_hugging_face_key_value_cache_in_layer_order():
    cache_utils = pytest.importorskip("transformers.cache_utils")
    cache = cache_utils.DynamicCache()
    keys, values = [torch.full((1, 2, 3, 4), float(i)) for i in range(2)]
    cache.update(keys, values, layer_idx=0)
    cache.update(keys + 10, values + 10, layer_idx=1)
    found = output_tensors({"logits": torch.zeros(1), "past_key_values": cache})
    assert [float(t.flatten()[0]) for t in found] == [0.0, 0.0, 1.0, 10.0, 11.0]


def test_batch_and_shape_are_the_first_batched_tensors():
    assert ModelCall.of(torch.zeros(5, 3)).batch == 5
    assert ModelCall.of(torch.zeros(7)).batch == 1  # one unbatched vector
    assert ModelCall.of((torch.zeros(3), torch.zeros(4, 2))).batch == 4
    call = ModelCall.of(token_batch(batch=3, length=9))
    assert call.batch == 3 and call.shape == (3, 9)


def test_a_failing_call_on_a_list_says_a_list_is_one_argument():
    def two_inputs(ids, mask):
        return ids * mask

    ids = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"a list is one argument.*pass a tuple"):
        ModelCall.of([ids, ids]).run_or_explain(two_inputs)
    assert torch.equal(ModelCall.of((ids, ids)).run_or_explain(two_inputs), ids)


def test_describe_names_dtypes_shapes_and_keywords():
    x = torch.zeros(2, 3, dtype=torch.float32)
    ids = torch.zeros(2, 7, dtype=torch.int64)
    assert ModelCall.of(x).describe() == "float32[2, 3]"
    assert ModelCall.of((x, ids)).describe() == "(float32[2, 3], int64[2, 7])"
    assert ModelCall.of({"input_ids": ids, "use_cache": False}).describe() == (
        "input_ids=int64[2, 7], use_cache=bool"
    )
    assert ModelCall((x,), {"mask": [ids, None]}).describe() == (
        "float32[2, 3], mask=[int64[2, 7], None]"
    )


# ----------------------------------------------------------------------------- outputs


@dataclass
class _Output:
    logits: torch.Tensor
    extra: tuple
    unset: torch.Tensor | None = None


def test_output_tensors_flattens_every_form_in_order():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    assert output_tensors(a) == [a]
    assert output_tensors(None) == []
    for output in [(a, [b, c]), {"x": a, "y": (b, c)}, OrderedDict(x=a, y=[b, {"z": c}]),
                   _Output(a, (b, c))]:
        assert all(t is e for t, e in zip(output_tensors(output), [a, b, c], strict=True))
    for bad in ["text", 3, object()]:
        with pytest.raises(TypeError, match="model output must be tensors"):
            output_tensors(bad)


# ----------------------------------------------------------------------------- end to end


def _assert_same_outputs(got, want, atol: float | None = 0.0):
    """Same type, keys and tensor shapes; and values within ``atol`` (``None``: any)."""
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert list(got) == list(want)
    got_t, want_t = output_tensors(got), output_tensors(want)
    assert [g.shape for g in got_t] == [w.shape for w in want_t]
    if atol is not None:
        for g, w in zip(got_t, want_t, strict=True):
            torch.testing.assert_close(g, w, atol=atol, rtol=0 if atol == 0 else 1e-5)


def _keyword_model(output="dict"):
    torch.manual_seed(0)
    return KeywordModel(output).eval()


def _pair_model():
    torch.manual_seed(0)
    return PairModel().eval()


CASES = {
    "keywords, dict output": (lambda: _keyword_model("dict"), token_batch),
    "keywords, OrderedDict output": (lambda: _keyword_model("ordered"), token_batch),
    "keywords, dataclass output": (lambda: _keyword_model("dataclass"), token_batch),
    "positional pair, tuple output": (_pair_model, pair_batch),
}


@pytest.mark.parametrize("case", CASES)
def test_compress_keeps_how_the_model_is_called_and_what_it_returns(case):
    make, inputs = CASES[case]
    model, x = make(), inputs()
    call = ModelCall.of(x)
    small, plan = gkpd.compress(model, x, ratio=2)
    assert plan.achieved_ratio == pytest.approx(2, rel=0.03)
    assert len(plan.compressed_layers) >= 2
    with torch.no_grad():
        want, got = call.run(model), call.run(small)
    _assert_same_outputs(got, want, atol=None)
    if isinstance(want, TinyOutput):
        assert got.attentions is None
    # at full Kronecker rank the same factor shapes reproduce the original outputs
    exact = copy.deepcopy(plan)
    for entry in exact.compressed_layers:
        entry.settings["rank"] = full_rank(entry.settings["a_shape"], entry.settings["b_shape"])
    full = gkpd.apply_(copy.deepcopy(model), exact)
    assert all(full.get_submodule(e.name).rank == e.settings["rank"]
               for e in exact.compressed_layers)
    with torch.no_grad():
        _assert_same_outputs(call.run(full), want, atol=1e-5)


def test_keyword_and_positional_calls_of_one_model_plan_alike():
    model, x = _keyword_model(), token_batch()
    by_name = gkpd.plan(model, x, ratio=2)
    by_position = gkpd.plan(model, (x["input_ids"], x["attention_mask"]), ratio=2)
    assert by_name.to_json() == by_position.to_json()


def test_save_and_load_round_trip_of_a_keyword_model(tmp_path):
    model, x = _keyword_model(), token_batch()
    small, plan = gkpd.compress(model, x, ratio=2)
    gkpd.save(tmp_path / "small", small, plan)
    loaded = gkpd.load(tmp_path / "small", KeywordModel())
    with torch.no_grad():
        _assert_same_outputs(loaded(**x), small(**x))


def test_a_model_that_fails_on_the_keywords_is_a_clear_error():
    model, x = _keyword_model(), token_batch()
    wrong = {"input_ids": x["input_ids"], "mask": x["attention_mask"]}
    with pytest.raises(ValueError, match=r"failed on example_input \(input_ids=int64\[2, 7\], "
                                         r"mask=int64\[2, 7\]\).*unexpected keyword.*'mask'"):
        gkpd.plan(model, wrong, ratio=2)
    with pytest.raises(ValueError, match=r"failed on example_input \(x=float32\[2, 32\]\)"):
        gkpd.plan(nn.Sequential(nn.Linear(32, 64)), {"x": torch.zeros(2, 32)}, ratio=2)
    with pytest.raises(TypeError, match="example_input must be a tensor, a tuple"):
        gkpd.compress(model, None, ratio=2)


@pytest.mark.parametrize("entry", ["summary", "measure_latency", "to_onnx"])
def test_an_input_the_model_cannot_take_is_named_not_a_torch_traceback(entry, tmp_path):
    from gkpd.timing import measure_latency

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    wrong = torch.randn(1, 4, 8, 8)  # 4 channels for a 3-channel model
    run = {
        "summary": lambda: gkpd.summary(model, wrong),
        "measure_latency": lambda: measure_latency(model, wrong, warmup=0, repeats=1),
        "to_onnx": lambda: gkpd.export.to_onnx(model, wrong, tmp_path / "m.onnx"),
    }[entry]
    if entry == "to_onnx":
        pytest.importorskip("onnx")
    with pytest.raises(ValueError, match=r"model failed on example_input \(float32\[1, 4, 8, 8\]"
                       r"\): .*3 channels"):
        run()
    assert not list(tmp_path.iterdir())  # nothing written
