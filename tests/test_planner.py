"""The schedule planner: its simulator, its choices, the decoder applying them, the file.

The planner's choices are checked against an optimum found here by brute force over
every placement (also per microbatch), the simulator against step times worked out by
hand, and every placement the planner can choose against the decoder's logits, bitwise.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import decode_inputs, run_dbo, run_without_torch, split_inputs

from coop_dbo import UBatchScheduler
from coop_dbo.cost_model import FORMAT, CostModel
from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.planner import (
    PLACEMENTS,
    LayerStretches,
    Piece,
    PlannedBucket,
    SchedulePlan,
    StretchProfile,
    best_placement,
    estimate,
    ideal_us,
    no_dbo_us,
    plan_schedule,
    simulate,
    simulate_dbo,
    simulate_pieces,
    split_estimates,
    ubatch_pieces,
)
from coop_dbo.schedule import Placement, SchedulePolicy

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.profile_layer import (
    VARIANTS,
    _split_replays,
    _stretches_of,
    profile_from_variants,
)

CFG = MoEConfig.tiny(num_layers=3, num_experts=8, top_k=2)


def profile(before: float, experts: float, *, shared: float = 30.0, keys: float = 10.0,
            values: float = 10.0, tail: float = 40.0, first_gather: float = 20.0,
            comm: float | None = None, layers: int = 6, tokens: int = 64) -> StretchProfile:
    """Equal layers; ``comm`` per direction, default half the layer's compute (comm =
    compute per microbatch and layer)."""
    compute = before + experts + shared + keys + values
    per_direction = compute / 2 if comm is None else comm
    layer = LayerStretches(before_us=before, shared_us=shared, keys_us=keys,
                           values_us=values, experts_us=experts,
                           dispatch_us=per_direction, combine_us=per_direction)
    return StretchProfile(tokens, (layer,) * layers, tail_us=tail,
                          first_gather_us=first_gather)


def every_placement() -> list[Placement]:
    """All placements, enumerated here independently of ``PLACEMENTS``."""
    return [Placement(keys_before=k, values_before=v, shared_before=s)
            for k, v, s in itertools.product((False, True), repeat=3)]


# -- the simulator against hand-computed steps ---------------------------------------------

def test_one_layer_without_comm_runs_every_piece_one_after_the_other() -> None:
    # comm 0: the compute stream runs A0 A1 E0 E1 T0 T1 back to back.
    p = profile(100, 50, shared=7, keys=3, values=2, tail=11, first_gather=5, comm=0,
                layers=1)
    for placement in every_placement():
        # one layer, no next step: the gathers take no time, the shared expert does
        assert simulate_dbo(p, placement) == 2 * (5 + 100 + 7 + 50 + 11)
    assert no_dbo_us(p) == 5 + 100 + 7 + 50 + 11


def test_comm_bound_layer_costs_the_first_stretch_four_transfers_and_the_tail() -> None:
    # comm >> compute (D = 1000 us per transfer): D0 starts when A0 ends, then the comm
    # stream is busy to the end: a + 4D, and the last microbatch's tail after C1.
    a, e, t, d = 10.0, 20.0, 5.0, 1000.0
    p = profile(a, e, shared=0, keys=0, values=0, tail=t, first_gather=0, comm=d, layers=1)
    assert simulate_dbo(p) == a + 4 * d + t
    assert simulate([a], [e], t, d) == a + 4 * d + t  # the whole-stretch form
    # two decode steps per call: the step boundary pipelines, only one fill and drain
    assert simulate_dbo(p, num_steps=2) == a + 8 * d + t
    # microbatch 1 starting while D0 runs changes nothing; starting after D0 ended, the
    # comm stream idles until its A is done, then runs D1 C0 C1
    assert simulate_dbo(p, start_us=[0.0, 500.0]) == a + 4 * d + t
    assert simulate_dbo(p, start_us=[0.0, 2000.0]) == 2000 + a + 3 * d + t


def test_a_layer_at_comm_equal_compute_costs_twice_its_compute_plus_the_imbalance() -> None:
    # The loss analysis: a layer costs 2(a + e) + |a - e| (3a + e when a > e).
    for a, e in ((300.0, 100.0), (200.0, 200.0), (100.0, 300.0), (250.0, 150.0)):
        d = (a + e) / 2

        def step(layers: int, a: float = a, e: float = e, d: float = d) -> float:
            return simulate([a] * layers, [e] * layers, 0.0, d)
        assert step(7) - step(6) == step(6) - step(5) == 2 * (a + e) + abs(a - e)


def test_decode_steps_join_the_tail_to_the_next_first_stretch() -> None:
    # Pieces of two steps, written out by hand: the tail and the next step's first A are
    # one piece (no yield between them); the last layer gathers layer 0's cache for the
    # next step, layer 0 gathers its own only in the first step.
    lay = LayerStretches(before_us=10, shared_us=1, keys_us=2, values_us=3, experts_us=20,
                         dispatch_us=7, combine_us=8)
    p = StretchProfile(4, (lay, lay), tail_us=5, first_gather_us=4)
    place = Placement(keys_before=True, shared_before=True)  # keys + shared before
    a_next, a_last = 10 + 2 + 1, 10 + 1  # the last step's last layer gathers nothing
    e_next, e_last = 20 + 3, 20
    by_hand = [("compute", 4 + a_next), ("comm", 7), ("compute", e_next), ("comm", 8),
               ("compute", a_next), ("comm", 7), ("compute", e_next), ("comm", 8),
               ("compute", 5 + a_next), ("comm", 7), ("compute", e_next), ("comm", 8),
               ("compute", a_last), ("comm", 7), ("compute", e_last), ("comm", 8),
               ("compute", 5)]
    got = ubatch_pieces(p, place, num_steps=2)
    assert [(x.stream, x.us) for x in got] == by_hand
    pieces = [Piece(s, us) for s, us in by_hand]  # type: ignore[arg-type]
    assert simulate_dbo(p, place, num_steps=2) == simulate_pieces([pieces, pieces])
    assert no_dbo_us(p, num_steps=2) == sum(us for _, us in by_hand)


def test_uneven_microbatches_and_their_references() -> None:
    small = profile(50, 40, comm=0, layers=2, tokens=32)
    large = profile(120, 90, comm=0, layers=2, tokens=96)
    serial = (sum(x.us for x in ubatch_pieces(small, Placement()))
              + sum(x.us for x in ubatch_pieces(large, Placement())))
    assert simulate_dbo([small, large]) == serial  # no comm: nothing overlaps
    est = estimate([small.with_comm(30, 30), large.with_comm(80, 80)])
    assert est.serial_us == serial + 2 * 2 * (30 + 80)
    assert est.ideal_us == max(serial, 2 * 2 * (30 + 80))
    assert est.ideal_us <= est.dbo_us <= est.serial_us
    assert est.share_hidden == (est.serial_us - est.dbo_us) / (est.serial_us - est.ideal_us)
    assert ideal_us(large, num_ubatches=1) == max(large.compute_us(), large.comm_us())


# -- the planner's choices against a brute force ------------------------------------------

SYNTHETIC = {
    "balanced": profile(100, 100),
    "attention-heavy": profile(300, 100),
    "expert-heavy": profile(100, 300),
    "comm-heavy": profile(150, 150, comm=5 * 400),
}


@pytest.mark.parametrize("num_steps", [1, 4])
@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_the_planner_finds_the_simulators_optimum(name: str, num_steps: int) -> None:
    p = SYNTHETIC[name]
    brute = {q: simulate_dbo(p, q, num_steps=num_steps) for q in every_placement()}
    optimum = min(brute.values())
    # also any placement per microbatch: one placement for both loses nothing here
    per_ubatch = min(simulate_dbo(p, [q0, q1], num_steps=num_steps)
                     for q0, q1 in itertools.product(every_placement(), repeat=2))
    assert per_ubatch == optimum
    chosen, chosen_us, times = best_placement(p, num_steps=num_steps)
    assert chosen_us == optimum == brute[chosen]
    assert times == brute
    plan = plan_schedule({p.tokens_per_ubatch: p}, num_steps=num_steps)
    (bucket,) = plan.buckets
    assert bucket.predicted_us == optimum and brute[bucket.placement] == optimum
    assert bucket.fallback_us == brute[SchedulePolicy().placement(p.tokens_per_ubatch)]
    if name == "attention-heavy":  # everything movable belongs after the dispatch
        assert chosen == Placement()
    elif name == "expert-heavy":  # ... before it
        assert chosen == Placement(keys_before=True, values_before=True, shared_before=True)
    elif name == "balanced":  # some pieces each side beats both extremes
        assert optimum < min(brute[Placement()], brute[Placement(True, True, True)])
        assert chosen not in (Placement(), Placement(True, True, True))
    else:
        # comm-bound: a + 4LD (+ the tail): only the first stretch counts, so everything
        # goes after the dispatch, saving exactly the movable time of layer 0.
        assert chosen == Placement()
        movable = 30 + 10 + 10
        assert brute[Placement(True, True, True)] - optimum == movable


def test_ties_keep_the_fallback_placement() -> None:
    # No movable time at all: every placement simulates the same; the plan then keeps
    # what the thresholds would run (e.g. values early at 128-255 tokens).
    p = profile(100, 100, shared=0, keys=0, values=0, tokens=128)
    fallback = SchedulePolicy().placement(128)
    assert fallback == Placement(values_before=True, shared_before=False)
    plan = plan_schedule({128: p})
    assert plan.buckets[0].placement == fallback
    assert plan.buckets[0].gain == 1.0
    assert best_placement(p)[0] == PLACEMENTS[0] == Placement()


def test_plan_from_a_profile_function_and_its_policy() -> None:
    # Stretches that grow with the tokens at different rates: attention-heavy when small,
    # expert-heavy when large; the plan's policy returns each bucket's choice.
    def profile_of(tokens: int) -> StretchProfile:
        return profile(150 + 0.1 * tokens, 60 + 0.5 * tokens, tokens=tokens)

    plan = plan_schedule(profile_of, [512, 32, 128])
    assert [b.tokens_per_ubatch for b in plan.buckets] == [32, 128, 512]
    assert plan.buckets[0].placement == Placement()
    assert plan.buckets[-1].placement == Placement(True, True, True)
    policy = plan.policy()
    for b in plan.buckets:
        assert b.predicted_us == min(simulate_dbo(profile_of(b.tokens_per_ubatch), q)
                                     for q in every_placement())
        assert b.predicted_us <= b.fallback_us
        assert policy.placement(b.tokens_per_ubatch) == b.placement
        assert policy.placement(b.tokens_per_ubatch + 1) == b.placement  # up to the next
    assert policy.placement(31) == SchedulePolicy().placement(31)  # below: the thresholds


def test_modelled_alternatives_do_not_pay() -> None:
    # An extra yield inside the first stretch (two-stage attention) never beats the
    # plain schedule here; a balanced split is within 2% of the best uneven one.
    for p in SYNTHETIC.values():
        plain = simulate_dbo(p, best_placement(p)[0])
        for f in (0.1, 0.25, 0.5, 0.75, 0.9):
            for q in PLACEMENTS:
                assert simulate_dbo(p, q, attention_split=f) >= plain

    def profile_of(tokens: int) -> StretchProfile:
        p = profile(100 + 0.5 * tokens, 80 + 0.4 * tokens, tokens=tokens)
        return p.with_comm(5 + 0.7 * tokens, 5 + 0.7 * tokens)

    times = split_estimates(profile_of, 256, SchedulePolicy(),
                            sizes=[(n, 256 - n) for n in range(64, 193, 8)])
    assert len(times) == 17 and (128, 128) in times
    assert times[(128, 128)] <= 1.02 * min(times.values())


# -- the decoder applies any placement, bitwise the same ----------------------------------

def policy_for(placement: Placement) -> SchedulePolicy:
    return SchedulePolicy(planned={1: placement})


def record_order(model: MoEDecoder, layer: int = 0) -> list[str]:
    """Calls of layer ``layer``'s movable pieces and the first dispatch, in order."""
    calls: list[str] = []
    lay, nxt = model.layers[layer], model.layers[layer + 1]
    real_shared = lay.shared_expert
    lay.shared_expert = lambda h: (calls.append("shared"), real_shared(h))[1]
    for name in ("gather_keys", "gather_values"):
        real = getattr(nxt, name)
        setattr(nxt, name, lambda slots, f=real, n=name: (calls.append(n[7:]), f(slots))[1])
    real_pack = model.backend.dispatch_pack
    model.backend.dispatch_pack = lambda *a: (calls.append("dispatch"), real_pack(*a))[1]
    return calls


