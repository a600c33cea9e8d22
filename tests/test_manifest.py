"""Manifest parsing: every bad input is rejected with the file, the field path and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierflow.errors import ManifestError
from tierflow.manifest import PythonStage, TritonStage, load_manifest, parse_manifest

GOOD = """
name: demo
source: {format: parquet, path: data/, block_rows: 100}
stages:
  - {name: a, kind: python, fn: "mod:f"}
  - {name: b, kind: triton, model: m, inputs: {x: X}, outputs: {Y: y}}
sink: {path: out/}
triton: {url: "localhost:8001"}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(text)
    return p


def problems(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, text))
    assert info.value.path.endswith("m.yaml")
    assert str(info.value).startswith(str(tmp_path / "m.yaml"))
    return info.value.problems


def test_good_manifest_parses_into_typed_models(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, GOOD))
    assert isinstance(m.stages[0], PythonStage) and isinstance(m.stages[1], TritonStage)
    assert m.stages[1].batch_size == 64
    assert m.resolve(m.source.path) == str(tmp_path / "data")
    assert m.resolve("s3://bucket/x") == "s3://bucket/x"
    assert m.ray.address is None and m.cache.replicas == 1


@pytest.mark.parametrize(
    ("edit", "loc", "reason"),
    [
        (("block_rows: 100", "block_rows: 0"), "source.block_rows", "greater than 0"),
        (("block_rows: 100", "block_rows: 10, colour: red"), "source.colour", "unknown field"),
        (('kind: python, fn: "mod:f"', "kind: gpu"), "stages[0]", "'gpu'"),
        (('fn: "mod:f"', 'fn: "mod:f", cls: "mod:C"'), "stages[0]", "exactly one of 'fn'"),
        (('fn: "mod:f"', 'fn: "not a callable"'), "stages[0].fn", "should match pattern"),
        (("outputs: {Y: y}", "outputs: {Y: y}, batch_size: -3"), "stages[1].batch_size", "greater than 0"),
        (("name: b,", "name: a,"), "", "stage name 'a' is used twice"),
        (('url: "localhost:8001"', 'url: "h:1", launch: true'), "triton", "not both"),
        (("sink: {path: out/}", "sink: {path: out/, mode: append}"), "sink.mode", "'error' or 'overwrite'"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, edit: tuple[str, str], loc: str, reason: str) -> None:
    probs = problems(tmp_path, GOOD.replace(*edit))
    assert any(l == loc and reason in r for l, r in probs), probs


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    probs = problems(tmp_path, "name: x\nsource: [a\n  b: c\n")
    assert probs[0][0].startswith("line 3, column")
    assert "invalid YAML" in probs[0][1]


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "absent.yaml")
    assert problems(tmp_path, "- a\n- b\n")[0][1] == "the manifest must be a YAML mapping"


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("block_rows: 100", "block_rows: -1").replace("kind: triton", "kind: tpu")
    assert len(problems(tmp_path, text)) == 2


def test_base_dir_cannot_be_set_from_yaml(tmp_path: Path) -> None:
    assert problems(tmp_path, GOOD + "base_dir: /etc\n") == [("base_dir", "unknown field")]


def test_a_credential_in_clear_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    text = GOOD.replace("block_rows: 100}", "block_rows: 100, storage_options: {secret: hunter2, region: eu}}")
    text += "cache: {remote_url: 's3://b/tf', storage_options: {key: '${AWS_ACCESS_KEY_ID}', token: abc123}}\n"
    probs = problems(tmp_path, text)
    assert [loc for loc, _ in probs] == ["source.storage_options", "cache.storage_options"]
    assert "['secret'] looks like a credential" in probs[0][1] and "'token'" in probs[1][1]
    assert "hunter2" not in str(probs) and "abc123" not in str(probs)
    ok = load_manifest(write(tmp_path, text.replace("hunter2", "'${S3_SECRET}'").replace("abc123", "'${S3_TOKEN}'")))
    assert ok.source.storage_options["secret"] == "${S3_SECRET}"  # resolved at run time, in the workers


def test_standby_needs_an_actor_stage(tmp_path: Path) -> None:
    probs = problems(tmp_path, GOOD.replace('fn: "mod:f"}', 'fn: "mod:f", standby: 1}'))
    assert probs == [("stages[0]", "standby keeps spare actors: it needs 'cls' ('fn' stages run as tasks)")]
    m = load_manifest(write(tmp_path, GOOD.replace("outputs: {Y: y}}", "outputs: {Y: y}, standby: 2}")))
    assert m.stages[1].standby == 2


def test_concurrency_accepts_a_range() -> None:
    base = {"name": "p", "source": {"format": "csv", "path": "x"}, "sink": {"path": "o"}}
    m = parse_manifest({**base, "stages": [{"name": "a", "kind": "python", "cls": "m:C", "concurrency": [1, 4]}]})
    assert m.stages[0].concurrency_range == (1, 4)
    with pytest.raises(ManifestError, match="concurrency"):
        parse_manifest({**base, "stages": [{"name": "a", "kind": "python", "fn": "m:f", "concurrency": [3, 2]}]})


def test_python_stages_take_gpus_fractions_and_custom_resources(tmp_path: Path) -> None:
    text = GOOD.replace('fn: "mod:f"}', 'cls: "mod:Embed", num_gpus: 0.5, num_cpus: 2, resources: {a100: 1}}')
    stage = load_manifest(write(tmp_path, text)).stages[0]
    assert isinstance(stage, PythonStage) and stage.num_gpus == 0.5
    assert stage.demand == {"CPU": 2.0, "GPU": 0.5, "a100": 1.0}
    assert load_manifest(write(tmp_path, GOOD)).stages[0].demand == {"CPU": 1.0}  # no GPU unless asked
    assert load_manifest(write(tmp_path, GOOD.replace("model: m,", "model: m, num_cpus: 0,"))).stages[1].demand == {}


@pytest.mark.parametrize(
    ("fields", "loc", "reason"),
    [
        ("num_gpus: -0.5", "stages[0].num_gpus", "greater than or equal to 0"),
        ("num_gpus: lots", "stages[0].num_gpus", "valid number"),
        ("resources: {GPU: 1}", "stages[0].resources", "give GPUs and CPUs as num_gpus / num_cpus"),
        ("resources: {a100: 0}", "stages[0].resources.a100", "greater than 0"),
    ],
)
def test_bad_gpu_settings_are_named(tmp_path: Path, fields: str, loc: str, reason: str) -> None:
    probs = problems(tmp_path, GOOD.replace('fn: "mod:f"}', f'fn: "mod:f", {fields}}}'))
    assert any(l == loc and reason in r for l, r in probs), probs


def test_a_triton_stage_takes_no_gpus_its_servers_do(tmp_path: Path) -> None:
    # The client actors only send requests; the GPUs are the Triton servers' (triton.deploy.num_gpus).
    probs = problems(tmp_path, GOOD.replace("outputs: {Y: y}}", "outputs: {Y: y}, num_gpus: 1}"))
    assert probs == [("stages[1].num_gpus", "unknown field")]


def test_a_fused_stage_runs_on_the_next_stages_gpus(tmp_path: Path) -> None:
    text = GOOD.replace('fn: "mod:f"}', 'fn: "mod:f", fuse: true, num_gpus: 1}')
    probs = problems(tmp_path, text)
    assert len(probs) == 1 and "which decides num_gpus; set them there" in probs[0][1]
