"""A run described in a file: `training-infra launch -f run.yaml` (docs/cli.md, "Run specs").

Every `launch` option is a key of `LaunchSpec`. The values are checked by the same rules as the flags
(the deploy settings' parsers in `config`, the launch-only rules in `launch_rules`), so a file and the
equivalent flags give the same run; the JSON Schema (`training-infra schema`) comes from this model too.

A bad file gets one line per mistake, all of them at once: where (file:line and the key path), the value
received, what is allowed, and "did you mean" for an unknown key. A secret is a reference only (an SSM
SecureString or a Secrets Manager ARN): a literal value given there is refused without being echoed.

pydantic and PyYAML only (PyYAML imported when a file is read): no typer or rich, so the supervisor and
the sweep code can import it without the CLI.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from training_infra import config, launch_rules
from training_infra.compute.agent.ti_agent import torchrun
from training_infra.config import Refused

SCHEMA_ID = "https://github.com/training-infra/training-infra/run-spec.schema.json"
MAX_NODES = 64  # the multi-node (gang) launch decides what it takes; the file allows up to this


def _rule(check: Callable[[Any], Any], schema: dict[str, Any], description: str) -> Any:
    """A value checked by a shared rule (which raises Refused(allowed)); its JSON Schema for editors."""

    def validate(value: Any) -> Any:
        try:
            return check(value)
        except Refused as refused:
            raise PydanticCustomError("not_allowed", "{allowed}", {"allowed": refused.allowed}) from None

    return Annotated[Any, BeforeValidator(validate), WithJsonSchema({**schema, "description": description})]


def _setting(name: str, schema: dict[str, Any], description: str) -> Any:
    """A value checked by a deploy setting's own parser (config.Settings), as `launch`'s flag is."""
    return _rule(config.setting(name).check, schema, description)


def _instance_types(value: Any) -> list[str]:
    types = config.setting("instance_types").check(value)
    if not types:
        raise Refused("one or more instance types, e.g. [g5.xlarge, g6.xlarge]")
    return list(types)


def _subnet_id(value: Any) -> str:
    if not isinstance(value, str) or config.setting("subnet_ids").check(value) != (value,):
        raise Refused("a subnet id such as subnet-0123456789abcdef0")
    return value


_INSTANCE_TYPE_PATTERN = config.InstanceType.shape.pattern.pattern
_NAME_PATTERN = config.setting("run_id").parser.pattern.pattern  # type: ignore[attr-defined]

InstanceTypes = _rule(
    _instance_types,
    {
        "anyOf": [
            {"type": "array", "items": {"type": "string", "pattern": f"^{_INSTANCE_TYPE_PATTERN}$"}, "minItems": 1},
            {"type": "string"},
        ]
    },
    "EC2 types each attempt may take, e.g. [g5.xlarge, g6.xlarge]: the cheapest with capacity in any zone "
    "(--instance-types). Default: the stack's instance_types.",
)
Market = _rule(
    launch_rules.market,
    {"enum": list(launch_rules.MARKETS)},
    "spot, on-demand, or spot-then-on-demand (--market). Default: the stack's use_spot.",
)
MaxPrice = _rule(
    launch_rules.max_price,
    {"type": "number", "exclusiveMinimum": 0, "maximum": launch_rules.MAX_PRICE_LIMIT},
    "Never pay more than this many USD per hour, spot or on-demand (--max-price).",
)


def _capacity_reservation(value: Any) -> str:
    from training_infra.supervisor.runtime import blocks

    try:
        return blocks.reservation_id(value)
    except blocks.BlockRefused:
        raise Refused(blocks.ALLOWED) from None


CapacityReservation = _rule(
    _capacity_reservation,
    {"type": "string", "pattern": "^cr-[0-9a-f]{8}(?:[0-9a-f]{9})?$"},
    "A Capacity Block you bought (--capacity-reservation): the run launches into it (market capacity-block, "
    "prepaid), on its type and in its zone, its deadline clipped to the block's end. Not with market or max_price.",
)
SubnetId = _rule(
    _subnet_id,
    {"type": "string", "pattern": "^subnet-[0-9a-f]{8}(?:[0-9a-f]{9})?$"},
    "Only this subnet (--subnet-id). Default: every subnet the compute stack publishes.",
)
RunName = _setting(
    "run_id",
    {"type": "string", "pattern": f"^{_NAME_PATTERN}$"},
    "Name of the run, lowercase letters, digits and '-', at most 63 (--run-id). Default: the UTC time and 4 "
    "random hex digits.",
)
GroupName = _setting(
    "run_id",
    {"type": "string", "pattern": f"^{_NAME_PATTERN}$"},
    "The group (a sweep) this run belongs to: lowercase letters, digits and '-', at most 63.",
)
ImageTag = _setting(
    "image_tag",
    {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"},
    "Training image tag in the stack's ECR repository (--image-tag). Default: the stack's image_tag.",
)
DataAccess = _setting(
    "data_access",
    {"enum": ["sync", "mount"]},
    "How the run sees data/ at /data (--data-access): sync copies it to the volume first; mount serves it "
    "read-only through Mountpoint for Amazon S3 (the AMI must provide mount-s3). Default: the stack's data_access.",
)
Command = _setting(
    "training_command",
    {"type": "string"},
    "Training command run in the container (--command). Default: the stack's, else the image's CMD.",
)
MaxRuntimeHours = _setting(
    "max_runtime_hours",
    {"type": "number", "exclusiveMinimum": 0, "maximum": 168},
    "One deadline for the whole run, counted from launch across every attempt (--max-runtime-hours). "
    "Default: the stack's.",
)
MaxCostUsd = _rule(
    launch_rules.max_cost_usd,
    {"type": "number", "exclusiveMinimum": 0, "maximum": launch_rules.MAX_COST_LIMIT},
    "Most the run may cost across every attempt, in USD; stopped gracefully before it (--max-cost-usd).",
)
StallMinutes = _setting(
    "stall_minutes",
    {"type": "integer", "minimum": 0, "maximum": 1440},
    "No progress in HEARTBEAT_FILE for this long ends the attempt as stalled; 0 turns it off (--stall-minutes). "
    "Default: the stack's.",
)
Restarts = _rule(
    launch_rules.restarts,
    {"type": "integer", "minimum": 0, "maximum": launch_rules.MAX_RESTARTS},
    "Relaunch after a trainer failure or stall at most this many times (--max-restarts-on-errors). Spot "
    "reclaims never count. Default 0.",
)
EnvKey = _rule(launch_rules.env_key, {"type": "string", "pattern": launch_rules.ENV_KEY.pattern}, "A variable name.")
EnvValue = _rule(
    launch_rules.env_value,
    {"type": ["string", "number", "boolean"]},
    "A one-line value; numbers and true/false are passed as their text.",
)
SecretName = _rule(
    launch_rules.secret_name,
    {"type": "string", "pattern": launch_rules.ENV_KEY.pattern},
    "The variable the trainer reads the secret from.",
)
SecretRef = _rule(
    launch_rules.secret_ref,
    {"type": "string", "pattern": launch_rules.SECRET_REF.pattern},
    "Where the secret is kept: ssm:/training-infra/PATH (SecureString) or a Secrets Manager ARN. Never the value.",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Section):
    """What each attempt runs on."""

    instance_types: InstanceTypes | None = None  # type: ignore[valid-type]
    nodes: StrictInt = Field(
        1, ge=1, le=MAX_NODES, description="Instances that train together (multi-node). Default 1."
    )
    market: Market | None = None  # type: ignore[valid-type]
    max_price: MaxPrice | None = None  # type: ignore[valid-type]
    subnet_id: SubnetId | None = None  # type: ignore[valid-type]
    capacity_reservation: CapacityReservation | None = None  # type: ignore[valid-type]
    nccl_efa_check: StrictBool | None = Field(
        None,
        description="A multi-node run's check that NCCL talks over EFA, not TCP, on types with EFA: the attempt fails "
        "when NCCL's init log says otherwise. Default true; false turns it off (--no-nccl-efa-check).",
    )


class Limits(_Section):
    """The run's guard rails, across every attempt."""

    max_runtime_hours: MaxRuntimeHours | None = None  # type: ignore[valid-type]
    max_cost_usd: MaxCostUsd | None = None  # type: ignore[valid-type]
    stall_minutes: StallMinutes | None = None  # type: ignore[valid-type]
    max_restarts_on_errors: Restarts | None = None  # type: ignore[valid-type]


