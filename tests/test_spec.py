"""Run spec files (training_infra/spec.py): one line per mistake, all at once; the schema is the model's."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import BaseModel

from training_infra import spec as run_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "specs"


def _mistakes(text: str) -> list[str]:
    with pytest.raises(run_spec.SpecError) as caught:
        run_spec.parse(text, source="run.yaml")
    return caught.value.lines


@pytest.mark.parametrize("name", ["single-node.yaml", "multi-node.yaml"])
def test_the_example_specs_are_valid_for_the_model_and_the_schema(name):
    path = EXAMPLES / name
    loaded = run_spec.load(path)
    assert loaded.resources.instance_types, "the examples name their instance types"
    jsonschema.validate(run_spec.read_yaml(path.read_text())[0], run_spec.json_schema())


def test_the_multi_node_example_asks_for_several_nodes_and_the_single_node_one_for_one():
    assert run_spec.load(EXAMPLES / "multi-node.yaml").resources.nodes == 4
    assert run_spec.load(EXAMPLES / "single-node.yaml").resources.nodes == 1


def test_a_file_reads_into_typed_values_env_numbers_as_their_text():
    loaded = run_spec.parse(
        "resources: {instance_types: g5.xlarge, market: spot}\nenv: {EPOCHS: 3, LR: 0.001, DEBUG: true}\n"
        "limits: {max_runtime_hours: 2, stall_minutes: 7, max_restarts_on_errors: 1}\n"
    )
    assert loaded.resources.instance_types == ["g5.xlarge"], "one type is a list of one"
    assert loaded.env == {"EPOCHS": "3", "LR": "0.001", "DEBUG": "true"}
    assert (loaded.limits.max_runtime_hours, loaded.limits.stall_minutes) == (2, 7)
    assert loaded.limits.max_restarts_on_errors == 1


def test_an_unknown_key_names_its_path_and_line_and_suggests_the_close_one():
    [line] = _mistakes("resources:\n  instance_types: [g5.xlarge]\nlimits:\n  max_runtim_hours: 3\n")
    assert line.startswith("run.yaml:4: limits.max_runtim_hours: got unknown key 'max_runtim_hours'")
    assert "did you mean 'max_runtime_hours'?" in line
    assert "allowed: max_runtime_hours, max_cost_usd, stall_minutes, max_restarts_on_errors" in line


def test_an_unknown_top_level_key_with_nothing_close_lists_the_keys_allowed():
    [line] = _mistakes("gpus: 8\n")
    assert line.startswith("run.yaml:1: gpus: got unknown key 'gpus'; allowed: run_id, group, resources")
    assert "did you mean" not in line


def test_a_value_of_the_wrong_type_says_what_it_got_and_what_is_allowed():
    [line] = _mistakes("resources:\n  nodes: two\n")
    assert line == "run.yaml:2: resources.nodes: got 'two'; allowed: a whole number"


def test_a_section_given_as_a_value_says_which_keys_it_takes():
    [line] = _mistakes("limits: 12\n")
    assert line.startswith("run.yaml:1: limits: got 12; allowed: a map of max_runtime_hours, max_cost_usd")


def test_a_value_out_of_range_gets_the_deploy_settings_own_allowed_text():
    [line] = _mistakes("limits:\n  max_runtime_hours: 200\n")
    assert line == "run.yaml:2: limits.max_runtime_hours: got 200; allowed: a number greater than 0 up to 168"


def test_an_instance_type_outside_the_known_families_is_refused_by_the_settings_rule():
    [line] = _mistakes("resources:\n  instance_types: [g5.xlarge, x9.huge]\n")
    assert line.startswith("run.yaml:2: resources.instance_types: got ['g5.xlarge', 'x9.huge']; allowed: ")
    assert "an EC2 instance type such as g5.xlarge" in line


def test_a_secret_given_as_a_value_is_refused_without_echoing_the_value():
    [line] = _mistakes("secrets:\n  WANDB_API_KEY: 0123456789abcdef-very-secret\n")
    assert "very-secret" not in line
    assert line.startswith("run.yaml:2: secrets.WANDB_API_KEY: got a value that is not a reference (28 characters")
    assert "allowed: ssm:/training-infra/PATH (an SSM SecureString) or arn:aws:secretsmanager:" in line


def test_a_mistyped_secret_reference_is_shown_since_it_is_no_secret():
    [line] = _mistakes("secrets:\n  HF_TOKEN: ssm:/other/hf\n")
    assert line.startswith("run.yaml:2: secrets.HF_TOKEN: got 'ssm:/other/hf'; allowed: ssm:/training-infra/PATH")


def test_a_secret_that_shadows_the_agents_variables_is_refused_by_name():
    [line] = _mistakes("secrets:\n  AWS_SECRET_ACCESS_KEY: ssm:/training-infra/aws\n")
    assert line.startswith("run.yaml:2: secrets.AWS_SECRET_ACCESS_KEY: got 'AWS_SECRET_ACCESS_KEY'; allowed: ")
    assert "AWS_* or TI_*" in line


def test_a_name_in_both_env_and_secrets_is_refused():
    [line] = _mistakes("env: {TOKEN: x}\nsecrets: {TOKEN: 'ssm:/training-infra/t'}\n")
    assert line.startswith("run.yaml:2: secrets: got ") and "names not also in env (TOKEN in both)" in line


def test_every_mistake_in_a_file_is_reported_at_once_one_line_each():
    lines = _mistakes(
        "resources:\n  instance_types: [g5.xlarge]\n  markt: spot\n  nodes: 0\n"
        "image: 'bad tag'\nenv:\n  1BAD: x\nlimits:\n  max_cost_usd: -5\n  max_restarts_on_errors: 101\n"
    )
    assert [line.split(":")[1] for line in lines] == ["3", "4", "5", "7", "9", "10"], lines
    assert [line.split(": ")[1] for line in lines] == [
        "resources.markt", "resources.nodes", "image", "env.1BAD", "limits.max_cost_usd",
        "limits.max_restarts_on_errors",
    ]  # fmt: skip
    assert "did you mean 'market'?" in lines[0]
    assert lines[1].endswith("got 0; allowed: greater than or equal to 1")
    assert lines[4].endswith("got -5; allowed: US dollars from 0.01 up to 1000000, e.g. 25")
    assert lines[5].endswith("got 101; allowed: a whole number from 0 to 100")


def test_a_yaml_syntax_error_is_one_line_with_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("resources:\n  instance_types: [g5.xlarge\nimage: v2\n")
    with pytest.raises(run_spec.SpecError) as caught:
        run_spec.load(path)
    [line] = caught.value.lines
    assert line.startswith(f"{path}:3: not valid YAML: ")
    assert "\n" not in line


def test_a_file_that_is_not_a_map_is_one_line():
    assert _mistakes("- g5.xlarge\n") == [
        "run.yaml:1: got ['g5.xlarge']; allowed: a map of keys (`training-infra schema`)"
    ]


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(run_spec.SpecError) as caught:
        run_spec.load(tmp_path / "absent.yaml")
    [line] = caught.value.lines
    assert line == f"{tmp_path / 'absent.yaml'}: cannot read it (No such file or directory)"


def test_a_binary_file_is_one_line_not_a_traceback(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(run_spec.SpecError) as caught:
        run_spec.load(path)
    assert caught.value.lines == [f"{path}: cannot read it (not UTF-8 text); allowed: a YAML file"]


def test_the_schema_is_valid_json_schema_and_has_the_models_keys_at_every_level():
    schema = run_spec.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)

    def keys(model: type[BaseModel], at: dict) -> None:
        assert set(at["properties"]) == set(model.model_fields), model.__name__
        assert at.get("additionalProperties") is False, f"{model.__name__}: unknown keys are refused"
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                ref = at["properties"][name]["$ref"].rsplit("/", 1)[-1]
                keys(field.annotation, schema["$defs"][ref])

    keys(run_spec.LaunchSpec, schema)


@pytest.mark.parametrize(
    "text",
    [
        "limits: {max_runtime_hours: 200}",
        "limits: {stall_minutes: -1}",
        "resources: {market: cheap}",
        "resources: {nodes: 0}",
        "resources: {max_price: 0}",
        "secrets: {KEY: plain-value}",
        "env: {1BAD: x}",
        "run_id: Bad_Name",
        "colour: blue",
    ],
)
def test_the_schema_refuses_what_the_model_refuses(text):
    data = run_spec.read_yaml(text)[0]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, run_spec.json_schema())
    with pytest.raises(run_spec.SpecError):
        run_spec.validate(data)


def test_the_schema_file_beside_the_examples_is_the_models_schema():
    """The examples' `# yaml-language-server: $schema=` line points at it; `training-infra schema` rewrites it."""
    assert json.loads((EXAMPLES / "run-spec.schema.json").read_text()) == run_spec.json_schema()


