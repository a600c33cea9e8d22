"""Static checks: imports, Triton models and tensors, column flow. No Ray, no server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tierflow.checks import check_manifest, parse_type
from tierflow.errors import ManifestError
from tierflow.manifest import load_manifest
from tierflow.plan import make_plan
from tierflow.triton.repository import model_digest

from example_copy import ROOT, make_example



@pytest.fixture()
def example_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    import sys

    sys.modules.pop("review_stages", None)  # each test imports its own copy
    yield make_example(tmp_path / "ex")
    sys.modules.pop("review_stages", None)


def edit(d: Path, change) -> Path:  # type: ignore[no-untyped-def]
    doc = yaml.safe_load((d / "reviews.yaml").read_text())
    change(doc)
    p = d / "edited.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ManifestError) as info:
        check_manifest(load_manifest(path), str(path))
    assert str(path) in str(info.value)
    return info.value.problems


def test_example_is_valid(example_dir: Path) -> None:
    check_manifest(load_manifest(example_dir / "reviews.yaml"), "reviews.yaml")


def test_unimportable_callable(example_dir: Path) -> None:
    p = edit(example_dir, lambda d: d["stages"][0].update(fn="review_stages:no_such_fn"))
    assert problems(p) == [("stages[0].fn", "cannot import 'review_stages:no_such_fn': AttributeError: "
                             "module 'review_stages' has no attribute 'no_such_fn'")]


def test_missing_module_and_non_class(example_dir: Path) -> None:
    def change(d: dict) -> None:  # type: ignore[type-arg]
        d["stages"][0]["fn"] = "absent_module:f"
        d["stages"][4]["cls"] = "review_stages:clean"
    probs = dict(problems(edit(example_dir, change)))
    assert "ModuleNotFoundError" in probs["stages[0].fn"]
    assert probs["stages[4].cls"] == "'review_stages:clean' is not a class"


def test_model_absent_from_repository(example_dir: Path) -> None:
    p = edit(example_dir, lambda d: d["stages"][3].update(model="resnet"))
    [(loc, reason)] = problems(p)
    assert loc == "stages[3].model" and "resnet" in reason


def test_tensor_names_checked_against_model_config(example_dir: Path) -> None:
    def change(d: dict) -> None:  # type: ignore[type-arg]
        d["stages"][3]["inputs"] = {"features": "FEATS"}
        d["stages"][3]["outputs"] = {"PROBS": "probs", "LOGITS": "logits"}
    probs = dict(problems(edit(example_dir, change)))
    assert "no input 'FEATS'" in probs["stages[3].inputs.features"]
    assert "FEATURES" in probs["stages[3].inputs"]
    assert "no output 'LOGITS'" in probs["stages[3].outputs.LOGITS"]


def test_column_dtype_must_fit_tensor(example_dir: Path) -> None:
    p = edit(example_dir, lambda d: d["stages"][1].update(produces={"features": "float64[16]"}))
    [(loc, reason)] = problems(p)
    assert loc == "stages[3].inputs.features" and "FP32 [16]" in reason


def test_column_nobody_produces(example_dir: Path) -> None:
    p = edit(example_dir, lambda d: d["stages"][2].update(inputs={"body": "TEXT"}))
    assert ("stages[2].inputs.body", "column 'body' is produced by no earlier stage") in problems(p)
    p = edit(example_dir, lambda d: d["stages"][1].update(requires=["stars"]))
    assert ("stages[1].requires", "column 'stars' is produced by no earlier stage") in problems(p)


def test_triton_stage_needs_a_server(example_dir: Path) -> None:
    p = edit(example_dir, lambda d: d.update(triton={}))
    assert ("triton", "the pipeline has Triton stages: set triton.url, triton.launch: true or triton.deploy") in problems(p)


def test_missing_source(example_dir: Path) -> None:
    p = edit(example_dir, lambda d: d["source"].update(path="nowhere/"))
    [(loc, reason)] = problems(p)
    assert loc == "source.path" and "nowhere" in reason


def test_parse_type() -> None:
    import pyarrow as pa

    assert parse_type("int64") == pa.int64()
    assert parse_type("float32[4]") == pa.list_(pa.float32(), 4)
    with pytest.raises((ValueError, KeyError)):
        parse_type("complex128")


def test_fingerprints_change_from_the_edited_stage_on(example_dir: Path) -> None:
    repo = ROOT / "triton_models"
    digest = lambda m: model_digest(repo, m)  # noqa: E731
    base = make_plan(load_manifest(example_dir / "reviews.yaml"), digest)
    changed = make_plan(load_manifest(edit(example_dir, lambda d: d["stages"][3].update(
        outputs={"PROBS": "probs", "LABEL": "label", }, model_version="1"))), digest)
    same = [a.fingerprint == b.fingerprint for a, b in zip(base.stages, changed.stages)]
    assert same == [True, True, True, False, False, False]
    # execution knobs do not change what a stage outputs, so they keep the keys
    tuned = make_plan(load_manifest(edit(example_dir, lambda d: (d["stages"][0].update(concurrency=7),
                                                                  d["stages"][3].update(standby=1)))), digest)
    assert [s.fingerprint for s in tuned.stages] == [s.fingerprint for s in base.stages]
    assert base.key(2, 7) == f"reviews/{base.stages[2].fingerprint[:16]}/embed/000007"


def test_editing_stage_code_changes_its_fingerprint(example_dir: Path) -> None:
    repo = ROOT / "triton_models"
    digest = lambda m: model_digest(repo, m)  # noqa: E731
    before = make_plan(load_manifest(example_dir / "reviews.yaml"), digest)
    with open(example_dir / "review_stages.py", "a") as fh:
        fh.write("\n# an edit\n")
    sys.modules.pop("review_stages", None)
    after = make_plan(load_manifest(example_dir / "reviews.yaml"), digest)
    assert all(a.fingerprint != b.fingerprint for a, b in zip(before.stages, after.stages))


def test_clear_text_credentials_are_rejected(example_dir: Path) -> None:
    p = edit(example_dir, lambda d: d["sink"].update(storage_options={"secret": "hunter2"}))
    [(loc, reason)] = problems(p)
    assert loc == "sink.storage_options" and "${VAR}" in reason and "hunter2" not in reason
    ok = edit(example_dir, lambda d: d["sink"].update(storage_options={"secret": "${S3_SECRET}"}))
    check_manifest(load_manifest(ok), str(ok))