def run_all(model: MoEDecoder) -> list[torch.Tensor]:
    """Plain logits, logits under DBO, 3 decode steps of both microbatches under DBO, then
    every layer's KV cache (in this order, on one model)."""
    inputs = decode_inputs(CFG, 10, seed=3)
    out = [model(*inputs), run_dbo(model, inputs, UBatchScheduler(2))]
    chunks = split_inputs(decode_inputs(CFG, 12, seed=4, num_steps=3), 2)
    out.append(torch.cat(UBatchScheduler(2).run([lambda c=c: model.decode(*c, 3)
                                                 for c in chunks])))
    return out + [c for layer in model.layers for c in (layer.k_cache, layer.v_cache)]


@pytest.fixture(scope="module")
def reference_run() -> list[torch.Tensor]:
    return run_all(MoEDecoder(CFG, schedule=policy_for(Placement())))


@pytest.mark.parametrize("placement", PLACEMENTS, ids=str)
def test_every_placement_runs_where_it_says_and_changes_no_bit(
        placement: Placement, reference_run: list[torch.Tensor]) -> None:
    model = MoEDecoder(CFG, schedule=policy_for(placement))
    calls = record_order(model)
    got = run_all(model)
    dispatch = calls.index("dispatch")  # layer 0's; the next one is layer 1's
    after = calls[dispatch + 1:calls.index("dispatch", dispatch + 1)]
    assert sorted(calls[:dispatch]) == sorted(placement.before())
    assert sorted(after) == sorted({"keys", "values", "shared"} - set(placement.before()))
    assert len(got) == len(reference_run)
    for a, b in zip(got, reference_run):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch, expected", [
    (3, "fallback"), (4, "small"), (7, "small"), (8, "large"), (20, "large")])
