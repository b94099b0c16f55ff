"""Cache keys: every input of a result changes its key, nothing else does."""

from __future__ import annotations

import hashlib
import math

import pydantic
import pytest

from influence import CG, LiSSA, NystromArguments
from models.checkpoints import canonical_json
from worker.cache import _digest, query_content_id, result_key, s_test_key
from worker.contract import (
    ENGINE_VERSION,
    MAX_SEED,
    DecompositionPayload,
    JobKind,
    Keys,
    SelfInfluencePayload,
    SolverSpec,
    TestSpec,
    check_mislabel_training_set,
)

QUERY = {
    "model": "ab" * 32,
    "train": "cd" * 32,
    "test": {"artifact": "ef" * 32},
    "solver": {"name": "cg", "tol": 1e-6},
}


def test_cache_keys_follow_every_input_and_nothing_else() -> None:
    key = result_key(JobKind.INFLUENCE, QUERY)
    reordered = dict(reversed(list(QUERY.items())))
    assert result_key("influence", reordered) == key
    defaults = {**QUERY, "loss": "cross_entropy", "hessian": "gnh", "damping": 1e-3}
    assert result_key(JobKind.INFLUENCE, defaults) == key  # defaults spelled out: same query
    changes = [
        {"damping": 1e-2},
        {"loss": "mse"},
        {"hessian": "full"},
        {"weight_decay": 1e-4},
        {"solver": {"name": "cg", "tol": 1e-7}},
        {"test": {"dataset": "ef" * 32, "indices": [0]}},
        {"model": "aa" * 32},
        {"train": "bb" * 32},
    ]
    keys = {result_key(JobKind.INFLUENCE, {**QUERY, **change}) for change in changes}
    assert len(keys) == len(changes) and key not in keys
    assert s_test_key(QUERY) not in keys | {key}
    self_key = result_key(JobKind.SELF_INFLUENCE, {k: v for k, v in QUERY.items() if k != "test"})
    assert self_key != key
    with pytest.raises(ValueError, match="no result cache"):
        result_key(JobKind.VERIFY, {"job": "x"})


def test_query_content_id() -> None:
    assert query_content_id(TestSpec(artifact="ef" * 32)) == "ef" * 32
    one = query_content_id(TestSpec(dataset="ef" * 32, indices=[1, 2]))
    assert one != query_content_id(TestSpec(dataset="ef" * 32, indices=[2, 1]))
    with pytest.raises(pydantic.ValidationError, match="exactly one"):
        TestSpec(artifact="ef" * 32, dataset="ef" * 32, indices=[0])


def test_keys_hash_the_canonical_json_and_solver_defaults_are_the_engines() -> None:
    expected = {"kind": "influence", "engine": ENGINE_VERSION, "solver": SolverSpec().model_dump()}
    assert _digest(expected) == hashlib.sha256(canonical_json(expected).encode()).hexdigest()
    spec, lissa, cg = SolverSpec(), LiSSA(), CG()
    assert (spec.depth, spec.repeats, spec.batch_size, spec.scale, spec.seed) == (
        lissa.depth,
        lissa.repeats,
        lissa.batch_size,
        lissa.scale,
        lissa.seed,
    )
    assert (spec.tol, spec.max_iter) == (cg.tol, cg.max_iter)
    assert SolverSpec(name="lissa").build() == lissa
    assert SolverSpec(name="lissa").tol == lissa.tol != cg.tol  # each solver's own default
    assert SolverSpec(name="lissa", tol=1e-4).build() == LiSSA(tol=1e-4)
    assert SolverSpec(name="exact").tol is None
    nystrom = SolverSpec(name="cg", preconditioner="nystrom", rank=50, examples=100)
    assert nystrom.build() == CG(preconditioner=NystromArguments(rank=50, examples=100))
    assert (spec.rank, spec.examples) == (NystromArguments().rank, NystromArguments().examples)
    with pytest.raises(pydantic.ValidationError, match="preconditioner"):
        SolverSpec(name="lissa", preconditioner="nystrom")
    with pytest.raises(pydantic.ValidationError, match="hessian='gnh'"):
        SelfInfluencePayload(model="ab" * 32, train="cd" * 32, hessian="full", solver=nystrom)