class Data(_Section):
    """The training data: the outputs of `training-infra upload`, under data/ in the training bucket."""

    allow_empty: StrictBool = Field(False, description="Launch although the data prefix has no objects.")
    access: DataAccess | None = None  # type: ignore[valid-type]


class LaunchSpec(_Section):
    """One managed run, as `training-infra launch` takes it; unset keys take the stack's defaults."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="training-infra run spec",
        json_schema_extra={"$id": SCHEMA_ID},
    )

    run_id: RunName | None = None  # type: ignore[valid-type]
    group: GroupName | None = None  # type: ignore[valid-type]
    resources: Resources = Resources()
    image: ImageTag | None = None  # type: ignore[valid-type]
    command: Command | None = None  # type: ignore[valid-type]
    env: dict[EnvKey, EnvValue] = Field(  # type: ignore[valid-type]
        default_factory=dict,
        description="The trainer's environment (--env). Not for secrets: use secrets.",
        json_schema_extra={"additionalProperties": False},  # names outside the pattern are refused
    )
    secrets: dict[SecretName, SecretRef] = Field(  # type: ignore[valid-type]
        default_factory=dict,
        description="Secrets read on the instance at start, by reference only (--secret): NAME: ssm:/training-"
        "infra/PATH or NAME: arn:aws:secretsmanager:...",
        json_schema_extra={"additionalProperties": False},
    )
    limits: Limits = Limits()
    data: Data = Data()

    @field_validator("command")
    @classmethod
    def _runs_on_every_node(cls, command: str | None, info: ValidationInfo) -> str | None:
        resources = info.data.get("resources")
        nodes = resources.nodes if isinstance(resources, Resources) else 1
        try:
            return launch_rules.gang_command(command, nodes)
        except Refused as refused:
            raise PydanticCustomError("not_allowed", "{allowed}", {"allowed": refused.allowed}) from None

    @field_validator("env")
    @classmethod
    def _not_the_gangs(cls, env: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        _not_gang_variables(env, info)
        return env

    @field_validator("secrets")
    @classmethod
    def _names_once(cls, secrets: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        _not_gang_variables(secrets, info)
        both = sorted(set(secrets) & set(info.data.get("env") or {}))
        if both:
            raise PydanticCustomError(
                "not_allowed", "{allowed}", {"allowed": f"names not also in env ({', '.join(both)} in both)"}
            )
        return secrets

    def to_data(self) -> dict[str, Any]:
        """The spec as the file would say it: unset keys left out (so the stack's defaults still apply)."""
        return self.model_dump(mode="json", exclude_defaults=True)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_data())