def test_the_decoder_takes_the_nearest_planned_bucket_at_or_below(batch: int,
                                                                  expected: str) -> None:
    small, large = Placement(keys_before=True), Placement(shared_before=True)
    policy = SchedulePolicy(shared_after_dispatch_min_tokens=10**9,
                            values_gather_early_tokens=(0, 0), planned={8: large, 4: small})
    assert policy.planned == ((4, small), (8, large))
    place = {"fallback": Placement(shared_before=True) if batch < 10**9 else Placement(),
             "small": small, "large": large}[expected]
    assert policy.placement(batch) == place
    model = MoEDecoder(CFG, schedule=SchedulePolicy())
    model.set_schedule(policy)
    assert all(layer.schedule is policy for layer in model.layers)
    calls = record_order(model)
    model(*decode_inputs(CFG, batch, seed=5))
    assert sorted(calls[:calls.index("dispatch")]) == sorted(place.before())


def test_no_schedule_constant_lives_in_the_model_config() -> None:
    names = {f.name for f in dataclasses.fields(MoEConfig)}
    assert not names & {f.name for f in dataclasses.fields(SchedulePolicy)}
    assert not any("placement" in n or "schedule" in n or "before" in n for n in names)


# -- the calibration file -----------------------------------------------------------------

def a_plan(comm: str = "sim-ratio-1") -> SchedulePlan:
    profiles = {t: profile(100 + t / 4, 80 + t / 2, tokens=t) for t in (64, 256)}
    return plan_schedule(profiles, fallback=SchedulePolicy(shared_after_dispatch_min_tokens=64),
                         gpu="Test GPU", comm=comm, model_shape={"hidden": 2048},
                         meta={"source": "test"})


