"""The search on the bundled CNN with tiny settings: MetaQuantNet starts at the pretrained weights, the GA
respects budgets and pins, the same seed gives the same policy, a new budget reuses the trained
MetaQuantNet, and what is finetuned is what gets emitted."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mqtool import numerics
from mqtool.errors import InputError
from mqtool.model import load_model
from mqtool.policy import average_weight_bits
from mqtool.search import Budget, SearchConfig, search_policies
from mqtool.search.api import load_dataset
from mqtool.search.driver import SearchEngine

from .conftest import example_path

TINY = dict(
    epochs=1,
    population=8,
    generations=2,
    parents=3,
    mutations=3,
    crossovers=3,
    fitness_samples=64,
    finetune_epochs=1,
    batch_size=128,
)


@pytest.fixture(scope="module")
def cnn():
    model = load_model(example_path("mnist_cnn"))
    data = load_dataset(example_path("mnist_cnn", "train.npz"), model)
    return model, data.take(np.arange(600))


@pytest.fixture(scope="module")
def trained(cnn, tmp_path_factory):
    model, data = cnn
    wd = str(tmp_path_factory.mktemp("wd"))
    out = search_policies(model, data, [Budget("bits", 3.0)], SearchConfig.flat(**TINY), wd)
    return out, wd


def test_metaquantnet_starts_at_pretrained_weights(cnn, tmp_path):
    model, data = cnn
    eng = SearchEngine(model, data, SearchConfig.flat(**(TINY | {"epochs": 0})), str(tmp_path))
    mqn = eng.train_metaquantnet()
    bits = [4] * eng.ctx.n
    gen = mqn.generate_float(bits)
    for layer in eng.ctx.info.layers:
        w, s = gen[layer.name]
        w0 = eng.ctx.net.layers[layer.name].weight.detach()
        assert torch.equal(w, w0)
        expect = numerics.weight_scale(w0.numpy(), 4, layer.channel_axis, "mse")
        np.testing.assert_array_equal(s.detach().numpy(), expect)
    # O(hidden x channels) per layer, never O(weights): (enc -> hidden) + (hidden -> gain and clip per channel)
    h, enc = eng.cfg.training.hidden, len(eng.ctx.widths) + 3
    channels = sum(layer.channels for layer in eng.ctx.info.layers)
    assert mqn.parameter_count() == eng.ctx.n * (enc * h + h) + 2 * (h + 1) * channels


def test_gradients_reach_metaquantnet(cnn, tmp_path):
    model, data = cnn
    eng = SearchEngine(model, data, SearchConfig.flat(**(TINY | {"epochs": 0})), str(tmp_path))
    mqn = eng.train_metaquantnet()
    with eng.ctx.net.override_weights(mqn.generate([2] * eng.ctx.n)):
        out = eng.ctx.forward(eng.ctx.train, np.arange(32))[0]
    out.square().mean().backward()
    grads = [p.grad for p in mqn.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_policy_meets_budget_and_reuses_metaquantnet(trained, cnn):
    out, wd = trained
    r = out.results[0]
    assert r.avg_bits <= 3.0 + 1e-9 and r.avg_bits > 2.5
    assert set(b.weight_bits for b in r.policy.layers.values()) <= {2, 3, 4, 5, 6, 8}
    # a second budget on the same workdir does not train again
    model, data = cnn
    events = []
    again = search_policies(
        model, data, [Budget("bits", 2.5)], SearchConfig.flat(**TINY), wd, lambda e, d: events.append(e)
    )
    assert "mqn_epoch" not in events and "mqn_resume" in events
    assert again.results[0].avg_bits <= 2.5 + 1e-9
    # other GA / finetune settings reuse it too; a training option does not
    events.clear()
    ga_only = SearchConfig.flat(**(TINY | {"population": 6, "fitness_samples": 32, "finetune_epochs": 2}))
    search_policies(model, data, [Budget("bits", 2.5)], ga_only, wd, lambda e, d: events.append(e))
    assert "mqn_epoch" not in events and "mqn_resume" in events
    events.clear()
    search_policies(
        model,
        data,
        [Budget("bits", 2.5)],
        SearchConfig.flat(**(TINY | {"hidden": 4})),
        wd,
        lambda e, d: events.append(e),
    )
    assert "mqn_epoch" in events


def test_same_seed_same_policy(trained, cnn, tmp_path):
    out, _ = trained
    model, data = cnn
    fresh = search_policies(model, data, [Budget("bits", 3.0)], SearchConfig.flat(**TINY), str(tmp_path))
    assert fresh.results[0].policy.layers == out.results[0].policy.layers


def test_infeasible_and_generous_budgets(trained):
    out, _ = trained
    eng = out.engine
    with pytest.raises(InputError, match=r"feasible range is 2\.000\.\.8\.000"):
        eng.check_budget(Budget("bits", 1.5))
    r = eng.search(Budget("bits", 9.0))
    assert r.avg_bits == 8.0 and "above what is needed" in r.note


def test_pins_hold(cnn, tmp_path):
    model, data = cnn
    eng0 = SearchEngine(model, data, SearchConfig.flat(**(TINY | {"epochs": 0})), str(tmp_path / "a"))
    first, last = eng0.ctx.names[0], eng0.ctx.names[-1]
    cfg = SearchConfig.flat(**TINY, pins={first: 8, last: 32})
    out = search_policies(model, data, [Budget("bits", 3.0)], cfg, str(tmp_path / "b"))
    pol = out.results[0].policy
    assert pol.get(first).weight_bits == 8 and pol.get(last).weight_bits == 32
    assert average_weight_bits(pol, eng0.ctx.info.layers) <= 3.0 + 1e-9
    with pytest.raises(InputError, match="no quantizable layer named"):
        SearchEngine(model, data, SearchConfig.flat(**TINY, pins={"nope": 4}), str(tmp_path / "c"))


def test_finetuned_model_is_what_gets_emitted(trained, cnn):
    """The emitted QDQ model on ORT reproduces the torch simulation of the finetuned parameters."""
    from mqtool.emit import quantize_model

    out, _ = trained
    eng = out.engine
    policy = out.results[0].policy
    params, _ = eng.finetune(policy, epochs=1)
    qmodel = quantize_model(eng.ctx.model, policy, qparams=params, storage="int8", data=eng.ctx.train.inputs)
    x = eng.ctx.search_set.inputs[eng.ctx.info.inputs[0]][:64]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(qmodel.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {eng.ctx.info.inputs[0]: x})[0]
    from mqtool.search.metaquantnet import weight_quant_ste

    wbits = {n: policy.get(n).weight_bits for n in eng.ctx.names}
    weights = {
        n: weight_quant_ste(
            torch.from_numpy(p.weight),
            torch.from_numpy(p.scale),
            wbits[n],
            eng.ctx.info.layer(n).channel_axis,
        )
        for n, p in params.layers.items()
    }
    saved = {
        n: eng.ctx.net.layers[n].bias.detach().clone() for n, p in params.layers.items() if p.bias is not None
    }
    with torch.no_grad():
        for n, p in params.layers.items():
            if p.bias is not None:
                eng.ctx.net.layers[n].bias.copy_(torch.from_numpy(p.bias))
        with eng.ctx.net.override_weights(weights):
            sim = eng.ctx.forward_feeds([torch.from_numpy(x)])[0].numpy()
        for n, b in saved.items():
            eng.ctx.net.layers[n].bias.copy_(b)
    # identical predictions; logits within the int32-bias rounding of the emitted model
    assert (got.argmax(1) == sim.argmax(1)).mean() >= 0.98
    assert np.abs(got - sim).max() <= 0.05 * np.abs(sim).max()


def test_pareto_outputs(trained, tmp_path):
    from mqtool.search import write_search_outputs
    from mqtool.search.api import SearchOutcome

    out, _ = trained
    both = SearchOutcome([*out.results, out.engine.search(Budget("bits", 2.5))], out.engine)
    written = write_search_outputs(both, str(tmp_path / "front"))
    front = json.load(open(tmp_path / "front" / "pareto.json"))
    assert [p["value"] for p in front["points"]] == [2.5, 3.0]
    assert any(w.endswith("policy-bits-2.5.json") for w in written)


def test_finetuning_starts_from_the_better_of_metaquantnet_and_ptq(trained, monkeypatch):
    """`finetune.start = auto`: a MetaQuantNet whose weights are broken (as an undertrained one on a short
    time budget can be) must not cost the result its PTQ quality; a good one is kept as the start."""
    out, _ = trained
    eng = out.engine
    policy = out.results[0].policy
    events: list[dict] = []
    monkeypatch.setattr(eng, "progress", lambda e, d=None: events.append(d) if e == "finetune_done" else None)
    _, fit_ptq = eng.finetune(policy, epochs=0, start="ptq")
    _, fit_auto = eng.finetune(policy, epochs=0)
    assert events[-1]["start"] in ("metaquantnet", "ptq") and len(events[-1]["start_scores"]) == 2
    assert fit_auto == min(events[-1]["start_scores"].values()) <= fit_ptq

    real = eng.mqn.generate_float

    def broken(wbits):
        return {n: (torch.randn_like(w) * w.abs().max(), s) for n, (w, s) in real(wbits).items()}

    monkeypatch.setattr(eng.mqn, "generate_float", broken)
    _, fit_broken_mqn = eng.finetune(policy, epochs=0, start="metaquantnet")
    _, fit = eng.finetune(policy, epochs=0)
    assert events[-1]["start"] == "ptq"
    assert fit == pytest.approx(fit_ptq) and fit_broken_mqn > 2 * fit_ptq


def test_finetune_start_is_validated_in_library_terms():
    with pytest.raises(InputError) as e:
        SearchConfig.flat(finetune_start="pretrained")
    assert e.value.field == "finetune.start" and "auto, metaquantnet or ptq" in str(e.value)
    assert SearchConfig.flat(finetune_start="ptq").finetune.start == "ptq"
    assert SearchConfig().finetune.start == "auto"