# ---- reading a file, one line per mistake --------------------------------------------------------


class SpecError(ValueError):
    """A spec that cannot be used: `lines` holds one line per mistake, each meant for the user as is."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a run spec file (draft 2020-12), from the model itself."""
    schema = LaunchSpec.model_json_schema()
    for definition in [schema, *schema.get("$defs", {}).values()]:
        for prop in definition.get("properties", {}).values():
            _hoist_description(prop)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _hoist_description(prop: dict[str, Any]) -> None:
    """An optional key's meaning on the key itself (where editors show it), not inside its `anyOf` branch."""
    for branch in prop.get("anyOf", []):
        if "description" in branch and "description" not in prop:
            prop["description"] = branch.pop("description")


def _not_gang_variables(names: dict[str, str], info: ValidationInfo) -> None:
    """With resources.nodes > 1, the variables the agent sets for the gang's rendezvous are not the run's."""
    resources = info.data.get("resources")
    nodes = resources.nodes if isinstance(resources, Resources) else 1
    problem = torchrun.gang_env_problem(names) if nodes > 1 else ""
    if problem:
        raise PydanticCustomError("not_allowed", "{allowed}", {"allowed": f"other names ({problem})"})


def load(path: str | Path) -> LaunchSpec:
    """The validated spec in a YAML file; SpecError lists every mistake, one line each."""
    path = Path(path)
    return parse(read_text(path), source=str(path))