def test_a_plan_round_trips_through_the_calibration_file_beside_cost_profiles(
        tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    cost = CostModel({64: 0.9, 256: 1.2}, gpu="Test GPU", comm="sim-ratio-1")
    cost.save(path)
    plan = a_plan()
    plan.save(path)
    other = a_plan("sim-ratio-2")
    other.save(path)
    CostModel({64: 1.1}, gpu="Test GPU", comm="sim-ratio-2").save(path)  # keeps the plans
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and len(data["profiles"]) == 2
    assert len(data["schedules"]) == 2
    loaded = SchedulePlan.load(path, "sim-ratio-1")
    assert loaded == plan
    assert loaded.buckets[0].profile == plan.buckets[0].profile
    assert loaded.policy() == plan.policy()
    assert loaded.policy().shared_after_dispatch_min_tokens == 64
    assert CostModel.load(path, "sim-ratio-1").points == {64: 0.9, 256: 1.2}
    plan.save(path)  # the same key again: replaced, not added
    assert len(SchedulePlan.load_all(path)) == 2
    # a decoder runs the loaded plan
    model = MoEDecoder(CFG, schedule=loaded.policy())
    assert model.layers[0].schedule.placement(300) == plan.buckets[-1].placement
    with pytest.raises(KeyError, match=re.escape("2 schedule plans in")):
        SchedulePlan.load(path)


def test_files_from_before_plans_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": FORMAT, "profiles": [
        {"gpu": "G", "comm": "c", "points": [{"tokens_per_ubatch": 8, "speedup": 1.5}]}]}))
    assert CostModel.load(path).points == {8: 1.5}
    assert SchedulePlan.load_all(path) == []
    with pytest.raises(KeyError, match=re.escape(
            "holds no schedule plan: write one with `python3 -m bench.profile_layer --plan`")):
        SchedulePlan.load(path)
    a_plan().save(path)
    assert CostModel.load(path).points == {8: 1.5}  # the profile kept
    assert SchedulePlan.load(path).gpu == "Test GPU"