def test_layers_resolve_weakest_first_and_say_where_each_value_came_from():
    resolved, sources = run_spec.resolve(
        [
            ("stack default", {"image": "latest", "limits": {"max_runtime_hours": 12, "stall_minutes": 20}}),
            ("run.yaml", {"image": "v2", "env": {"A": "1"}, "limits": {"max_runtime_hours": 6}}),
            ("flag", {"limits": {"max_runtime_hours": 3}, "env": {"B": "2"}}),
        ]
    )
    assert resolved.image == "v2" and resolved.limits.max_runtime_hours == 3 and resolved.limits.stall_minutes == 20
    assert resolved.env == {"A": "1", "B": "2"}
    assert sources == {
        "image": "run.yaml",
        "env.A": "run.yaml",
        "env.B": "flag",
        "limits.max_runtime_hours": "flag",
        "limits.stall_minutes": "stack default",
    }


def test_a_spec_written_as_yaml_reads_back_the_same():
    loaded = run_spec.load(EXAMPLES / "multi-node.yaml")
    assert run_spec.parse(loaded.to_yaml()) == loaded


def test_dry_run_names_the_nodes_flag_as_the_source_of_resources_nodes():
    from training_infra.cli import spec_cli

    assert spec_cli._named("resources.nodes", spec_cli.FLAG) == "flag --nodes"
    assert spec_cli._named("resources.market", spec_cli.FLAG) == "flag --market"