def read_text(path: Path) -> str:
    """A spec or sweep file's text; a missing, unreadable or binary file is one SpecError line."""
    try:
        return path.read_text()
    except OSError as error:
        raise SpecError([f"{path}: cannot read it ({error.strerror or error})"]) from None
    except UnicodeDecodeError:
        raise SpecError([f"{path}: cannot read it (not UTF-8 text); allowed: a YAML file"]) from None


def parse(text: str, *, source: str = "<spec>") -> LaunchSpec:
    data, lines = read_yaml(text, source=source)
    return validate(data, source=source, lines=lines)


def read_yaml(text: str, *, source: str = "<spec>") -> tuple[Any, dict[tuple[Any, ...], int]]:
    """The document's data and the line of each key path (for the messages); a syntax error is one line."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise SpecError([f"{source}{line}: not valid YAML: {problem}"]) from None
    finally:
        loader.dispose()
    return data, _key_lines(node) if node is not None else {}


def _key_lines(node: Any, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    import yaml

    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            here = (*path, key.value)
            lines.update(_key_lines(value, here))
            lines[here] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_key_lines(item, (*path, index)))
    return lines


def validate(data: Any, *, source: str = "<spec>", lines: Mapping[tuple[Any, ...], int] | None = None) -> LaunchSpec:
    """The spec in `data` (a file's YAML, or a record's); SpecError lists every mistake, one line each."""
    lines = lines or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(
            [f"{source}:{lines.get((), 1)}: got {_shown(data)}; allowed: a map of keys (`training-infra schema`)"]
        )
    try:
        return LaunchSpec.model_validate(data)
    except ValidationError as error:
        found = [_line(e, source, lines) for e in error.errors()]
        raise SpecError(sorted(found, key=_line_number)) from None


def _line_number(line: str) -> int:
    """Mistakes in the order of the file."""
    number = line.split(": ", 1)[0].rsplit(":", 1)[-1]
    return int(number) if number.isdigit() else 0


_ALLOWED_BY_TYPE = {
    "dict_type": "a map",
    "list_type": "a list",
    "string_type": "text",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}


def _line(error: Any, source: str, lines: Mapping[tuple[Any, ...], int]) -> str:
    is_key = error["loc"][-1:] == ("[key]",)
    loc = tuple(part for part in error["loc"] if part != "[key]")
    where = _path(loc)
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), 1)
    prefix = f"{source}:{line}: {where or '(top)'}"
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        known = _keys_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ";"
        return f"{prefix}: got unknown key {str(loc[-1])!r}{hint} allowed: {', '.join(known)}"
    if kind == "model_type":
        return f"{prefix}: got {_shown(value)}; allowed: a map of {', '.join(_keys_at(loc))}"
    if kind == "not_allowed":
        allowed = error["ctx"]["allowed"]
    elif kind in _ALLOWED_BY_TYPE:
        allowed = _ALLOWED_BY_TYPE[kind]
    else:
        allowed = str(error["msg"]).removeprefix("Input should be ").removeprefix("Value error, ")
    if len(loc) == 2 and loc[0] == "secrets" and not is_key and not launch_rules.looks_like_reference(value):
        shown = f"a value that is not a reference ({len(str(value))} characters, not shown)"
    else:
        shown = _shown(value)
    return f"{prefix}: got {shown}; allowed: {allowed}"


def _path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the model allows at a path (for "did you mean" and the list of what is allowed)."""
    model: Any = LaunchSpec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# ---- layers: file, flags, the stack's defaults --------------------------------------------------


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, map by map (a list or a value in `over` replaces the one in `base`)."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Each value by its key path (env and secrets entries one by one), for saying where each came from."""
    found: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            found.update(leaves(value, path))
        else:
            found[path] = value
    return found


def resolve(layers: list[tuple[str, Mapping[str, Any]]]) -> tuple[LaunchSpec, dict[str, str]]:
    """The spec from layers given weakest first (the stack's defaults, the file, the flags), and the source
    of each value by its key path."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, layer in layers:
        merged = merge(merged, layer)
        for path in leaves(layer):
            sources[path] = name
    spec = validate(merged, source="the resolved spec")
    return spec, {path: sources[path] for path in leaves(spec.to_data()) if path in sources}


def dump_yaml(data: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, allow_unicode=True)