@pytest.mark.parametrize("plan_first", [False, True])
def test_a_calibration_file_keeps_both_sections_whichever_is_saved_first(
        tmp_path: Path, plan_first: bool) -> None:
    path = tmp_path / "calibration.json"
    cost = CostModel({64: 0.9, 256: 1.2}, gpu="Test GPU", comm="sim-ratio-1",
                     model_shape={"hidden": 2048}, meta={"source": "test"})
    plan = a_plan()
    for item in ((plan, cost) if plan_first else (cost, plan)):
        item.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and len(data["profiles"]) == len(data["schedules"]) == 1
    assert CostModel.load(path) == cost
    assert SchedulePlan.load(path) == plan


@pytest.mark.parametrize("saver", ["cost model", "plan"])
@pytest.mark.parametrize("corrupt", ["{not json", "[1, 2]",
                                     json.dumps({"format": "something-else/3"})])
def test_either_save_keeps_an_unreadable_calibration_file_aside(
        tmp_path: Path, saver: str, corrupt: str) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(corrupt)
    if saver == "plan":
        a_plan().save(path)
        assert SchedulePlan.load(path) == a_plan()
        assert CostModel.load_all(path) == []
    else:
        cost = CostModel({64: 1.1}, gpu="Test GPU", comm="sim-ratio-1")
        cost.save(path)
        assert CostModel.load(path) == cost
        assert SchedulePlan.load_all(path) == []
    assert (tmp_path / "calibration.json.bak").read_text() == corrupt

# -- the bench's arithmetic (its GPU part runs on the GPU hosts) --------------------------

def test_profile_from_variants_recovers_every_piece() -> None:
    # Stretches "measured" with each variant of a known profile give it back.
    layers = tuple(LayerStretches(before_us=100 + i, shared_us=20 + i, keys_us=8,
                                  values_us=6, experts_us=150 - i) for i in range(4))
    known = StretchProfile(32, layers, tail_us=33, first_gather_us=14)
    variants = {}
    for name, placement in VARIANTS.items():
        ab = [lay.stretches(placement, has_next=i < 3) for i, lay in enumerate(layers)]
        before = [a + (14 if i == 0 else 0) for i, (a, _) in enumerate(ab)]
        variants[name] = (before, [e for _, e in ab], 33.0)
    assert profile_from_variants(32, variants) == known


def test_marked_replays_are_cut_and_read_into_stretches() -> None:
    def kernel(ts: float, dur: float, name: str = "gemm") -> dict:
        return {"ts": ts, "dur": dur, "name": name}

    def replay(t0: float) -> list[dict]:
        # A 10 | D marks | E 20 | C marks | A 30 | D | E 40 | C | tail 5
        ks, t = [], t0
        for a, e in ((10, 20), (30, 40)):
            ks.append(kernel(t, a))
            t += a
            for stretch in (e, None):
                ks += [kernel(t, 1, "spin_kernel"), kernel(t + 1, 2, "copy"),
                       kernel(t + 3, 1, "spin_kernel")]
                t += 4
                if stretch is not None:
                    ks.append(kernel(t, stretch))
                    t += stretch
        ks.append(kernel(t, 5))
        return ks

    ks = replay(0.0) + replay(10_000.0)
    runs = _split_replays(ks, 1000.0)
    assert len(runs) == 2 and runs[1][0]["ts"] == 10_000.0
    assert _stretches_of(runs[0], 2) == ([10, 30], [20, 40], 5)
    with pytest.raises(RuntimeError, match="has 8 marker kernels, expected 12"):
        _stretches_of(runs[0], 3)


