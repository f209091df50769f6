"""What each `launch` option allows that no deploy setting declares: the market, the restart cap, the dollar
limits, the trainer's environment and its secret references. One place for the rules, used by the CLI's flags
(cli/launching.py) and by the run spec file (training_infra/spec.py).

Stdlib only (with `config`, itself stdlib only): the spec model, and whatever imports it without the CLI,
must not pull in typer or rich. A rule raises `config.Refused(allowed)`; the caller names the option or key.
The supervisor checks every request again on its own side of the trust boundary (run_requests.py).
"""

from __future__ import annotations

import math
import re
from typing import Any

from training_infra import naming
from training_infra.compute.agent.ti_agent import torchrun
from training_infra.config import Refused

MARKETS = ("spot", "on-demand", "spot-then-on-demand")
MAX_RESTARTS = 100
MAX_PRICE_LIMIT = 1000.0  # USD/hour, as the spot_max_price setting allows
MAX_COST_LIMIT = 1_000_000.0  # USD across a run's attempts
MIN_COST_USD = 0.01  # a limit below a cent cannot pay for a second of any instance, and prints as $0.00
MIN_PRICE = 0.001  # USD/hour: below any EC2 price (spot prices have 4 decimals), and shown as $0.00/hour

ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What the secrets reader role may read (the compute construct): SecureStrings under PARAMETER_PATH,
# and Secrets Manager secrets tagged training-infra:managed=true (their ARN is all we can check here).
PARAMETER_PATH = naming.SECRETS_PARAMETER_PATH
SECRET_REF = re.compile(
    rf"^ssm:{re.escape(PARAMETER_PATH)}[A-Za-z0-9_.\-/]{{1,1000}}$"
    r"|^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]{1,512}$"
)
# The contract's own variables, and the AWS_/TI_ families the agent sets: a secret must not shadow them.
RESERVED_NAMES = ("RUN_ID", "DATA_DIR", "OUTPUT_DIR", "CHECKPOINT_DIR", "HEARTBEAT_FILE", "STOP_GRACE_SECONDS")

MARKET_ALLOWED = ", ".join(MARKETS)
RESTARTS_ALLOWED = f"a whole number from 0 to {MAX_RESTARTS}"
COST_ALLOWED = f"US dollars from {MIN_COST_USD:g} up to {MAX_COST_LIMIT:.0f}, e.g. 25"
PRICE_ALLOWED = f"USD per hour from {MIN_PRICE:g} up to {MAX_PRICE_LIMIT:g}, e.g. 0.60"
ENV_KEY_ALLOWED = "letters, digits and '_' (not starting with a digit)"
ENV_VALUE_ALLOWED = "a one-line value"
SECRET_REF_ALLOWED = (
    f"ssm:{PARAMETER_PATH}PATH (an SSM SecureString) or arn:aws:secretsmanager:REGION:ACCOUNT:secret:ID "
    "(tagged training-infra:managed=true)"
)
SECRET_NAME_ALLOWED = f"a name of {ENV_KEY_ALLOWED}, but not {', '.join(RESERVED_NAMES)}, AWS_* or TI_*"


def market(value: Any) -> str:
    if value not in MARKETS:
        raise Refused(MARKET_ALLOWED)
    return value


def restarts(value: Any) -> int:
    """A whole number from 0 to MAX_RESTARTS; the flag's text ('3') or the file's number (3)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Refused(RESTARTS_ALLOWED)
    text = str(value).strip()
    if not text.isdigit() or int(text) > MAX_RESTARTS:
        raise Refused(RESTARTS_ALLOWED)
    return int(text)


def _usd(value: Any, least: float, limit: float, allowed: str) -> float:
    if isinstance(value, bool):
        raise Refused(allowed)
    try:
        number = float(str(value).strip())
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and least <= number <= limit):  # also refuses nan and inf
        raise Refused(allowed)
    return number


def max_cost_usd(value: Any) -> float:
    return _usd(value, MIN_COST_USD, MAX_COST_LIMIT, COST_ALLOWED)


def max_price(value: Any) -> float:
    return _usd(value, MIN_PRICE, MAX_PRICE_LIMIT, PRICE_ALLOWED)


def env_key(key: str) -> str:
    if not isinstance(key, str) or not ENV_KEY.match(key):
        raise Refused(ENV_KEY_ALLOWED)
    return key


def env_value(value: Any) -> str:
    """A one-line value; a YAML number or true/false is the text the trainer will see."""
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str) or "\n" in value:
        raise Refused(ENV_VALUE_ALLOWED)
    return value


def secret_name(name: Any) -> str:
    if not isinstance(name, str) or not ENV_KEY.match(name) or name in RESERVED_NAMES:
        raise Refused(SECRET_NAME_ALLOWED)
    if name.startswith(("AWS_", "TI_")):
        raise Refused(SECRET_NAME_ALLOWED)
    return name


def secret_ref(ref: Any) -> str:
    """A reference only: the value itself never goes in a flag, a file, user data or the run record."""
    if not isinstance(ref, str) or not SECRET_REF.match(ref):
        raise Refused(SECRET_REF_ALLOWED)
    return ref


def looks_like_reference(ref: Any) -> bool:
    """Whether a refused secret was at least meant as a reference (its text is then safe to show)."""
    return isinstance(ref, str) and ref.startswith(("ssm:", "arn:"))


def gang_command(command: Any, nodes: int) -> Any:
    """A gang's command must be one the agent can run on every node (wrapped in torchrun, or the user's own torchrun,
    ti_agent/torchrun.py): refused here at launch, rather than failing each attempt on the box after its boot. An
    empty command is the image's CMD, which the agent cannot see to wrap."""
    if nodes > 1 and isinstance(command, str):
        try:
            torchrun.plan(command, nodes)
        except torchrun.CommandRefused as refused:
            raise Refused(f"with {nodes} nodes, {torchrun.ALLOWED} (here: {refused})") from None
    return command


def nccl_efa_check(value: Any) -> bool:
    """The gang's NCCL-uses-EFA check: on (true) unless turned off (--no-nccl-efa-check, resources.nccl_efa_check)."""
    if not isinstance(value, bool):
        raise Refused("true or false")
    return value