@pytest.mark.parametrize(
    ("solver", "field"),
    [
        ({"name": "cg", "depth": 77}, "depth"),
        ({"name": "cg", "seed": 3}, "seed"),
        ({"name": "cg", "rank": 5}, "rank"),  # without preconditioner='nystrom'
        ({"name": "lissa", "max_iter": 3}, "max_iter"),
        ({"name": "lissa", "examples": 10}, "examples"),
        ({"name": "exact", "tol": 1e-3}, "tol"),
        ({"name": "exact", "batch_size": 8}, "batch_size"),
    ],
)
def test_a_solver_field_that_does_not_apply_is_refused(solver: dict, field: str) -> None:
    """Such a field would change nothing but the cache key (one computation, two keys)."""
    with pytest.raises(pydantic.ValidationError, match=r"applies only to solver\.name") as error:
        SolverSpec(**solver)
    assert [e["loc"] for e in error.value.errors()] == [(field,)]


def test_equivalent_solver_settings_have_one_cache_key() -> None:
    for name in ("cg", "lissa", "exact"):
        spec = SolverSpec(name=name)
        assert SolverSpec.model_validate(spec.model_dump()) == spec  # stored payloads load
    for implicit, explicit in (
        ({"name": "cg"}, {"name": "cg", "tol": CG().tol, "max_iter": CG().max_iter}),
        ({"name": "lissa"}, {"name": "lissa", "tol": LiSSA().tol, "depth": LiSSA().depth}),
    ):
        keys = {result_key(JobKind.INFLUENCE, {**QUERY, "solver": s}) for s in (implicit, explicit)}
        assert len(keys) == 1


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(
    "change",
    [
        lambda v: {"damping": v},
        lambda v: {"weight_decay": v},
        lambda v: {"solver": {"name": "lissa", "scale": v}},
        lambda v: {"solver": {"name": "cg", "tol": v}},
    ],
    ids=["damping", "weight_decay", "scale", "tol"],
)
def test_non_finite_numbers_are_refused_before_any_key_is_hashed(change, value: float) -> None:
    """canonical_json refuses NaN and ±inf (allow_nan=False): the contract refuses them
    first, as a validation error naming the field, so no key computation can crash."""
    with pytest.raises(pydantic.ValidationError, match="finite number"):
        result_key(JobKind.INFLUENCE, {**QUERY, **change(value)})


def test_solver_seed_and_scale_are_bounded() -> None:
    assert SolverSpec(name="lissa", seed=MAX_SEED).seed == 2**63 - 1
    for bad in ({"seed": MAX_SEED + 1}, {"seed": -1}, {"scale": 1e13}, {"scale": 0.0}):
        with pytest.raises(pydantic.ValidationError, match=next(iter(bad))):
            SolverSpec(name="lissa", **bad)


def test_free_form_decomposition_settings_must_be_finite() -> None:
    base = {"model": "ab" * 32, "train": "cd" * 32, "recipe": {"lr": 0.1}}
    DecompositionPayload(**base)
    nested = {**base, "correlation": {"methods": ["warm"], "extra": [1.0, {"x": math.nan}]}}
    with pytest.raises(pydantic.ValidationError, match=r"correlation\.extra\[1\]\.x must be"):
        DecompositionPayload(**nested, test={"dataset": "ef" * 32, "indices": [0]})
    with pytest.raises(pydantic.ValidationError, match=r"recipe\.lr must be a finite"):
        DecompositionPayload(**{**base, "recipe": {"lr": math.inf}})


def test_mislabel_detection_needs_a_classification_set() -> None:
    check_mislabel_training_set({"task": "classification", "num_classes": 10}, "d1")
    for metadata in ({"task": "regression"}, {"task": "classification"}, {}):
        with pytest.raises(ValueError, match=r"mislabel detection .* dataset d2 is"):
            check_mislabel_training_set(metadata, "d2")


def test_in_flight_links_are_per_tenant_and_query() -> None:
    keys = Keys("p:")
    assert keys.in_flight("alice", "k1") == "p:tenant:alice:inflight:k1"
    assert len({keys.in_flight(t, k) for t in ("a", "b") for k in ("k1", "k2")}) == 4
    assert keys.in_flight("alice", "k1") != keys.result_cache("alice", "k1")


def test_the_same_indices_of_different_test_sets_are_different_queries() -> None:
    """The content id of (dataset, indices) includes the dataset: row 0 of one test set is
    not row 0 of another, so neither the result cache nor the s_test cache may share them."""
    a, b = "ef" * 32, "ee" * 32
    assert query_content_id(TestSpec(dataset=a, indices=[0])) != query_content_id(
        TestSpec(dataset=b, indices=[0])
    )
    query_a = {**QUERY, "test": {"dataset": a, "indices": [0]}}
    query_b = {**QUERY, "test": {"dataset": b, "indices": [0]}}
    assert result_key(JobKind.INFLUENCE, query_a) != result_key(JobKind.INFLUENCE, query_b)
    assert s_test_key(query_a) != s_test_key(query_b)