# -- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("make, error, msg", [
    (lambda: LayerStretches(-1, 0, 0, 0, 0), ValueError,
     "LayerStretches.before_us must be a finite time >= 0 us, got -1."),
    (lambda: LayerStretches(1, float("nan"), 0, 0, 0), ValueError,
     "LayerStretches.shared_us must be a finite time >= 0 us, got nan."),
    (lambda: LayerStretches(1, 0, True, 0, 0), TypeError,
     "LayerStretches.keys_us must be a number of microseconds, got True."),
    (lambda: StretchProfile(0, (LayerStretches(1, 0, 0, 0, 0),)), ValueError,
     "StretchProfile.tokens_per_ubatch must be an int >= 1, got 0."),
    (lambda: StretchProfile(4, ()), ValueError,
     "StretchProfile.layers must be a non-empty sequence of LayerStretches"),
    (lambda: simulate_dbo(profile(1, 1), num_steps=0), ValueError,
     "num_steps must be an int >= 1, got 0."),
    (lambda: simulate_dbo(profile(1, 1), attention_split=1.0), ValueError,
     "attention_split must be None or a fraction in (0, 1), got 1.0."),
    (lambda: simulate_dbo([profile(1, 1), profile(1, 1, layers=2)]), ValueError,
     "the microbatches' profiles have different layer counts [6, 2]"),
    (lambda: simulate_dbo(profile(1, 1), [Placement()] * 3, num_ubatches=2), ValueError,
     "got 1 profiles and 3 placements for 2 microbatches"),
    (lambda: simulate_pieces([[Piece("compute", 1)], []]), ValueError,
     "every microbatch must have the same number of pieces"),
    (lambda: Piece("network", 1), ValueError,  # type: ignore[arg-type]
     "Piece.stream must be 'compute' or 'comm', got 'network'."),
    (lambda: plan_schedule(lambda t: profile(1, 1, tokens=t)), ValueError,
     "plan_schedule with a profile function needs tokens="),
    (lambda: plan_schedule({64: profile(1, 1, tokens=32)}), ValueError,
     "the profile given for 64 tokens per microbatch was measured at 32."),
    (lambda: plan_schedule({64: profile(1, 1)}, [128]), KeyError,
     "no stretch profile for 128 tokens per microbatch"),
    (lambda: Placement.from_before(["shared", "attention"]), ValueError,
     "unknown movable piece(s) ['attention']"),
    (lambda: Placement.from_before("shared"), TypeError,
     "from_before takes a list of piece names, got the string 'shared'"),
    (lambda: SchedulePolicy(planned=((4, Placement()), (4, Placement()))), ValueError,
     "planned has two placements for 4 tokens per microbatch"),
    (lambda: SchedulePolicy(planned={0: Placement()}), ValueError,
     "planned takes (tokens_per_ubatch, Placement) pairs with tokens_per_ubatch an int >= 1"),
    (lambda: SchedulePolicy(planned={4: "shared"}), ValueError,
     "planned takes (tokens_per_ubatch, Placement) pairs"),
    (lambda: SchedulePlan(buckets=()), ValueError,
     "a SchedulePlan needs at least one PlannedBucket."),
    (lambda: PlannedBucket(8, Placement(), 1.0, Placement(), 1.0,
                           profile=profile(1, 1, tokens=4)), ValueError,
     "the profile of the 8-token bucket was measured at 4 tokens per microbatch."),
    (lambda: split_estimates(lambda t: profile(1, 1, tokens=t), 8, SchedulePolicy(),
                             sizes=[(3, 4)]), ValueError,
     "split (3, 4) does not cut 8 tokens into parts >= 1."),
])
def test_bad_input_says_what_to_do(make, error, msg) -> None:
    with pytest.raises(error, match=re.escape(msg)):
        make()


def test_a_file_of_another_kind_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "something-else/3"}))
    with pytest.raises(ValueError, match=re.escape(
            "is not a coop-dbo calibration file (format 'something-else/3'")):
        SchedulePlan.load_all(path)
    path.write_text(json.dumps({"format": FORMAT, "schedules": [{"buckets": [
        {"tokens_per_ubatch": 8, "before_dispatch": ["experts"]}]}]}))
    with pytest.raises(ValueError, match=re.escape("unknown movable piece(s) ['experts']")):
        SchedulePlan.load_all(path)
    a_plan().save(path)  # an unreadable file is kept aside, not overwritten
    assert (tmp_path / "x.json.bak").exists()
    assert SchedulePlan.load(path).comm == "sim-ratio-1"


def test_the_planner_imports_without_torch() -> None:
    out = run_without_torch("from coop_dbo.planner import simulate\n"
                            "print(simulate([10.0], [20.0], 5.0, 1000.0))")
    assert out.strip() == "4015.0"
